"""The fast paths of LoRA Linear: "exact" is the general path bit for bit; "fast" is within a
stated tolerance of a float64 oracle and keeps the adapter's precision.

Oracles: `LoraLayer.forward` (the general, op-by-op path) for "exact", compared with
`torch.equal` on outputs and every gradient; a float64 computation of the same layer for
"fast", with tolerances named below.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import loracast
from loracast.layers import Linear, LoraLayer
from loracast.layers.compute.exact import is_exact_power_of_two
from loracast.layers.compute.layer import ComputeLayer
from tests.support.models import train_losses

IN, OUT, R = 24, 40, 4

# "fast" tolerances, as relative Frobenius errors against the float64 oracle: one bf16 rounding
# of the output is 2**-9 relative per element; the branch adds at most one more.
FAST_REL_OUT = {torch.bfloat16: 2**-7, torch.float16: 2**-9, torch.float32: 1e-6}
# weight gradients are sums over tokens of products of rounded activations and rounded grad_h.
FAST_REL_GRAD = {torch.bfloat16: 2**-6, torch.float16: 2**-8, torch.float32: 1e-5}


def make_layer(base_dtype, adapter_dtype, alpha=8.0, dropout=0.0, bias=True, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=bias).to(base_dtype)
    base.requires_grad_(False)
    layer = Linear(base)
    layer.update_layer("default", R, alpha, lora_dropout=dropout, init_lora_weights=False, use_rslora=use_rslora,
                       lora_bias=False, dtype=adapter_dtype, device=torch.device("cpu"))
    layer.set_adapter("default")
    layer.train()
    return layer


def test_linear_provides_what_the_compute_paths_read():
    """`layers/compute/` is typed against `ComputeLayer`, not `Linear`: a LoRA Linear has every member it names."""
    assert isinstance(make_layer(torch.float32, torch.float32), ComputeLayer)
    assert not isinstance(nn.Linear(2, 2), ComputeLayer)


def run(layer, x, grad_out, path, seed=1):
    """Forward + backward through `path` ("general", "exact" or "fast"); output and gradients."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # dropout draws the same mask on every path
    if path == "general":
        out = LoraLayer.forward(layer, x)
    else:
        layer.lora_compute = path
        out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def inputs(dtype, shape=(3, 5), seed=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, IN, generator=gen).to(dtype)
    grad_out = torch.randn(*shape, OUT, generator=gen).to(dtype)
    return x, grad_out


DTYPE_PAIRS = [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("base_dtype,adapter_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("alpha,use_rslora", [(4.0, False), (8.0, False), (32.0, False), (2.0, False),
                                              (6.0, False), (8.0, True)])
def test_exact_mode_is_the_general_path_bit_for_bit(base_dtype, adapter_dtype, alpha, use_rslora):
    layer = make_layer(base_dtype, adapter_dtype, alpha=alpha, use_rslora=use_rslora)
    x, grad_out = inputs(base_dtype)
    for want, got in zip(run(layer, x, grad_out, "general"), run(layer, x, grad_out, "exact")):
        assert want.dtype == got.dtype
        assert torch.equal(want, got)


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_exact_mode_with_dropout_and_other_shapes(base_dtype, adapter_dtype, shape):
    layer = make_layer(base_dtype, adapter_dtype, alpha=16.0, dropout=0.3, bias=False)
    x, grad_out = inputs(base_dtype, shape)
    for want, got in zip(run(layer, x, grad_out, "general"), run(layer, x, grad_out, "exact")):
        assert torch.equal(want, got)


def test_power_of_two_check():
    assert [is_exact_power_of_two(v) for v in (1.0, 2.0, 64.0, 0.5, 1.5, 3.0, math.inf, 0.0, -2.0)] == [
        True, True, True, False, False, False, False, False, False]


def reference64(layer, x, grad_out):
    """The layer's math in float64 from the same (rounded) tensors: output and gradients."""
    base = layer.base_layer
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    out = x64 @ base.weight.double().T + (x64 @ a.T @ b.T) * layer.scaling["default"]
    if base.bias is not None:
        out = out + base.bias.double()
    out.backward(grad_out.double())
    return out.detach(), x64.grad, a.grad, b.grad


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("base_dtype,adapter_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fast_mode_within_tolerance_and_keeps_adapter_dtypes(base_dtype, adapter_dtype, dropout):
    layer = make_layer(base_dtype, adapter_dtype, alpha=12.0, dropout=dropout)
    x, grad_out = inputs(base_dtype, (4, 6))
    out, gx, ga, gb = run(layer, x, grad_out, "fast")
    assert out.dtype == base_dtype and gx.dtype == base_dtype
    assert ga.dtype == adapter_dtype and gb.dtype == adapter_dtype
    compute = base_dtype  # the branch runs in the activation dtype
    slack = 1
    if dropout:
        # the oracle has no dropout: compare against the general path on the same mask instead,
        # which carries its own rounding (its branch runs in the adapter dtype)
        want = run(layer, x, grad_out, "general")
        ref = [t.double() for t in want]
        slack = 2
        if torch.finfo(adapter_dtype).bits < torch.finfo(compute).bits:
            compute = adapter_dtype
    else:
        ref = reference64(layer, x, grad_out)
    assert rel_err(out, ref[0]) <= FAST_REL_OUT[compute] * slack
    assert rel_err(gx, ref[1]) <= FAST_REL_GRAD[compute] * slack
    # weight gradients are rounded once more to the adapter dtype when that is the narrower one
    weight_tol = max(FAST_REL_GRAD[compute], FAST_REL_GRAD[adapter_dtype])
    for got, want in zip((ga, gb), ref[2:]):
        assert rel_err(got, want) <= weight_tol * slack


def test_fast_mode_weight_gradients_are_autocast_style():
    # bf16 activations, fp32 adapters: the weight gradients are bf16 matmuls (exact products,
    # fp32 accumulation, one rounding to bf16) stored in fp32 -- torch.autocast's result.
    layer = make_layer(torch.bfloat16, torch.float32, alpha=8.0)
    x, grad_out = inputs(torch.bfloat16, (64, 8))
    _, _, ga, gb = run(layer, x, grad_out, "fast")
    assert ga.dtype == gb.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run(layer, x, grad_out, "general")
    assert rel_err(gb, auto[3].double()) < 2**-7
    ref = reference64(layer, x, grad_out)
    assert rel_err(gb, ref[3]) < 2**-7 and rel_err(ga, ref[2]) < 2**-7


def test_fast_mode_keeps_small_updates_that_bf16_adapters_lose():
    layer = make_layer(torch.bfloat16, torch.float32, alpha=8.0)
    layer.lora_compute = "fast"
    before = layer.lora_A["default"].weight.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-6)
    x, grad_out = inputs(torch.bfloat16)
    layer(x.requires_grad_(True)).backward(grad_out)
    opt.step()
    after = layer.lora_A["default"].weight.detach()
    assert after.dtype == torch.float32
    changed = after != before
    assert changed.any()
    # the same update applied to bf16 weights is rounded away almost everywhere
    lost = (before.bfloat16() == after.bfloat16()) & changed
    assert lost.float().mean() > 0.5


def test_fast_mode_fuses_a_plain_linear_and_falls_back_for_hooked_bases():
    layer = make_layer(torch.bfloat16, torch.float32)
    x, grad_out = inputs(torch.bfloat16)
    fused = run(layer, x, grad_out, "fast")
    calls = []
    handle = layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    try:
        hooked = run(layer, x, grad_out, "fast")  # the base runs as a module, the branch alone is fused
    finally:
        handle.remove()
    assert calls == [1]
    for a, b in zip(fused, hooked):
        assert rel_err(a, b.double()) <= FAST_REL_GRAD[torch.bfloat16]


def test_fast_mode_on_gpt2_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(OUT, IN).to(torch.bfloat16).requires_grad_(False)
    layer = Linear(base, fan_in_fan_out=True)
    layer.update_layer("default", R, 8.0, lora_dropout=0.0, init_lora_weights=False, use_rslora=False,
                       lora_bias=False, dtype=torch.float32, device=torch.device("cpu"))
    layer.set_adapter("default")
    x, grad_out = inputs(torch.bfloat16)
    general = run(layer, x, grad_out, "general")
    fast = run(layer, x, grad_out, "fast")
    assert rel_err(fast[0], general[0].double()) <= FAST_REL_OUT[torch.bfloat16]
    for a, b in zip(fast[1:], general[1:]):
        assert rel_err(a, b.double()) <= FAST_REL_GRAD[torch.bfloat16]
    assert torch.equal(run(layer, x, grad_out, "exact")[0], general[0])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_cases_outside_the_fast_paths_run_the_general_path(mode):
    layer = make_layer(torch.bfloat16, torch.float32)
    layer.update_layer("other", R, 8.0, lora_dropout=0.0, init_lora_weights=False, use_rslora=False,
                       lora_bias=False, dtype=torch.float32, device=torch.device("cpu"))
    x, grad_out = inputs(torch.bfloat16)
    layer.set_adapter(["default", "other"])  # two active adapters
    assert torch.equal(run(layer, x, grad_out, mode)[0], run(layer, x, grad_out, "general")[0])
    layer.set_adapter("default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(run(layer, x, grad_out, mode)[0], run(layer, x, grad_out, "general")[0])
    layer.merge()
    layer.lora_compute = mode
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
    layer.unmerge()


def test_set_lora_compute_on_a_model(make_llama):
    model = loracast.get_peft_model(make_llama(torch.bfloat16),
                                    loracast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert loracast.get_lora_compute(model) == "exact"
    assert loracast.set_lora_compute(model, "fast") == 14
    assert loracast.get_lora_compute(model) == "fast"
    with pytest.raises(ValueError, match="'exact' .* or 'fast'"):
        loracast.set_lora_compute(model, "quick")
    with pytest.raises(ValueError, match="holds no LoRA Linear layer"):
        loracast.set_lora_compute(nn.Linear(2, 2), "fast")


def _train(model, ids, steps=3):
    return train_losses(model, ids, steps)


def test_fast_mode_trains_like_exact_mode_on_a_bf16_llama(make_llama):
    config = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for mode in ("exact", "fast"):
        torch.manual_seed(0)
        model = loracast.get_peft_model(make_llama(torch.bfloat16), loracast.LoraConfig(**config))
        model.train()
        loracast.set_lora_compute(model, mode)
        losses[mode] = _train(model, ids)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # bf16 forward: the two modes round the LoRA term in different places (~2**-8 relative)
    assert losses["fast"] == pytest.approx(losses["exact"], rel=2e-2)
    assert losses["exact"][-1] < losses["exact"][0]


@pytest.mark.parametrize("lora_alpha,use_rslora", [(16, False), (12, False), (8, True)])
def test_exact_mode_matches_peft_bit_for_bit(make_llama, lora_alpha, use_rslora):
    peft = pytest.importorskip("peft")
    config = dict(r=8, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules="all-linear",
                  init_lora_weights=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = loracast.get_peft_model(make_llama(torch.bfloat16), loracast.LoraConfig(**config))
    theirs = peft.get_peft_model(make_llama(torch.bfloat16), peft.LoraConfig(**config))
    theirs.load_state_dict(ours.state_dict())
    results = []
    for model in (ours, theirs):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_mixed_policy_is_fp32_adapters_computed_fast_and_recorded(make_llama, tmp_path):
    from loracast import PeftModel
    from loracast.errors import PrecisionError

    config = loracast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = loracast.get_peft_model(make_llama(torch.bfloat16), config, precision="mixed")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert loracast.get_lora_compute(model) == "fast"
    model.add_adapter("plain", loracast.LoraConfig(r=4, target_modules=["k_proj"]))
    layers = dict(model.base_model.lora_layers())
    assert layers["model.layers.0.self_attn.k_proj"].lora_compute == "exact"  # stable: the default
    assert layers["model.layers.0.self_attn.q_proj"].lora_compute == "fast"
    with pytest.raises(PrecisionError, match="mixed"):
        loracast.get_peft_model(make_llama(torch.bfloat16), config, precision="mixed", autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path, precision="match-training")
    assert loracast.get_lora_compute(loaded) == "fast"
    assert loracast.get_lora_compute(PeftModel.from_pretrained(make_llama(torch.bfloat16), tmp_path)) == "exact"


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("hooked", [False, True])
def test_inference_without_autograd_gives_the_training_forward(base_dtype, adapter_dtype, mode, hooked):
    # under no_grad the fast paths run their ops directly instead of through an autograd Function
    layer = make_layer(base_dtype, adapter_dtype, alpha=12.0)
    layer.lora_compute = mode
    handle = layer.base_layer.register_forward_hook(lambda *a: None) if hooked else None
    x, _ = inputs(base_dtype)
    with_graph = layer(x.clone().requires_grad_(True)).detach()
    with torch.no_grad():
        without = layer(x)
    assert not without.requires_grad
    assert torch.equal(with_graph, without)
    if handle is not None:
        handle.remove()


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


def test_exact_mode_saves_the_bf16_input_not_its_fp32_copy_with_the_same_gradients():
    # a realistic size (the kernels torch picks depend on it): 2 x 64 tokens, SmolLM2's width, r=16
    torch.manual_seed(0)
    base = nn.Linear(576, 1536, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = Linear(base)
    layer.update_layer("default", 16, 32, lora_dropout=0.0, init_lora_weights="gaussian", use_rslora=False,
                       lora_bias=False, dtype=torch.float32, device=torch.device("cpu"))
    layer.set_adapter("default")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 64, 576).to(torch.bfloat16)
    grad_out = torch.randn(2, 64, 1536).to(torch.bfloat16)
    for want, got in zip(run(layer, x, grad_out, "general"), run(layer, x, grad_out, "exact")):
        assert torch.equal(want, got)
    leaf = x.clone().requires_grad_(True)
    general = _saved_bytes(lambda: LoraLayer.forward(layer, leaf))
    layer.lora_compute = "exact"
    exact = _saved_bytes(lambda: layer(leaf))
    fp32_copy = x.numel() * 4
    assert general - exact >= fp32_copy - x.numel() * 2  # the fp32 copy (4 B/elt) gave way to the bf16 input
