"""`loracast train` on instruction data, end to end on a tiny Llama built from a config: the files
it writes, the adapter PEFT loads with equal greedy generations, `loracast merge` of the LLM
adapter into a full model folder, and `loracast generate`."""

from __future__ import annotations

import json

import pytest
import torch

from loracast import PeftModel
from loracast.cli import main
from loracast.training.sft.data import read_chat_examples
from loracast.training.sft.evaluate import answer_examples
from tests.support.tiny_llm import SFT_FAST, run_sft


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_llama, chat_data):
    return run_sft(tiny_llama, chat_data, tmp_path_factory.mktemp("sft") / "out")


def test_sft_run_writes_adapter_metrics_plot_and_samples(sft_run, capsys):
    files = {p.name for p in sft_run.iterdir()}
    assert {"adapter", "metrics.json", "training_curve.png", "samples.md", "samples.jsonl"} <= files
    assert {"adapter_model.safetensors", "adapter_config.json", "sft.json"} <= {p.name for p in (sft_run / "adapter").iterdir()}
    metrics = json.loads((sft_run / "metrics.json").read_text())
    assert metrics["task"] == "sft" and metrics["policy"] == "stable"
    assert metrics["base_dtype"] == "bfloat16" and list(metrics["adapter_dtypes"]) == ["float32"]
    assert len(metrics["history"]["steps"]) == 4
    assert all(s["tokens"] > 0 for s in metrics["history"]["steps"])
    assert metrics["eval"]["examples"] == 4 and set(metrics["eval"]["after"]["fields"]) == {"intent", "urgency",
                                                                                          "order_id", "item"}
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]  # it learnt something
    assert metrics["doctor"].startswith("no problems found")
    # the CPU defaults: eager attention, and the loss projecting only the assistant positions (lm_loss)
    assert metrics["train"]["attention"] == "eager_lean" and metrics["train"]["head_on_labelled_positions_only"] is True
    # every gated MLP's activation and every norm's input were recomputed in backward (recompute.py)
    assert metrics["train"]["recomputed_in_backward"] == {"gated_mlp_activations": 2, "rms_norm_inputs": 5}
    assert metrics["lora"]["lora_dropout"] == 0.0
    samples = [json.loads(line) for line in (sft_run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all({"prompt", "reference", "base", "adapter"} <= set(s) for s in samples)


def _answers(model, tokenizer, examples):
    return answer_examples(model, tokenizer, examples, 8, 4, torch.device("cpu"))


def test_peft_loads_the_adapter_and_generates_the_same_greedy_answers(sft_run, tiny_llama, chat_data):
    from peft import PeftModel as PeftPeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    held = [e for e in read_chat_examples(chat_data) if e.split == "test"]

    def base():
        return AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16)

    ours = _answers(PeftModel.from_pretrained(base(), sft_run / "adapter"), tokenizer, held)
    theirs = _answers(PeftPeftModel.from_pretrained(base(), str(sft_run / "adapter")), tokenizer, held)
    assert ours == theirs  # oracle: PEFT's own generation on the same files, token for token
    recorded = [json.loads(line)["adapter"] for line in (sft_run / "samples.jsonl").read_text().splitlines()]
    assert ours == recorded  # the answers the run reported are the saved adapter's


def test_merge_writes_a_full_causal_lm_folder(sft_run, tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_llama), str(sft_run / "adapter"), str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "greedy generations (4 prompts):" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(tiny_llama)).chat_template
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and not any("lora" in name for name, _ in model.named_parameters())


def test_generate_prints_adapter_and_base_answers(sft_run, tiny_llama, capsys):
    assert main(["generate", "--adapter", str(sft_run / "adapter"), "--model", str(tiny_llama), "--compare",
                 "--max-new-tokens", "5", "--device", "cpu", "My kettle 123456 broke."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "message: My kettle 123456 broke." and lines[1].startswith("  base:")
    assert lines[2].startswith("  adapter:")


def test_compare_precision_trains_fp32_and_bf16_adapters(tmp_path, tiny_llama, chat_data, capsys):
    out = tmp_path / "cmp"
    assert main(["train", "--model", str(tiny_llama), "--data", str(chat_data), "--out", str(out), "--compare-precision",
                 "--eval-examples", "2", *SFT_FAST[:1], "1", *SFT_FAST[2:]]) == 0
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert list(runs["stable"]["adapter_dtypes"]) == ["float32"] and list(runs["fast"]["adapter_dtypes"]) == ["bfloat16"]
    assert (out / "compare_precision.png").is_file()
    assert "exact match after" in capsys.readouterr().out
