"""`loracast train classify` under ``torchrun --nproc_per_node 2`` (DDP over gloo on the CPU).

Oracles, on a tiny BERT with dropout off (with dropout, each process draws its own masks, so runs
agree in distribution only): one process with ``--grad-accum 2`` and one process with twice the
batch. `--batch-size` is per process, so the three runs train the same examples in every global
batch, the loss is the mean over the global batch, and the saved adapters agree within
floating-point reduction error.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loracast.cli import main
from tests.support.launch import torchrun
from tests.support.tiny_bert import save_tiny_bert

# 80 train rows, 2 epochs: 10 batches of 8 an epoch, 5 global batches of 16 (two processes, or two accumulated)
ARGS = ["--epochs", "2", "--lr", "1e-2", "--max-length", "32", "--device", "cpu"]
# fp32 adapters after 10 AdamW steps; observed up to 3e-7 (values up to 0.6)
ADAPTER_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_rows, tiny_data):
    root = tmp_path_factory.mktemp("ddp_train")
    model = save_tiny_bert(root / "bert", [r["text"] for r in tiny_rows])
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    common = ["train", "classify", "--model", str(model), "--data", str(tiny_data), *ARGS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1); busy shared cores crawl otherwise
    try:
        assert main([*common, "--batch-size", "8", "--grad-accum", "2", "--out", str(root / "accum")]) == 0
        assert main([*common, "--batch-size", "16", "--out", str(root / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    launched = torchrun(["-m", "loracast", *common, "--batch-size", "8", "--out", str(root / "two")])
    assert launched.returncode == 0, launched.stdout[-6000:]
    return root / "one", root / "accum", root / "two", launched.stdout


def test_two_processes_and_accumulation_save_the_adapter_one_process_saves(runs):
    one, accum, two, _ = runs
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for v in a.values()) > 0.1  # trained, not the zero-initialised B
    for other in (accum, two):
        b = load_file(other / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= ADAPTER_ATOL


def test_losses_and_evaluation_match_and_the_run_records_two_processes(runs):
    one, accum, two, _ = runs
    m1, ma, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, accum, two))
    assert (m1["train"]["processes"], ma["train"]["processes"], m2["train"]["processes"]) == (1, 1, 2)
    assert m1["train"]["global_batch"] == ma["train"]["global_batch"] == m2["train"]["global_batch"] == 16
    losses1 = [s["loss"] for s in m1["history"]["steps"]]
    assert len(losses1) == 10
    for other in (ma, m2):  # the logged loss is the global-batch mean
        assert [s["loss"] for s in other["history"]["steps"]] == pytest.approx(losses1, abs=1e-5)
        assert [s["examples"] for s in other["history"]["steps"]] == [s["examples"] for s in m1["history"]["steps"]]
        # evaluation split across processes, counts summed
        assert [e["accuracy"] for e in other["history"]["evals"]] == [e["accuracy"] for e in m1["history"]["evals"]]
        assert other["eval"]["accuracy_after"] == m1["eval"]["accuracy_after"]


def test_only_rank_zero_prints_and_writes(runs):
    _, _, two, output = runs
    assert output.count("saved: ") == 1 and output.count("eval accuracy:") == 1
    assert output.count("stable: step 10/10 eval accuracy") == 1
    assert sorted(p.name for p in two.iterdir()) == ["adapter", "metrics.json", "training_curve.png"]
