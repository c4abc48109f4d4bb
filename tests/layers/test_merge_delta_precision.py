"""Merging rounds once: the delta is computed in float64, so terms far apart in magnitude still
decide the rounding of the merged weight (an fp32 delta drops them)."""

import torch
from torch import nn

from loracast.layers import Linear
from tests.support.rounding_oracle import nearest_even


def _layer_with(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, adapter_dtype) -> Linear:
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = Linear(base)
    layer.update_layer("default", a.shape[0], float(a.shape[0]), lora_dropout=0.0, init_lora_weights=False,
                       use_rslora=False, lora_bias=False, dtype=adapter_dtype, device=torch.device("cpu"))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    layer.set_adapter("default")
    return layer


def test_merge_rounds_the_exact_sum_once_even_when_fp32_would_drop_a_term():
    # W = 1 (bf16, ulp 2**-7). delta = 2**-8 + 2**-40: the exact sum lies just above the midpoint
    # 1 + 2**-8 and rounds up; in fp32 the 2**-40 term is lost, the sum is a tie and rounds to 1.
    weight = torch.ones(1, 2, dtype=torch.bfloat16)
    a = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[2.0**-8, 2.0**-40]])
    layer = _layer_with(weight, a, b, torch.float32)
    fp32_delta = (b @ a).to(torch.float32)
    assert torch.equal((weight.double() + fp32_delta.double()).to(torch.bfloat16), weight)  # what fp32 would give
    layer.merge()
    exact = nearest_even(weight.double() + b.double() @ a.double(), torch.bfloat16)
    assert torch.equal(layer.base_layer.weight.detach(), exact)
    assert exact[0, 0].item() == 1.0 + 2.0**-7
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.detach(), weight)


def test_random_bf16_merge_equals_single_rounding_of_float64_sum():
    torch.manual_seed(0)
    weight = (torch.randn(96, 160) * 0.02).to(torch.bfloat16)
    for adapter_dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(8, 160) * 0.05
        b = torch.randn(96, 8) * 0.01
        layer = _layer_with(weight, a, b, adapter_dtype)
        a64 = layer.lora_A["default"].weight.detach().double()
        b64 = layer.lora_B["default"].weight.detach().double()
        layer.merge()
        want = nearest_even(weight.double() + (b64 @ a64) * layer.scaling["default"], torch.bfloat16)
        assert torch.equal(layer.base_layer.weight.detach(), want)
        assert layer.get_delta_weight("default").dtype == torch.float64


def _hard_values(dtype: torch.dtype, significand_bits: int) -> torch.Tensor:
    """Random values plus values a hair above/below/at midpoints of `dtype`, both signs."""
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4096, generator=gen, dtype=torch.float64).to(dtype).double()  # representable values
    ulp = torch.ldexp(torch.ones_like(grid), torch.frexp(grid)[1] - significand_bits)
    midpoints = grid + ulp / 2
    tiny = ulp * 2.0**-30
    values = torch.cat([torch.randn(20000, generator=gen, dtype=torch.float64), midpoints, midpoints + tiny,
                        midpoints - tiny, grid])
    return values


def test_round_once_is_correct_rounding_where_torch_rounds_twice():
    from loracast.layers.merge import round_once

    for dtype, significand_bits in ((torch.bfloat16, 8), (torch.float16, 11)):
        values = _hard_values(dtype, significand_bits)
        want = nearest_even(values, dtype)
        assert torch.equal(round_once(values, dtype), want)
        assert not torch.equal(values.to(dtype), want)  # torch's own cast gets some of these wrong
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e300, -1e300, 1e-300])
    assert torch.equal(round_once(special, torch.bfloat16), special.to(torch.bfloat16))
    assert round_once(torch.tensor([float("nan")], dtype=torch.float64), torch.bfloat16).isnan().all()
