"""The GGUF path of `loracast train`, `merge` and `generate`, end to end on a tiny Llama converted to
GGUF here as llama.cpp converts one (`tests.support.tiny_gguf.write_gguf`): transformers dequantizes it into
the very model it was written from, and the commands work on the file as on the real SmolLM2."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loracast import PeftModel
from loracast.cli import main
from loracast.training.sft.data import read_chat_examples
from loracast.training.sft.model import load_llm, load_llm_tokenizer
from loracast.training.sft.template import prompt_text
from tests.cli.test_errors import assert_one_line_error, run_cli
from tests.support.tiny_gguf import write_gguf
from tests.support.tiny_llm import run_sft

CPU = torch.device("cpu")
MESSAGE = "My kettle 123456 broke."


def _source_llama(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


def _q8_0_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """GGML's Q8_0, written out independently of gguf.quants: blocks of 32 along a row, scale
    max|x|/127 stored as float16, values rounded half away from zero to int8."""
    blocks = weight.float().reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    scaled = blocks * inverse
    quants = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (quants * scale.half().float()).reshape(weight.shape)


@pytest.fixture(scope="module")
def held_out(chat_data):
    return [e for e in read_chat_examples(chat_data) if e.split == "test"]


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_gguf, chat_data):
    # two held-out conversations are enough to see the loss fall; each evaluation generates answers
    return run_sft(tiny_gguf, chat_data, tmp_path_factory.mktemp("gguf_sft") / "out", "--eval-examples", "2",
                   "--export-gguf", "q8_0")


def test_f32_gguf_loads_into_the_llama_it_was_written_from(tiny_gguf, tiny_llama):
    source = _source_llama(tiny_llama)
    loaded = load_llm(tiny_gguf, torch.float32, False, CPU).eval()
    assert all(type(m) is torch.nn.Linear for n, m in loaded.named_modules() if n.endswith("_proj"))
    expected = source.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        # oracle: the source weights; exact, since F32 is stored as is and the q/k row permutation is undone
        assert torch.equal(tensor, expected[name]), name
    ids = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, source(ids).logits)
    bf16 = load_llm(tiny_gguf, torch.bfloat16, False, CPU)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.lm_head.weight, expected["lm_head.weight"].bfloat16())


def test_q8_0_gguf_dequantizes_to_the_rounded_weights(tiny_llama, tmp_path):
    path = write_gguf(tiny_llama, tmp_path / "tiny-q8_0.gguf", quantized=True)
    source = _source_llama(tiny_llama)
    loaded = load_llm(path, torch.float32, False, CPU).eval()
    expected = source.state_dict()
    for name, tensor in loaded.state_dict().items():
        want = _q8_0_round_trip(expected[name]) if tensor.dim() == 2 else expected[name]
        # oracle: Q8_0 written out above; float32 products of the same factors, so equal to the last bit
        torch.testing.assert_close(tensor, want, rtol=0, atol=0, msg=name)
    assert not torch.equal(loaded.lm_head.weight, expected["lm_head.weight"])  # it was quantized
    ids = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = source(ids).logits
        # 8-bit weights: the logits move by a small fraction of their range (measured about 1 %)
        assert (loaded(ids).logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_gguf_tokenizer_carries_the_chat_template_and_special_tokens(tiny_gguf, tiny_llama, held_out):
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(tiny_llama))
    tokenizer = load_llm_tokenizer(tiny_gguf)
    assert tokenizer.chat_template == source.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<pad>", "<s>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (source.eos_token_id, source.pad_token_id)
    for example in held_out:
        # oracle: the tokenizer the file was written from; <|im_start|> must stay one token, not be cut up
        ours = tokenizer.apply_chat_template(list(example.messages), tokenize=True, return_dict=False)
        theirs = source.apply_chat_template(list(example.messages), tokenize=True, return_dict=False)
        assert ours == theirs
        assert tokenizer.decode(ours) == source.decode(theirs)
        assert ours.count(source.convert_tokens_to_ids("<|im_start|>")) == len(example.messages)


def test_train_on_a_gguf_writes_a_peft_adapter_naming_the_file(gguf_run, tiny_gguf):
    adapter = gguf_run / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "sft.json"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tiny_gguf)
    assert json.loads((adapter / "sft.json").read_text())["model"] == str(tiny_gguf)
    metrics = json.loads((gguf_run / "metrics.json").read_text())
    assert metrics["model"] == str(tiny_gguf) and metrics["base_dtype"] == "bfloat16"
    assert list(metrics["adapter_dtypes"]) == ["float32"]
    assert metrics["eval"]["after"]["loss"] < metrics["eval"]["before"]["loss"]  # it learnt something


def test_train_exports_the_merged_model_as_gguf(gguf_run, tiny_gguf):
    import gguf

    exported = gguf.GGUFReader(str(gguf_run / "model-q8_0.gguf"))
    base = gguf.GGUFReader(str(tiny_gguf))
    assert bytes(exported.fields["general.architecture"].parts[-1]).decode() == "llama"
    kinds = {t.name: t.tensor_type.name for t in exported.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0"  # adapted: merged once, then quantized once
    assert kinds["token_embd.weight"] == {t.name: t.tensor_type.name for t in base.tensors}["token_embd.weight"]


def test_export_gguf_of_a_type_the_writer_cannot_produce_is_refused_before_training(tiny_gguf, chat_data, tmp_path,
                                                                                  capsys):
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_gguf), "--data", str(chat_data), "--out", str(out),
                 "--export-gguf", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q4_k" in err
    assert not out.exists()


def test_merge_of_a_gguf_base_writes_a_folder_with_the_unmerged_outputs(gguf_run, tiny_gguf, held_out, tmp_path,
                                                                       capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(tiny_gguf), str(gguf_run / "adapter"), str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    # the merge's own comparison of greedy answers (4 probe messages, 24 new tokens): rounding W + BA to
    # bfloat16 once may flip a near-tie of the argmax; bound: at most 1 of 4 differs (0 differ here)
    equal = re.search(r"greedy generations \(4 prompts\): (\d) of 4 equal", printed)
    assert equal is not None and int(equal.group(1)) >= 3, printed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: reloading it must not look for the GGUF
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == load_llm_tokenizer(tiny_gguf).chat_template
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.dtype == torch.bfloat16 and not any("lora" in name for name, _ in merged.named_parameters())
    unmerged = PeftModel.from_pretrained(load_llm(tiny_gguf, torch.bfloat16, False, CPU), gguf_run / "adapter")
    prompts = tokenizer([prompt_text(tokenizer, e) for e in held_out], return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = unmerged(**prompts).logits.float(), merged(**prompts).logits.float()
        with unmerged.disable_adapter():
            base = unmerged(**prompts).logits.float()
    # oracle: the unmerged adapter model's logits on the held-out prompts; tolerance 0.02 (about 2 % of
    # the largest logit: bf16 rounds each merged weight by up to 0.4 %; measured 0.004), while the
    # adapter itself moves them by more than ten times that (measured 1.08)
    assert (got - want).abs().max() < 0.02 < 0.2 < (base - want).abs().max()


def test_generate_with_a_gguf_base(gguf_run, tiny_gguf, capsys):
    recorded = json.loads((gguf_run / "samples.jsonl").read_text().splitlines()[0])
    adapter = str(gguf_run / "adapter")
    assert main(["generate", "--adapter", adapter, "--model", str(tiny_gguf), "--compare", "--max-new-tokens", "8",
                 "--device", "cpu", recorded["prompt"]]) == 0
    # oracle: the answers the training run recorded for this held-out message, before and after training
    assert capsys.readouterr().out.split("\n")[:3] == [f"message: {recorded['prompt']}", f"  base:    {recorded['base']}",
                                                       f"  adapter: {recorded['adapter']}"]
    # without --model, the base is the GGUF file named in ADAPTER/sft.json
    assert main(["generate", "--adapter", adapter, "--max-new-tokens", "8", "--device", "cpu", MESSAGE]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("command, cut_at", [("train", 100), ("merge", 0.5), ("generate", 0.5)])
def test_a_gguf_cut_short_is_one_line_error(command, cut_at, gguf_run, tiny_gguf, chat_data, tmp_path, capsys):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"  # in the metadata (100 bytes), or in the tensors (half the file)
    cut.write_bytes(data[: cut_at if isinstance(cut_at, int) else int(len(data) * cut_at)])
    out = tmp_path / "out"
    argv = {"train": ["train", "--model", str(cut), "--data", str(chat_data), "--out", str(out)],
            "merge": ["merge", str(cut), str(gguf_run / "adapter"), str(out)],
            "generate": ["generate", "--adapter", str(gguf_run / "adapter"), "--model", str(cut), MESSAGE]}[command]
    status, err = run_cli(argv, capsys)
    # before this check transformers failed with a numpy reshape error or a struct error, and a traceback
    assert_one_line_error(status, err, command, repr(str(cut)), "not a complete GGUF file", "fetch it again")
    assert not out.exists()
