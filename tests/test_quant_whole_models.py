"""HQQ and optimum-quanto bases as whole models, the way users get and use them: loaded through
transformers, prepared for k-bit training with gradient checkpointing, compiled, merged and saved,
with DoRA. One table of backends; a test skips only for a backend that is not installed.

Oracles: PEFT 0.21.2 on the same base with the same LoRA values (its `HqqLoraLinear` for HQQ; for
quanto the LoRA `Linear` it wraps a `QLinear` in, as the `nn.Linear` that a `QLinear` is) for
outputs, gradients, adapter files and graph-break counts; the same step without gradient
checkpointing for the checkpointed gradients; the packed tensors copied before training or saving.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import loracast  # noqa: E402
from bnb_models import _saved_llama, copy_lora  # noqa: E402
from loracast import LoraConfig, RequantizationWarning, get_peft_model  # noqa: E402
from loracast.layers import LoraLayer  # noqa: E402
from loracast.quant import find_backend  # noqa: E402
from loracast.quant.merge import requantization_record  # noqa: E402
from quant_adapters import one_layer_config, peft_one_layer_config, randomize_b  # noqa: E402

BACKENDS = ("hqq", "quanto")
# PEFT's "all-linear" looks for nn.Linear (an HQQLinear is not one): both libraries get the names
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _helpers(backend: str):
    """The backend's model helpers (tests/hqq_models.py, tests/quanto_models.py); skips when the
    backend is not installed."""
    if backend == "hqq":
        pytest.importorskip("hqq")
        import hqq_models
        return hqq_models
    pytest.importorskip("optimum.quanto")
    import quanto_models
    return quanto_models


def _llama(backend: str, dtype: str = "bf16") -> nn.Module:
    """The tiny Llama of conftest with 4-bit linear layers (the head stays float)."""
    helpers = _helpers(backend)
    return helpers.load_llama(4, dtype) if backend == "hqq" else helpers.load_llama("qint4", dtype)


def _one_layer(backend: str) -> nn.Sequential:
    helpers = _helpers(backend)
    return nn.Sequential(helpers.hqq_linear(4)) if backend == "hqq" else helpers.quanto_model("qint4")


def _seeded(model: nn.Module, std: float = 0.02) -> nn.Module:
    """`model` with every lora_B drawn from N(0, std), seeded by its name (so merges change the base)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std, generator=torch.Generator().manual_seed(len(name)))
    return model


def _packed(backend: str, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    helpers = _helpers(backend)
    return [helpers.packed(m) for m in model.modules() if find_backend(m) is not None]


def _same_packed(backend: str, model: nn.Module, before: list[dict[str, torch.Tensor]]) -> bool:
    helpers = _helpers(backend)
    layers = [m for m in model.modules() if find_backend(m) is not None]
    return len(layers) == len(before) and all(helpers.same_packed(m, b) for m, b in zip(layers, before))


# -- loaded through transformers -------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_transformers_hqq_config_does_not_load_and_quantize_base_gives_its_layers():
    """transformers 5.x's HQQ quantizer has no weight conversion for its new loading code
    (`get_quantize_ops` is missing: NotImplementedError on any device); the supported path is a float
    load and loracast's `quantize_base`, whose layers carry the weight settings `HqqConfig` would give."""
    pytest.importorskip("hqq")
    from transformers import AutoModelForCausalLM, HqqConfig

    with pytest.raises(NotImplementedError, match="HQQ is not available yet"):
        AutoModelForCausalLM.from_pretrained(_saved_llama(False), quantization_config=HqqConfig(nbits=4, group_size=32),
                                             dtype=torch.bfloat16)
    model = _llama("hqq")
    wanted = HqqConfig(nbits=4, group_size=32).quant_config["weight_quant_params"]
    layers = [m for m in model.modules() if find_backend(m) is not None]
    assert len(layers) == 14 and all(m.quant_config["weight_quant_params"] == wanted for m in layers)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("weights", "dtype"), [("int8", "fp32"), ("int4", "bf16")])
def test_a_quanto_config_model_adapts_as_peft(weights, dtype, tmp_path):
    """transformers' QuantoConfig gives frozen QLinear layers: adapted with fp32 adapters (the compute
    dtype with autocast_adapter_dtype=False), logits and adapter gradients equal PEFT's (fp32: 1e-5
    relative; bf16: one bf16 rounding, as loracast rounds the sum once), files load both ways."""
    pytest.importorskip("optimum.quanto")
    from transformers import AutoModelForCausalLM, QuantoConfig

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def load() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(_saved_llama(False), quantization_config=QuantoConfig(weights=weights),
                                                    dtype=torch_dtype)

    flag_off = get_peft_model(load(), LoraConfig(target_modules="all-linear"), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in flag_off.named_parameters() if "lora_" in n} == {torch_dtype}
    ours = _seeded(get_peft_model(load(), LoraConfig(target_modules="all-linear")))
    theirs = peft.get_peft_model(load(), peft.LoraConfig(target_modules="all-linear"))
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14 and all(find_backend(m.base_layer).name == "quanto" for m in layers)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    copy_lora(ours, theirs)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == "fp32" else dict(rtol=1.6e-2, atol=2e-2)
    out_ours, out_theirs = ours(input_ids=IDS, labels=IDS), theirs(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **tolerance)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads) == 28
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], **tolerance)

    with torch.no_grad():
        expected = ours(input_ids=IDS).logits
    ours.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(load(), tmp_path / "ours")(input_ids=IDS).logits,
                                   expected, **tolerance)
        expected = theirs(input_ids=IDS).logits
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loracast.PeftModel.from_pretrained(load(), tmp_path / "theirs")(input_ids=IDS).logits,
                                   expected, **tolerance)


# -- training with k-bit preparation and gradient checkpointing ------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_kbit_preparation_and_checkpointing_train(backend, reentrant):
    """prepare_model_for_kbit_training, then gradient checkpointing (reentrant or not): the first
    step's adapter gradients equal those of the same step without checkpointing (fp32, 1e-5), five
    AdamW steps lower the loss with finite gradients, and the packed base weights do not change."""
    plain = _seeded(get_peft_model(_llama(backend, "fp32"), LoraConfig(target_modules="all-linear",
                                                                        init_lora_weights="gaussian"))).train()
    model = loracast.prepare_model_for_kbit_training(_llama(backend, "fp32"), use_gradient_checkpointing=False)
    # transformers 5's name for gradient_checkpointing_enable (deprecated)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpointing needs an input that requires grad, as PEFT's preparation gives
        model.enable_input_require_grads()
    before = _packed(backend, model)
    model = _seeded(get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights="gaussian"))).train()
    assert model.base_model.model.is_activation_checkpointing
    copy_lora(plain, model)
    plain(input_ids=IDS, labels=IDS).loss.backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert len(grads) == 28 and all(g is not None and torch.isfinite(g).all() for g in grads.values())
        if step == 0:
            for name, grad in grads.items():
                torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert _same_packed(backend, model, before)


# -- torch.compile ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # read by PEFT
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_compiled_llama_forward_breaks_its_graph_no_more_than_peft(backend):
    """`torch._dynamo.explain` of a training forward of the LoRA Llama: loracast and PEFT both trace it
    in one graph (0 graph breaks; only dynamo's tracing runs, no compiler: a few seconds)."""
    counts = {}
    for library, model in (("loracast", get_peft_model(_llama(backend, "fp32"), LoraConfig(target_modules=LINEARS))),
                           ("peft", peft.get_peft_model(_llama(backend, "fp32"), peft.LoraConfig(target_modules=LINEARS)))):
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(model)(input_ids=IDS, use_cache=False)  # a training forward
        finally:
            torch._dynamo.reset()
        counts[library] = (explained.graph_break_count, explained.graph_count)
    assert counts["loracast"] == counts["peft"] == (0, 1)


# -- merge_and_unload, saved and reloaded ----------------------------------------------------------

def _merged(backend: str, model: nn.Module) -> nn.Module:
    before = _packed(backend, model)
    lora = _seeded(get_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights="gaussian")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        plain = lora.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not _same_packed(backend, plain, before)  # the adapters went into the quantized weights
    return plain


def test_a_merged_hqq_model_saves_and_reloads_bit_for_bit(tmp_path):
    """hqq's HQQLinear state dict (codes and metadata) through torch.save, loaded into the same model
    quantized afresh: equal logits. (hqq's AutoHQQHFModel.from_quantized casts the rotary buffers
    to the compute dtype, and transformers 5.x loads no HQQ checkpoint.)"""
    plain = _merged("hqq", _llama("hqq"))
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
    torch.save(plain.state_dict(), tmp_path / "merged.pt")
    fresh = _llama("hqq")
    fresh.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_merged_quanto_model_saves_and_reloads_bit_for_bit(tmp_path):
    """quanto's own serialization (the state dict as safetensors, its quantization map, `requantize`
    into the float model built from the config): equal logits. transformers' save_pretrained refuses
    quanto models ("not serializable")."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import quantization_map, requantize
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, QuantoConfig

    plain = _merged("quanto", AutoModelForCausalLM.from_pretrained(
        _saved_llama(False), quantization_config=QuantoConfig(weights="int4"), dtype=torch.bfloat16))
    with torch.no_grad():
        expected = plain(input_ids=IDS).logits
    with pytest.raises(ValueError, match="quanto and is not serializable"):
        plain.save_pretrained(tmp_path / "transformers")
    save_file(plain.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "quantization_map.json").write_text(json.dumps(quantization_map(plain)))
    # built on the CPU, not on "meta": requantize keeps the float buffers (rotary frequencies) it finds
    fresh = AutoModelForCausalLM.from_config(plain.config, dtype=torch.bfloat16)
    requantize(fresh, load_file(tmp_path / "model.safetensors"),
               json.loads((tmp_path / "quantization_map.json").read_text()), device=torch.device("cpu"))
    assert find_backend(fresh.model.layers[0].mlp.down_proj).name == "quanto"
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, expected)


# -- precision policies ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_policy_but_fsdp_trains_through_a_4bit_layer(backend):
    """"mixed" and "fast" run the LoRA branch in bf16; oracle: the "stable" output, within one bf16
    rounding. "fsdp" is refused in one line: FSDP cannot flatten the integer codes."""
    helpers = _helpers(backend)
    make = (lambda: nn.Sequential(helpers.hqq_linear(4, torch.bfloat16))) if backend == "hqq" \
        else (lambda: helpers.quanto_model("qint4", torch.bfloat16))
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(8))
    outputs = {}
    for precision in ("stable", "mixed", "fast"):
        model = get_peft_model(make(), one_layer_config(), precision=precision).train()
        randomize_b(model.base_model.model[0], 9)
        inputs = x.clone().requires_grad_(True)
        outputs[precision] = model(inputs)
        outputs[precision].float().square().sum().backward()
        assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    for precision in ("mixed", "fast"):
        torch.testing.assert_close(outputs[precision], outputs["stable"], rtol=1.6e-2, atol=1e-2)
    with pytest.raises(loracast.PrecisionError, match=r"cannot flatten integer tensors.*HQQ and optimum-quanto") as caught:
        get_peft_model(make(), one_layer_config(), precision="fsdp")
    assert "\n" not in str(caught.value)


# -- DoRA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_dora_equals_peft_and_merges_back_exactly(backend, tmp_path):
    """Oracle: PEFT's DoRA on the same 4-bit layer with the same values (float32; outputs and
    gradients within 1e-5; PEFT loads loracast's file to the same outputs); a merge requantizes, an
    unmerge restores every packed element."""
    ours = get_peft_model(_one_layer(backend), one_layer_config(use_dora=True))
    theirs = peft.get_peft_model(_one_layer(backend), peft_one_layer_config(use_dora=True))
    randomize_b(ours.base_model.model[0], 10)
    copy_lora(ours, theirs)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads) == 3  # A, B and the magnitude
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-5)
    ours.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(_one_layer(backend), tmp_path)(x), ours(x),
                                   rtol=1e-5, atol=1e-5)

    base = ours.base_model.model[0].base_layer
    before = _packed(backend, ours)
    with torch.no_grad():
        unmerged = ours(x)
        with pytest.warns(RequantizationWarning):
            ours.merge_adapter()
        # within the requantization the warning reports: |y - y'| <= sum_j |x_j| * max |W - W'|
        bound = x.abs().sum(dim=1, keepdim=True) * requantization_record(base).max_abs
        assert bool(((ours(x) - unmerged).abs() <= bound * 1.001 + 1e-5).all())
        assert not _same_packed(backend, ours, before)
        ours.unmerge_adapter()
        assert _same_packed(backend, ours, before) and ours.base_model.model[0].base_layer is base
        assert torch.equal(ours(x), unmerged)  # the cached norm follows the restored weight
