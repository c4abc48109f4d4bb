"""`loracast train` for real runs, on a tiny float32 Llama: several processes, checkpoints and exact
resume (after a SIGKILL too), evaluation during training with the best adapter kept, config files,
and the one-line refusals.

Oracles: one process with ``--grad-accum 2`` for two processes (the same examples in every global
batch, the loss normalised over the global batch's assistant tokens, as transformers does); the
uninterrupted run for a resumed one (bit for bit).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loracast.cli import main
from tests.support.launch import REPO, torchrun

# 48 train conversations in batches of 4: 12 batches an epoch; fp32 so that runs compare tightly
RUN = ["--dtype", "fp32", "--batch-size", "4", "--lr", "5e-3", "--max-new-tokens", "4", "--eval-examples", "4",
       "--device", "cpu"]
STEPS = ["--max-steps", "6"]
# fp32 adapters after 6 AdamW steps, two processes against accumulation (relative to the largest value)
DDP_RTOL = 1e-4


def _command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *RUN, *extra]


def _one_thread(args: list[str]) -> int:
    """`loracast ARGS` in this process on one thread, as each launched process runs (OMP_NUM_THREADS=1),
    so that sums are taken in the same order and runs compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.support.tiny_llm import triage_rows, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("sft_runs") / "chat.jsonl", triage_rows(48, 4))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama, data) -> Path:
    """One process, checkpoints every step, no interruption: the oracle of the resume tests."""
    out = tmp_path_factory.mktemp("whole") / "out"
    assert _one_thread(_command(tiny_llama, data, out, *STEPS, "--save-steps", "1", "--save-total-limit", "2")) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_llama, data) -> Path:
    """Two processes (DDP), checkpoints every step, no interruption."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    launched = torchrun(["-m", "loracast", *_command(tiny_llama, data, out, *STEPS, "--save-steps", "1")])
    assert launched.returncode == 0, launched.stdout[-4000:]
    assert launched.stdout.count("held-out score") == 1  # only the main process prints the report
    return out


def test_checkpoints_are_complete_adapter_only_and_rotated(uninterrupted):
    root = uninterrupted / "checkpoints"
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == ["checkpoint-5", "checkpoint-6"]  # --save-total-limit 2
    for folder in root.iterdir():
        if folder.is_dir():
            files = {p.name for p in folder.iterdir()}
            assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "loracast_checkpoint.json"} <= files
            assert not files & {"model.safetensors", "pytorch_model.bin"}  # the adapter only
    marker = json.loads((root / "checkpoint-6" / "loracast_checkpoint.json").read_text())
    assert marker["identity"]["--precision"] == "stable" and marker["step"] == 6


def _launch(command: list[str], env: dict[str, str], nproc: int) -> subprocess.Popen:
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "LORACAST_DIST_TIMEOUT": "60"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.Popen([*launcher, "-m", "loracast", *command], cwd=REPO, env=full_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill_after_checkpoint(process: subprocess.Popen, marker: Path, timeout: float = 180.0) -> None:
    """SIGKILL the whole launch (every process) as soon as `marker` exists."""
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(f"the run ended (status {process.returncode}) before {marker} was written")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker} after {timeout} s")
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_resume_after_sigkill_at_a_random_step_is_bit_equal(nproc, tmp_path, tiny_llama, data, request):
    whole = request.getfixturevalue("uninterrupted" if nproc == 1 else "ddp_run")  # the uninterrupted run
    out = tmp_path / "killed"
    step = random.Random().randint(1, 5)
    command = _command(tiny_llama, data, out, *STEPS, "--save-steps", "1")
    _kill_after_checkpoint(_launch(command, {}, nproc),
                           out / "checkpoints" / f"checkpoint-{step}" / "loracast_checkpoint.json")
    assert not (out / "adapter").exists()  # nothing final was written by the killed run
    if nproc == 1:
        assert _one_thread([*command, "--resume"]) == 0
    else:
        launched = torchrun(["-m", "loracast", *command, "--resume"])
        assert launched.returncode == 0, launched.stdout[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"] is not None and len(metrics["history"]["steps"]) == 6
    _assert_bit_equal(_adapter(out), _adapter(whole))


def test_an_incomplete_checkpoint_is_ignored_and_the_previous_one_resumed(tmp_path, tiny_llama, data, uninterrupted):
    out = tmp_path / "out"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    shutil.copy(uninterrupted / "checkpoints" / "before.json", root / "before.json")
    shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-5", root / "checkpoint-5")
    shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-6", root / "checkpoint-6")
    (root / "checkpoint-6" / "loracast_checkpoint.json").unlink()  # a save killed before its end
    (root / "checkpoint-6" / "optimizer.pt").write_bytes(b"cut short")
    assert _one_thread([*_command(tiny_llama, data, out, *STEPS, "--save-steps", "1"), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["resumed_from"].endswith("checkpoint-5")
    _assert_bit_equal(_adapter(out), _adapter(uninterrupted))


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory, tiny_llama, data) -> Path:
    """One process accumulating two batches a step: the oracle of the two-process runs."""
    out = tmp_path_factory.mktemp("accumulated") / "out"
    assert _one_thread(_command(tiny_llama, data, out, *STEPS, "--grad-accum", "2")) == 0
    return out


def _assert_adapters_close(expected: Path, got: Path) -> None:
    a, b = _adapter(expected), _adapter(got)
    assert a.keys() == b.keys()
    for name in a:
        scale = float(a[name].abs().max())
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=DDP_RTOL * max(scale, 1e-12), msg=name)


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_accumulating_two_batches(accumulated, ddp_run):
    one, two = accumulated, ddp_run
    _assert_adapters_close(one, two)
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (one, two))
    assert m2["train"]["processes"] == 2 and m2["train"]["global_batch"] == m1["train"]["global_batch"] == 8
    assert [s["tokens"] for s in m2["history"]["steps"]] == [s["tokens"] for s in m1["history"]["steps"]]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_llama, data) -> Path:
    """Two processes sharding the model with FSDP2, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("fsdp") / "out"
    launched = torchrun(["-m", "loracast", *_command(tiny_llama, data, out, *STEPS, "--fsdp", "--save-steps", "2")])
    assert launched.returncode == 0, launched.stdout[-4000:]
    return out


@pytest.mark.multiprocess
def test_fsdp2_equals_one_process_accumulating_two_batches(accumulated, fsdp_run):
    _assert_adapters_close(accumulated, fsdp_run)
    checkpoint = fsdp_run / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "optimizer_shards").is_dir()  # each process's optimizer shards
    assert json.loads((checkpoint / "loracast_checkpoint.json").read_text())["identity"]["--fsdp"] is True


@pytest.mark.multiprocess
def test_fsdp2_resume_is_bit_equal(tmp_path, tiny_llama, data, fsdp_run):
    out = tmp_path / "out"
    shutil.copytree(fsdp_run / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    shutil.copy(fsdp_run / "checkpoints" / "before.json", out / "checkpoints" / "before.json")
    launched = torchrun(["-m", "loracast", *_command(tiny_llama, data, out, *STEPS, "--fsdp", "--save-steps", "2"),
                         "--resume"])
    assert launched.returncode == 0, launched.stdout[-4000:]
    _assert_bit_equal(_adapter(out), _adapter(fsdp_run))


@pytest.mark.multiprocess
def test_qlora_under_fsdp2_trains_and_peft_loads_the_adapter(tmp_path, tiny_llama, data):
    from peft import PeftModel as PeftPeftModel

    from loracast import PeftModel
    from loracast.errors import PrecisionWarning
    from loracast.training.sft.model import load_llm

    out = tmp_path / "out"
    command = ["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out), "--batch-size", "4",
               "--lr", "5e-3", "--max-new-tokens", "4", "--eval-examples", "4", "--device", "cpu", *STEPS,
               "--fsdp", "--load-in-4bit"]
    launched = torchrun(["-m", "loracast", *command])
    assert launched.returncode == 0, launched.stdout[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["policy"] == "fsdp" and list(metrics["adapter_dtypes"]) == ["bfloat16"]
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]
    cpu = torch.device("cpu")
    ids = torch.tensor([[5, 9, 31, 77, 120, 8]])
    # both load the bf16 adapter as float32 (their default); train mode, as in training: bitsandbytes'
    # CPU kernels repack 4-bit weights in eval mode only for dimensions this tiny model does not have
    with pytest.warns(PrecisionWarning, match="bfloat16 at save, float32 now"):
        ours = PeftModel.from_pretrained(load_llm(tiny_llama, torch.bfloat16, True, cpu, "eager", for_fsdp=True),
                                         out / "adapter")
    theirs = PeftPeftModel.from_pretrained(load_llm(tiny_llama, torch.bfloat16, True, cpu, "eager", for_fsdp=True),
                                           str(out / "adapter"))
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-2, atol=1e-2)


def test_torchao_int8_base_trains_and_peft_loads_the_adapter(tmp_path, tiny_llama, data):
    from peft import PeftModel as PeftPeftModel

    from loracast import PeftModel
    from loracast.quant.torchao import quantize_base
    from loracast.training.sft.model import load_llm

    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--lr", "5e-3", "--max-new-tokens", "4", "--eval-examples", "4", "--device", "cpu", *STEPS,
                 "--quantize", "int8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == {"backend": "torchao", "kind": "int8"}
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]
    cpu = torch.device("cpu")

    def base():
        return quantize_base(load_llm(tiny_llama, torch.bfloat16, False, cpu, "eager"), "int8")

    ids = torch.tensor([[5, 9, 31, 77, 120, 8]])
    ours, theirs = PeftModel.from_pretrained(base(), out / "adapter"), PeftPeftModel.from_pretrained(base(), str(out / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_evaluation_during_training_and_the_best_adapter(tmp_path, tiny_llama, data, capsys):
    out = tmp_path / "out"
    assert main(_command(tiny_llama, data, out, "--max-steps", "4", "--eval-steps", "2", "--load-best")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [e["step"] for e in metrics["eval"]["evaluations"]]
    assert steps == [0, 2, 4, 4]  # before, every 2 steps, after (the best adapter, restored)
    best = metrics["eval"]["best_checkpoint"]
    assert best is not None and Path(best).name in {"checkpoint-2", "checkpoint-4"}
    _assert_bit_equal(_adapter(out), load_file(str(Path(best) / "adapter_model.safetensors")))


def test_config_file_sets_flags_and_the_command_line_overrides(tmp_path, tiny_llama, data):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {data}\ndtype: fp32\nbatch-size: 4\nmax_steps: 3\n"
                      "max_new_tokens: 4\neval_examples: 4\ndevice: cpu\ntarget_modules: [q_proj, v_proj]\n"
                      "r: 4\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--max-steps", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["max_steps"] == 2 and metrics["train"]["batch_size"] == 4  # flag over file; file
    assert metrics["lora"]["r"] == 4 and metrics["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize(("text", "expected"), [
    ("lrr: 0.1\n", "unknown key 'lrr'"),
    ("max_steps: many\n", "key 'max_steps'"),
    ("load_best: 3\n", "key 'load_best' is a switch"),
    ("precision: sloppy\n", "key 'precision' is 'sloppy'"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("a: [1,\n", "not valid YAML"),
])
def test_bad_config_file_is_one_line_exit_2(text, expected, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(text, encoding="utf-8")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and str(config) in err
    assert not (tmp_path / "out").exists()


def test_resume_without_a_checkpoint(tmp_path, tiny_llama, data, capsys):
    out = tmp_path / "out"
    assert main([*_command(tiny_llama, data, out, *STEPS), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no complete checkpoint" in err
    assert not out.exists()


@pytest.mark.parametrize(("flags", "named"), [(["--dtype", "bf16"], "--dtype"),
                                               (["--r", "8"], "--r"), (["--precision", "mixed"], "--precision")])
def test_resume_from_another_run_names_the_difference(flags, named, tmp_path, tiny_llama, data, uninterrupted,
                                                      capsys):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    assert main([*_command(tiny_llama, data, out, *STEPS, "--save-steps", "1"), *flags, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another run" in err and named in err
    assert not (out / "adapter").exists()


def test_a_tracker_that_is_not_installed_or_unknown(tmp_path, tiny_llama, data, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        assert main([*_command(tiny_llama, data, tmp_path / "a", *STEPS), "--report-to", "wandb"]) == 2
        assert "pip install wandb" in capsys.readouterr().err
    assert main([*_command(tiny_llama, data, tmp_path / "b", *STEPS), "--report-to", "nonsense"]) == 2
    assert "not a tracker" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fsdp_on_one_process_and_compare_precision_under_torchrun(tmp_path, tiny_llama, data, capsys, monkeypatch):
    # FSDP shards across processes: one process has nothing to shard with
    assert main([*_command(tiny_llama, data, tmp_path / "a", *STEPS), "--fsdp"]) == 2
    assert "--fsdp" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*_command(tiny_llama, data, tmp_path / "b", *STEPS), "--compare-precision"]) == 2
    assert "--compare-precision" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "ab")
