"""`loracast export` on a tiny Llama written as GGUF the way llama.cpp's converter writes one.

Oracles, each independent of the writer under test: transformers' GGUF loader (it reads the files
and undoes llama.cpp's q/k layout), the merged weight computed here in float64 from the adapter's
factors (W + alpha/r * B@A), a Q8_0 quantizer written out in the tests (`_q8_0_round_trip`), gguf's
reader for the bytes and metadata, and llama.cpp's own LoRA formula (W + alpha/r * lora_b@lora_a)
applied to the adapter file's tensors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.cli import main
from loracast.training.sft.model import load_llm
from tests.cli.test_errors import assert_one_line_error, run_cli
from tests.cli.test_gguf import _q8_0_round_trip
from tests.support.tiny_gguf import write_gguf
from tests.support.tiny_llm import save_tiny_llama

CPU = torch.device("cpu")
R, ALPHA = 4, 8
MESSAGE = "My kettle 123456 broke."


def _save_adapter(base, folder, **config):
    """A random (B not zero) all-linear adapter of the float32 model at `base`, saved in `folder`."""
    torch.manual_seed(1)
    model = load_llm(base, torch.float32, False, CPU)
    options = dict(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)
    options.update(config)
    peft_model = get_peft_model(model, LoraConfig(**options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)  # an adapter that moves the logits by far more than any rounding
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_gguf, tmp_path_factory):
    return _save_adapter(tiny_gguf, tmp_path_factory.mktemp("export") / "adapter")


@pytest.fixture(scope="module")
def q8_base(tiny_llama, tmp_path_factory):
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf", quantized=True)


def _read_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _exact_merged(base, adapter_dir):
    """HF name -> float64 W + alpha/r * B@A for every adapted weight, from the base as transformers
    reads it and the adapter's saved factors; and the base's state dict."""
    from safetensors.torch import load_file

    weights = load_llm(base, torch.float32, False, CPU).state_dict()
    factors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    merged = {}
    for key, a in factors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = factors[key.replace("lora_A", "lora_B")]
        merged[f"{module}.weight"] = weights[f"{module}.weight"].double() + (ALPHA / R) * (b.double() @ a.double())
    return merged, weights


def _logits(model, vocab):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.double()


def _export(argv, capsys):
    assert main(["export", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_f32_export_reads_back_as_the_merged_model(adapter, tiny_gguf, tmp_path, capsys):
    out = tmp_path / "merged-f32.gguf"
    printed = _export([adapter, "--base", tiny_gguf, "--gguf", out], capsys)
    assert "14 tensors merged and rounded once, 7 kept byte for byte" in printed
    merged = PeftModel.from_pretrained(load_llm(tiny_gguf, torch.float32, False, CPU), adapter).merge_and_unload()
    exported = _read_gguf(out)
    # oracle: loracast's own float32 merge of the same adapter, run by transformers from the folder-free
    # model; exact, since both round W + B@A*scaling from float64 to float32 once
    assert torch.equal(_logits(exported, 400), _logits(merged.eval(), 400))
    exact, base = _exact_merged(tiny_gguf, adapter)
    for name, tensor in exported.state_dict().items():
        want = exact[name].float() if name in exact else base[name]  # oracle: float64 merge computed here
        assert torch.equal(tensor, want), name
    assert (_logits(exported, 400) - _logits(load_llm(tiny_gguf, torch.float32, False, CPU).eval(), 400)).abs().max() > 0.5


@pytest.mark.parametrize("kind, mantissa", [("bf16", 7), ("f16", 10)])
def test_half_precision_export_rounds_each_weight_once(kind, mantissa, adapter, tiny_llama, tmp_path, capsys):
    out = tmp_path / f"merged-{kind}.gguf"
    printed = _export([adapter, "--base", tiny_llama, "--gguf", out, "--type", kind], capsys)
    assert "14 tensors merged and rounded once, 0 kept byte for byte from the base, 7 converted" in printed
    exported = _read_gguf(out)
    exact, base = _exact_merged(tiny_llama, adapter)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    for name, tensor in exported.state_dict().items():
        want = exact[name] if name in exact else base[name].double()
        if tensor.dim() == 1:  # norms stay float32, as llama.cpp's converter writes them
            assert torch.equal(tensor.double(), want), name
            continue
        # oracle: the nearest value of the format, from float64 (correct rounding, half an ulp at most)
        assert torch.equal(tensor.to(dtype).float(), tensor), name  # a value of the format
        ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0 ** -14))) - mantissa)
        assert ((tensor.double() - want).abs() <= ulp / 2).all(), name
    reference = PeftModel.from_pretrained(load_llm(tiny_llama, torch.float32, False, CPU), adapter).merge_and_unload()
    want = _logits(reference.eval(), 400)
    # every weight moves by at most one rounding of the format (relative 2^-8 for bf16): measured 0.02 / 0.003
    assert (_logits(exported, 400) - want).abs().max() < 0.05 * want.abs().max()


def test_q8_0_export_keeps_untouched_tensors_and_quantizes_the_merge_once(adapter, q8_base, tmp_path, capsys):
    import gguf

    out = tmp_path / "merged-q8_0.gguf"
    printed = _export([adapter, "--base", q8_base, "--gguf", out, "--type", "q8_0"], capsys)
    base_file, out_file = gguf.GGUFReader(str(q8_base)), gguf.GGUFReader(str(out))
    base_tensors = {t.name: t for t in base_file.tensors}
    adapted = {line.split()[0] for line in printed.splitlines() if "max |error|" in line}
    assert len(adapted) == 14 and [t.name for t in out_file.tensors] == list(base_tensors)
    for tensor in out_file.tensors:
        original = base_tensors[tensor.name]
        if tensor.name in adapted:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        else:  # the base's bytes, not dequantized and quantized again
            assert tensor.tensor_type == original.tensor_type and bytes(tensor.data) == bytes(original.data), tensor.name
    for key in ("tokenizer.chat_template", "tokenizer.ggml.merges", "llama.attention.head_count_kv"):
        assert out_file.fields[key].contents() == base_file.fields[key].contents()
    exported = _read_gguf(out)
    exact, _ = _exact_merged(q8_base, adapter)
    for name, want in exact.items():
        got = exported.state_dict()[name].double()
        # oracle 1: Q8_0 written out in the tests, applied to the float32 merged weight: equal to the last bit
        assert torch.equal(got.float(), _q8_0_round_trip(want.float())), name
        # oracle 2: the format's own error bound against the float64 merge, per block of 32: half a step
        # (scale = max|x|/127) plus the float16 rounding of the scale (127 * scale * 2^-11)
        blocks = want.reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2.0 ** -11)
        assert ((got.reshape(-1, 32) - blocks).abs() <= bound + 1e-12).all(), name


def test_adapter_gguf_is_llama_cpp_lora_format(adapter, tiny_gguf, tmp_path, capsys):
    import gguf

    merged = tmp_path / "merged.gguf"
    _export([adapter, "--base", tiny_gguf, "--gguf", merged], capsys)
    out = tmp_path / "ollama" / "adapter.gguf"
    out.parent.mkdir()
    printed = _export([adapter, "--base", tiny_gguf, "--gguf-adapter", out], capsys)
    assert "14 tensors, alpha 8" in printed and "Modelfile" in printed
    file = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in file.fields.items() if not k.startswith("GGUF.")}
    assert (fields["general.architecture"], fields["general.type"], fields["adapter.type"]) == ("llama", "adapter", "lora")
    assert fields["adapter.lora.alpha"] == ALPHA
    lora = {t.name: torch.from_numpy(t.data.copy()).double() for t in file.tensors}
    base = {t.name: torch.from_numpy(t.data.copy()).double() for t in gguf.GGUFReader(str(tiny_gguf)).tensors}
    want = {t.name: torch.from_numpy(t.data.copy()).double() for t in gguf.GGUFReader(str(merged)).tensors}
    names = {n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")}
    assert len(names) == 14 and set(lora) == {f"{n}.lora_{s}" for n in names for s in "ab"}
    for name in names:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape == (R, base[name].shape[1]) and b.shape == (base[name].shape[0], R)
        # oracle: llama.cpp's formula (scale alpha / rank) on the file's tensors, in its own q/k layout,
        # against the merged export's tensor: equal within the float32 rounding of the merge
        torch.testing.assert_close(base[name] + ALPHA / R * (b @ a), want[name], rtol=0, atol=1e-6, msg=name)
    modelfile = (out.parent / "Modelfile").read_text().splitlines()
    assert f"FROM {tiny_gguf.resolve()}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert any(line.startswith('TEMPLATE """{{- range .Messages }}<|im_start|>') for line in modelfile)


def test_rank_stabilised_scaling_is_folded_into_lora_b(tiny_gguf, tmp_path, capsys):
    import gguf

    adapter = _save_adapter(tiny_gguf, tmp_path / "rslora", use_rslora=True, alpha_pattern={"q_proj": 2.0})
    out = tmp_path / "rslora.gguf"
    printed = _export([adapter, "--base", tiny_gguf, "--gguf-adapter", out, "--type", "bf16"], capsys)
    assert "scaling folded into lora_b of 14" in printed
    lora = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert {t.tensor_type for t in lora.values()} == {gguf.GGMLQuantizationType.BF16}
    exact, _ = _exact_merged(tiny_gguf, adapter)  # alpha / r scaling: corrected below to PEFT's
    model = _read_gguf(tiny_gguf)
    for module, name in (("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight"),
                         ("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight")):
        a = torch.from_numpy(gguf.quants.dequantize(lora[f"{name}.lora_a"].data, lora[f"{name}.lora_a"].tensor_type))
        b = torch.from_numpy(gguf.quants.dequantize(lora[f"{name}.lora_b"].data, lora[f"{name}.lora_b"].tensor_type))
        # oracle: PEFT's rsLoRA update alpha/sqrt(r) * B@A, from the float64 merge computed here
        base_w = model.state_dict()[f"{module}.weight"].double()
        peft_delta = (exact[f"{module}.weight"] - base_w) * math.sqrt(R)
        got = ALPHA / R * (b.double() @ a.double())  # what llama.cpp adds
        assert (got - peft_delta).abs().max() < 0.02 * peft_delta.abs().max(), name  # bf16 factors: 2^-8 each


def test_generate_runs_the_exported_file_with_the_adapter_answers(adapter, tiny_gguf, tmp_path, capsys):
    out = tmp_path / "merged.gguf"
    _export([adapter, "--base", tiny_gguf, "--gguf", out], capsys)
    options = ["--dtype", "fp32", "--max-new-tokens", "8", "--device", "cpu", MESSAGE]
    assert main(["generate", "--model", str(out), *options]) == 0
    exported = capsys.readouterr().out
    assert main(["generate", "--adapter", str(adapter), "--model", str(tiny_gguf), *options]) == 0
    # oracle: the unmerged adapter on the base, greedy: the same answer from the merged float32 file
    assert exported == capsys.readouterr().out and exported.strip()


def test_bad_inputs_are_one_line_errors(adapter, tiny_gguf, tiny_llama, tmp_path, capsys):
    import gguf

    out = tmp_path / "out.gguf"
    other_arch = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(other_arch), "qwen2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    wider = save_tiny_llama(tmp_path / "wider")
    config = (wider / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 128')
    (wider / "config.json").write_text(config)
    (wider / "model.safetensors").unlink()
    capsys.readouterr()  # the set-up's progress bars
    cases = [
        (["--base", other_arch, "--gguf", out], ["'qwen2' model", "supports Llama-family"]),
        (["--base", other_arch, "--gguf-adapter", out], ["'qwen2' model"]),
        (["--base", wider, "--gguf", out], ["blk.0.ffn_down.weight is (128, 128) (out, in)", "the base the adapter was trained on"]),
        (["--base", tiny_gguf, "--gguf", out, "--type", "q4_k"], ["'q4_k' is not one", "f32, f16, bf16, q8_0"]),
        (["--base", tiny_gguf, "--gguf-adapter", out, "--type", "q8_0"], ["'q8_0' is not one", "f32, f16, bf16"]),
        (["--base", tiny_gguf, "--gguf", tiny_gguf, "--overwrite"], ["one of the inputs"]),
        (["--base", tiny_gguf], ["give one of --gguf"]),
    ]
    for argv, fragments in cases:
        status, err = run_cli(["export", str(adapter), *map(str, argv)], capsys)
        assert_one_line_error(status, err, "export", *fragments)
        assert not out.exists()
    out.write_bytes(b"old")
    status, err = run_cli(["export", str(adapter), "--base", str(tiny_gguf), "--gguf", str(out)], capsys)
    assert_one_line_error(status, err, "export", "exists; pass --overwrite")
    assert out.read_bytes() == b"old"
    assert main(["export", str(adapter), "--base", str(tiny_gguf), "--gguf", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_a_failed_write_leaves_no_file(adapter, tiny_gguf, tmp_path, monkeypatch):
    import gguf

    from loracast.export import ExportError, export_merged_gguf

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    out = tmp_path / "merged.gguf"
    with pytest.raises(OSError, match="No space left"):
        export_merged_gguf(adapter, tiny_gguf, out)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the temporary one
    with pytest.raises(ExportError, match="folder"):
        export_merged_gguf(adapter, tiny_gguf, tmp_path)


def test_the_base_and_system_prompt_come_from_the_training_record(adapter, tiny_gguf, tmp_path, capsys):
    import shutil

    trained = shutil.copytree(adapter, tmp_path / "adapter")
    (trained / "sft.json").write_text(json.dumps({"model": str(tiny_gguf), "system": "Answer in JSON."}))
    out = tmp_path / "ollama" / "adapter.gguf"
    out.parent.mkdir()
    printed = _export([trained, "--gguf-adapter", out, "--type", "f16"], capsys)  # no --base
    assert f"FROM {tiny_gguf}" in printed and "(F16; 14 tensors" in printed
    assert 'SYSTEM """Answer in JSON."""' in (out.parent / "Modelfile").read_text().splitlines()
    assert main(["export", str(trained), "--gguf", str(tmp_path / "merged.gguf")]) == 0
