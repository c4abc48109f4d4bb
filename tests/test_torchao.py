"""LoRA on torchao-quantized layers (int8 weight-only and int4 per-group weight-only, on the CPU).

Oracles: PEFT 0.21.2's `TorchaoLoraLinear` for adapter dtypes, forward outputs, gradients and
adapter files (both directions; PEFT adapts both formats here, int4 as `IntxUnpackedToInt8Tensor`);
torchao's own `quantize_` applied to the exact merged weight (the requantized layer must hold
exactly what torchao makes of it); a float64 reference ``W + B @ A * scaling`` built by hand for
the reported rounding error; the packed tensors copied before a merge (unmerge must give them back
with 0 elements changed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")  # an optional dependency: `pip install 'loracast[torchao]'`
peft = pytest.importorskip("peft")

import loracast  # noqa: E402
from bnb_models import copy_lora  # noqa: E402
from loracast import ConfigError, LoraConfig, RequantizationWarning, get_peft_model  # noqa: E402
from loracast.layers import LoraLayer  # noqa: E402
from loracast.layers.merge import exact_sum  # noqa: E402
from loracast.quant import find_backend  # noqa: E402
from loracast.quant.merge import requantization_record  # noqa: E402
from loracast.quant.torchao import layer_config, quantize_base, torchao_config  # noqa: E402
from quant_adapters import one_layer_config, peft_one_layer_config  # noqa: E402
from torchao_models import (  # noqa: E402
    DTYPES,
    KINDS,
    config_for,
    float_linear,
    load_llama,
    packed,
    quantized_linear,
    same_packed,
)

pytestmark = pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated:UserWarning")


def _wrap(layer: nn.Module, **kwargs):
    model = get_peft_model(nn.Sequential(layer), one_layer_config(), **kwargs)
    return model, model.base_model.model[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_the_compute_dtype_rule_as_peft(kind, dtype, autocast):
    ours = get_peft_model(nn.Sequential(quantized_linear(kind, DTYPES[dtype])), one_layer_config(),
                          autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(nn.Sequential(quantized_linear(kind, DTYPES[dtype])), peft_one_layer_config(),
                                 autocast_adapter_dtype=autocast)
    layer = ours.base_model.model[0]
    assert find_backend(layer.base_layer).name == {"int8": "torchao-int8", "int4": "torchao-intx"}[kind]
    expected = torch.float32 if autocast else DTYPES[dtype]  # fp32 adapters by default, else the compute dtype
    assert layer.lora_A["default"].weight.dtype == expected
    assert theirs.base_model.model[0].lora_A["default"].weight.dtype == expected


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_outputs_and_gradients_equal_peft(kind, dtype):
    """Oracle: PEFT's TorchaoLoraLinear with the same LoRA values; tolerance 1e-5 relative."""
    ours = get_peft_model(nn.Sequential(quantized_linear(kind, DTYPES[dtype])), one_layer_config())
    theirs = peft.get_peft_model(nn.Sequential(quantized_linear(kind, DTYPES[dtype])), peft_one_layer_config())
    copy_lora(ours, theirs)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.dtype == out_theirs.dtype == DTYPES[dtype]
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5 if dtype == "fp32" else 1e-2)
    out_ours.float().square().sum().backward()
    out_theirs.float().square().sum().backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads_theirs[name], rtol=1e-5 if dtype == "fp32" else 2e-2,
                                       atol=1e-5 if dtype == "fp32" else 1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_files_load_both_ways_with_equal_outputs(kind, tmp_path):
    """Oracle: each library's own outputs on the same torchao base (float32, so equal within 1e-5)."""
    ours = get_peft_model(nn.Sequential(quantized_linear(kind)), one_layer_config(init_lora_weights="gaussian"))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(nn.Sequential(quantized_linear(kind)), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-6)

    source = peft.get_peft_model(nn.Sequential(quantized_linear(kind)), peft_one_layer_config(init_lora_weights="gaussian"))
    with torch.no_grad():
        source.base_model.model[0].lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(3))
        expected = source(x)
    source.save_pretrained(tmp_path / "theirs")
    loaded = loracast.PeftModel.from_pretrained(nn.Sequential(quantized_linear(kind)), tmp_path / "theirs")
    assert find_backend(loaded.base_model.model[0].base_layer) is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,asymmetric", [("int8", False), ("int4", False), ("int4", True)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_requantizes_the_exact_sum_and_unmerge_restores_every_element(kind, asymmetric, dtype):
    base = quantized_linear(kind, DTYPES[dtype], asymmetric)
    model, lora = _wrap(base)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.05, generator=torch.Generator().manual_seed(4))
    before, original_weight = packed(base), base.weight
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    with torch.no_grad():
        unmerged = model(x)
    original = base.weight.dequantize()
    exact = exact_sum(original, [lora.get_delta_weight("default")])

    with pytest.warns(RequantizationWarning, match=r"max \|error\| [0-9.e-]+ \(in a torchao .*rms adapter delta"):
        model.merge_adapter()
    # oracle: torchao's own quantizer, with the config the user quantized with, on the exact merged weight
    reference = float_linear(dtype=DTYPES[dtype], bias=False)
    reference.weight = nn.Parameter(exact.clone(), requires_grad=False)
    from torchao.quantization import quantize_
    quantize_(reference, config_for(kind, asymmetric))
    assert same_packed(lora.base_layer, packed(reference))
    assert layer_config(lora.base_layer).source == "inferred"
    with torch.no_grad():
        merged = model(x)
    assert not torch.equal(merged, unmerged)
    # the rounding of W + delta to the grid (a step of max|w|/127 per row for int8, max|w|/7 per group for int4)
    torch.testing.assert_close(merged, unmerged, atol=0.1 if kind == "int8" else 0.5, rtol=0)

    model.merge_adapter()  # merging again is a no-op
    assert same_packed(lora.base_layer, packed(reference))
    model.unmerge_adapter()
    assert lora.base_layer.weight is original_weight
    assert same_packed(lora.base_layer, before)  # 0 elements changed
    assert requantization_record(lora.base_layer) is None
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize("kind", KINDS)
def test_reported_error_is_the_rounding_against_a_float64_reference(kind):
    """Oracle: W0 + B @ A * scaling in float64, built by hand from the dequantized base; the error of
    each element is at most half a quantization step of its row (int8) or group (int4)."""
    base = quantized_linear(kind)
    model, lora = _wrap(base)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.05, generator=torch.Generator().manual_seed(5))
    a, b = lora.lora_A["default"].weight.detach().double(), lora.lora_B["default"].weight.detach().double()
    reference = base.weight.dequantize().double() + (b @ a) * lora.scaling["default"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
    merged_weight = lora.base_layer.weight
    error = merged_weight.dequantize().double() - reference
    record = requantization_record(lora.base_layer)
    # the record measures against the float32-rounded sum: equal to the float64 one within float32 rounding
    assert record.max_abs == pytest.approx(float(error.abs().max()), rel=1e-5, abs=1e-7)
    assert record.rms == pytest.approx(float(error.pow(2).mean().sqrt()), rel=1e-4)
    assert record.delta_rms == pytest.approx(float(((b @ a) * lora.scaling["default"]).pow(2).mean().sqrt()), rel=1e-5)
    group = 64 if kind == "int8" else 32
    step = merged_weight.scale.double().repeat_interleave(group, dim=1)  # (out, in): each element's grid step
    assert bool((error.abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    assert record.max_abs > 0


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_a_torchao_model_that_saves_and_reloads(kind, tmp_path):
    base = quantized_linear(kind)
    model, lora = _wrap(base)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.05, generator=torch.Generator().manual_seed(6))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        model.merge_adapter()
        with torch.no_grad():
            merged = model(x)
        plain = model.merge_and_unload()
    assert type(plain[0]) is nn.Linear and find_backend(plain[0]) is not None
    assert requantization_record(plain[0]) is not None  # the doctor still sees the rounding
    with torch.no_grad():
        assert torch.equal(plain(x), merged)
    torch.save(plain.state_dict(), tmp_path / "merged.pt")
    fresh = nn.Sequential(quantized_linear(kind, seed=9))
    fresh.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True), assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), merged)


def test_quantize_base_records_its_config_and_leaves_the_head():
    model = load_llama("int4", "fp32")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert layer_config(q_proj).source == "supplied"
    assert layer_config(q_proj).config is not None and "PerGroup(group_size=32)" in layer_config(q_proj).describe()
    assert find_backend(model.lm_head) is None  # the output head stays float
    with pytest.raises(ConfigError, match="'int8' .* or 'int4'"):
        torchao_config("float8")
    with pytest.raises(ConfigError, match="group_size"):
        quantize_base(nn.Sequential(nn.Linear(48, 8)), "int4", group_size=32)


def test_the_config_read_back_from_the_weight_is_the_users():
    """A layer quantized by the user with torchao's quantize_ is requantized with the same config;
    a transformers TorchAoConfig model the same way."""
    for kind, asymmetric in (("int8", False), ("int4", False), ("int4", True)):
        user = config_for(kind, asymmetric)
        inferred = layer_config(quantized_linear(kind, asymmetric=asymmetric)).config
        for field in ("granularity", "weight_dtype", "mapping_type"):
            assert getattr(inferred, field, None) == getattr(user, field, None), (kind, field)
    loaded = load_llama("int8", "bf16", how="transformers")
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer_config(layer).config.granularity == loaded.config.quantization_config.quant_type.granularity


def test_a_llama_trains_merges_and_unmerges_on_both_paths():
    """transformers' TorchAoConfig and loracast's quantize_base: one training step changes the
    adapters, a merge requantizes every adapted layer, an unmerge restores every packed tensor."""
    for how in ("transformers", "quantize_base"):
        model = get_peft_model(load_llama("int8", "bf16", how), LoraConfig(target_modules="all-linear"))
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        before = [packed(m.base_layer) for m in layers]
        with torch.no_grad():
            for m in layers:
                m.lora_B["default"].weight.normal_(std=0.02)
        with pytest.warns(RequantizationWarning, match=f"merging into {len(layers)} quantized layer"):
            model.merge_adapter()
        model.unmerge_adapter()
        assert all(same_packed(m.base_layer, b) for m, b in zip(layers, before))


class _Opaque(torch.Tensor):
    """A quantized weight type loracast knows nothing of: a wrapper subclass with its own dispatch."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    def __init__(self, data):
        self.data_ = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter(...) detaches its data
            return cls(args[0].data_)
        raise NotImplementedError(f"{func} on an opaque weight")


def test_unknown_quantized_weight_types_are_refused_before_anything_changes():
    layer = float_linear()
    layer.weight = nn.Parameter(_Opaque(layer.weight.detach()), requires_grad=False)
    model = nn.Sequential(layer, nn.Linear(48, 8))
    with pytest.raises(ConfigError, match=r"weight of '0' is a test_torchao\._Opaque, a quantized tensor type "
                                          r"loracast does not adapt") as caught:
        get_peft_model(model, one_layer_config(target_modules=["0", "1"]))
    assert "\n" not in str(caught.value)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # nothing was wrapped

    from torchao.quantization import Float8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, quantize_
    for config, name in ((Float8WeightOnlyConfig(), "Float8Tensor"),
                         (Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), "Int8Tensor")):
        layer = float_linear()
        quantize_(layer, config)
        with pytest.raises(ConfigError, match=f"torchao.*{name}.*Int4WeightOnlyConfig weights need a GPU kernel"):
            get_peft_model(nn.Sequential(layer), one_layer_config())


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("how", ["quantize_base", "transformers"])
def test_kbit_preparation_and_a_checkpointed_step_equal_peft(how):
    """Oracle: PEFT's prepare_model_for_kbit_training and get_peft_model on the same torchao Llama,
    with the same LoRA values: the same parameter dtypes, loss and adapter gradients (bf16 model,
    float32 adapters; tolerance 1e-5 relative)."""
    ours = loracast.prepare_model_for_kbit_training(load_llama("int8", "bf16", how))
    theirs = peft.prepare_model_for_kbit_training(load_llama("int8", "bf16", how))
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert ours.is_activation_checkpointing
    if how == "quantize_base":  # no transformers quantization config: PEFT does not see a quantized model here
        assert not theirs.is_activation_checkpointing
        theirs.enable_input_require_grads()  # what PEFT does for the models it sees as quantized
        theirs.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ours = get_peft_model(ours, LoraConfig(target_modules="all-linear", init_lora_weights="gaussian")).train()
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(target_modules="all-linear", init_lora_weights="gaussian"))
    theirs.train()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    copy_lora(ours, theirs)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loss_ours, loss_theirs = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=0)
    loss_ours.backward()
    loss_theirs.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_every_precision_policy_trains_through_a_torchao_layer(kind):
    """"mixed" computes the LoRA branch in bf16 (its fused matmul-add must not reach the torchao
    weight, which has no in-place addmm); oracle: the "stable" output, within one bf16 rounding."""
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(8))
    outputs = {}
    for precision in ("stable", "mixed", "fast"):
        model = get_peft_model(nn.Sequential(quantized_linear(kind, torch.bfloat16)),
                               one_layer_config(init_lora_weights="gaussian"), precision=precision).train()
        with torch.no_grad():
            model.base_model.model[0].lora_B["default"].weight.normal_(std=0.05, generator=torch.Generator().manual_seed(9))
        inputs = x.clone().requires_grad_(True)
        outputs[precision] = model(inputs)
        outputs[precision].float().square().sum().backward()
        assert inputs.grad is not None and torch.isfinite(inputs.grad).all()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    for precision in ("mixed", "fast"):
        torch.testing.assert_close(outputs[precision], outputs["stable"], rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_dora_on_torchao_equals_peft(kind):
    """Oracle: PEFT's DoRA on the same torchao layer with the same values (float32; 1e-5)."""
    ours = get_peft_model(nn.Sequential(quantized_linear(kind)), one_layer_config(use_dora=True))
    theirs = peft.get_peft_model(nn.Sequential(quantized_linear(kind)), peft_one_layer_config(use_dora=True))
    with torch.no_grad():
        ours.base_model.model[0].lora_B["default"].weight.normal_(std=0.05, generator=torch.Generator().manual_seed(10))
    copy_lora(ours, theirs)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_a_torchao_lora_layer_compiles_without_graph_breaks_as_peft():
    """Oracle: PEFT's TorchaoLoraLinear, which torch.compile traces in one graph."""
    x = torch.randn(4, 64)
    for model in (get_peft_model(nn.Sequential(quantized_linear("int8")), one_layer_config()),
                  peft.get_peft_model(nn.Sequential(quantized_linear("int8")), peft_one_layer_config())):
        torch._dynamo.reset()
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
    torch._dynamo.reset()
