"""Save faults and malformed adapter folders, PEFT 0.21.2 against loracast (issue 15).

Counts, for each library, on the same tiny Llama adapters (tests/support/fault_injection.py):
- SIGKILL at a random moment of a save loop (30 trials, seeded): silent mixes (loads, matches
  neither adapter), refusals, temp files left after the kill and after the next save;
- two processes saving into one folder at once (20 rounds): silent mixes, refusals;
- the malformed inputs the issue lists: a foreign exception (for loracast: anything but a
  LoracastError; for PEFT: anything but its ValueError checks), or wrongly accepted.

Usage: python benchmarks/save_faults.py [--trials 30] [--rounds 20] [--out benchmarks/save_faults.json] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import resource
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tests.support.fault_injection import (  # noqa: E402
    DAMAGED_FINGERPRINTS,
    MALFORMED_CONFIGS,
    concurrent_rounds,
    kill_trials,
    make_pair,
)

# inputs that must be refused; loading one is a wrong acceptance
MUST_REFUSE = {"lora_alpha", "alpha_pattern['q_proj']", "qalora_group_size", "auto_mapping", "megatron_core",
               "init_lora_weights", "nan tensor"}


def _load_in_child(library: str, pair, folder: str) -> str:
    """Load `folder` in a forked child under a 16 GB address-space limit (a huge rank must not
    take the machine down): "loaded", or the exception's type name."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_AS, (16 * 2**30, 16 * 2**30))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if library == "peft":
                    from peft import PeftModel
                else:
                    from loracast import PeftModel
                PeftModel.from_pretrained(copy.deepcopy(pair.base), folder)
            result = "loaded"
        except BaseException as exc:
            from loracast.errors import LoracastError

            result = ("LoracastError:" if isinstance(exc, LoracastError) else "") + type(exc).__name__
        os.write(write_fd, pickle.dumps(result))
        os._exit(0)
    os.close(write_fd)
    data = b"".join(iter(lambda: os.read(read_fd, 4096), b""))
    os.waitpid(pid, 0)
    os.close(read_fd)
    return pickle.loads(data) if data else "killed"


def _foreign(library: str, result: str) -> bool:
    if result in ("loaded",):
        return False
    if library == "loracast":
        return not result.startswith("LoracastError:")
    return result not in ("ValueError",)  # PEFT's own checks raise ValueError


def malformed_inputs(library: str, pair, work: Path) -> dict:
    """Load each malformed input of the issue with `library`; the outcome of each."""
    reference = work / "reference"
    pair.new.save_pretrained(reference)  # loracast and PEFT write the same layout; loracast's has a fingerprint
    cases: dict[str, str] = {}
    for changes, field in MALFORMED_CONFIGS:
        folder = work / "case"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(reference, folder)
        data = json.loads((folder / "adapter_config.json").read_text())
        data.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(data))
        _strip_digest(folder)  # measure the config check itself, not the pair check
        cases[f"{field}={_short(changes)}"] = _load_in_child(library, pair, str(folder))
    folder = work / "case"
    for entry, value in DAMAGED_FINGERPRINTS.items():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(work / "fingerprinted", folder)
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            metadata = dict(handle.metadata())
        fingerprint = json.loads(metadata["loracast.fingerprint"])
        fingerprint[entry] = value
        metadata["loracast.fingerprint"] = json.dumps(fingerprint)
        save_file(load_file(str(folder / "adapter_model.safetensors")), str(folder / "adapter_model.safetensors"),
                  metadata=metadata)
        cases[f"fingerprint {entry}"] = _load_in_child(library, pair, str(folder))
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(reference, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cases["nan tensor"] = _load_in_child(library, pair, str(folder))
    (folder / "adapter_config.json").write_bytes(b'{"r": 4, "target_modules": "\xff"}')
    cases["non-UTF-8 config"] = _load_in_child(library, pair, str(folder))
    foreign = sorted(k for k, v in cases.items() if _foreign(library, v))
    wrong = sorted(k for k, v in cases.items() if v == "loaded" and any(k.startswith(m) for m in MUST_REFUSE))
    wrong += sorted(k for k, v in cases.items() if k.startswith("fingerprint") and v != "loaded")
    return {"cases": cases, "foreign_exceptions": foreign, "wrongly_accepted_or_refused": wrong}


def _strip_digest(folder: Path) -> None:
    path = str(folder / "adapter_model.safetensors")
    with safe_open(path, framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "loracast.config_sha256"}
    save_file(load_file(path), path, metadata=metadata)


def _short(changes: dict) -> str:
    text = repr(next(iter(changes.values())))
    return text if len(text) < 24 else text[:21] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "save_faults.json"))
    parser.add_argument("--tmp", default=None, help="folder for the trial folders (default: the system's temp folder)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = {}
    # on a disk, as users save (in RAM the gap between PEFT's two writes is too short to hit often)
    base = Path(tempfile.mkdtemp(prefix="save-faults-", dir=args.tmp))
    try:
        fingerprinted = make_pair("loracast")
        fingerprinted.new.save_pretrained(base / "fingerprinted")
        for library in ("peft", "loracast"):
            pair = make_pair(library)
            work = base / library
            work.mkdir()
            kill = kill_trials(pair, str(work / "kill"), args.trials, args.seed)
            rounds = concurrent_rounds(pair, str(work / "concurrent"), args.rounds)
            (work / "fingerprinted").symlink_to(base / "fingerprinted")
            results[library] = {"kill": kill.as_dict(), "concurrent": rounds.as_dict(),
                                "malformed": malformed_inputs(library, pair, work)}
            print(library, json.dumps({k: v for k, v in results[library].items() if k != "malformed"}))
            print(library, "foreign exceptions:", results[library]["malformed"]["foreign_exceptions"])
            print(library, "wrongly accepted/refused:", results[library]["malformed"]["wrongly_accepted_or_refused"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print("written", args.out)


if __name__ == "__main__":
    main()
