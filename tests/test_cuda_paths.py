"""Every precision path on the test device: CUDA under ``LORACAST_TEST_DEVICE=cuda``, the CPU in CI.

The tests build everything inside the test body, so the conftest's default-device context puts
models, adapters, PEFT's oracle models and inputs on the test device. On the CPU they run the same
code paths (CPU autocast, a CPU GradScaler, bitsandbytes' CPU kernels); what only a GPU can show
(a CUDA adapter loaded on the CPU, NCCL) is marked ``cuda``.

Oracles: PEFT 0.21 run on the same device with the same adapter values (dtypes equal; outputs within
the per-dtype tolerances named below), float64 sums rounded once (`rounding_oracle`), bitsandbytes'
own quantizer applied to the exact merged weight, and the bytes held before a merge.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import loracast
from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.layers.merge import exact_sum
from tests.support.bnb_models import load_llama, packed_bytes
from tests.support.launch import torchrun
from tests.support.models import copy_params
from tests.support.rounding_oracle import nearest_even

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Autocast runs the same matmuls on both sides; loracast adds the LoRA branch to the base output in
# the wider dtype and rounds once where PEFT rounds the branch first, so a layer may differ by one
# half-precision step of its output; after two decoder layers, a few steps of the logits
# (bf16 eps 7.8e-3, fp16 eps 9.8e-4). Gradients: the same steps, relative to the largest gradient.
AUTOCAST_TOL = {"bf16": 3e-2, "fp16": 5e-3}
QUANT_TOL = 2e-2  # bf16 activations through 4-bit/8-bit bases: as tests/quant/test_bnb_dtypes.py
LOCATION_TOL = 1e-4  # fp32 model on two devices: different kernels, same arithmetic up to summation order


def _ids(device: torch.device, batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed),
                         device="cpu").to(device)


def _pair(make_llama, dtype: torch.dtype, **config):
    """(loracast model, PEFT model) on the same base weights with the same adapter values."""
    config = dict(dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), **config)
    theirs = peft.get_peft_model(make_llama(dtype), peft.LoraConfig(**config))
    ours = get_peft_model(make_llama(dtype), LoraConfig(**config))
    copy_params(theirs, ours)
    return ours, theirs


def _placement(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, str]]:
    return {name: (p.dtype, p.device.type) for name, p in model.named_parameters()}


def _step(model: torch.nn.Module, ids: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """Causal-LM loss on `ids` (under autocast to `amp` when given), backward; returns the logits."""
    with torch.autocast(ids.device.type, dtype=amp, enabled=amp is not None):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return logits.detach()


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adapter_dtypes_and_devices_equal_peft_on_the_test_device(make_llama, device, dtype, autocast):
    config = dict(r=4, target_modules="all-linear")
    theirs = peft.get_peft_model(make_llama(dtype), peft.LoraConfig(**config), autocast_adapter_dtype=autocast)
    ours = get_peft_model(make_llama(dtype), LoraConfig(**config), autocast_adapter_dtype=autocast)
    assert _placement(ours) == _placement(theirs)
    assert {p.device.type for p in ours.parameters()} == {device.type}
    expected = torch.float32 if autocast or dtype == torch.float32 else dtype
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {expected}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_forward_and_backward_equal_peft(make_llama, device, amp):
    ours, theirs = _pair(make_llama, torch.float32)
    ids = _ids(device)
    our_logits, their_logits = _step(ours, ids, HALF[amp]), _step(theirs, ids, HALF[amp])
    assert our_logits.dtype == their_logits.dtype == HALF[amp]  # the lm_head ran under autocast
    tol = AUTOCAST_TOL[amp]
    torch.testing.assert_close(our_logits.float(), their_logits.float(), atol=tol, rtol=tol)
    ours_g, theirs_g = _lora_grads(ours), _lora_grads(theirs)
    assert ours_g.keys() == theirs_g.keys()
    scale = max(float(g.abs().max()) for g in theirs_g.values())
    for name, grad in ours_g.items():
        assert grad.dtype == torch.float32, name  # fp32 adapters keep fp32 gradients under autocast
        torch.testing.assert_close(grad, theirs_g[name], atol=tol * scale, rtol=tol, msg=name)


def _train_fp16_with_scaler(model: torch.nn.Module, device: torch.device, steps: int = 4) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    losses = []
    for step in range(steps):
        ids = _ids(device, batch=4, seed=step)
        with torch.autocast(device.type, dtype=torch.float16):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # unscales: raises "Attempting to unscale FP16 gradients" on fp16 adapters
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_fp16_gradscaler_trains_fp32_adapters_like_peft(make_llama, device):
    ours, theirs = _pair(make_llama, torch.float16, init_lora_weights=True)
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.float32}
    base_before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    adapters_before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    our_losses = _train_fp16_with_scaler(ours, device)
    their_losses = _train_fp16_with_scaler(theirs, device)
    assert all(torch.isfinite(torch.tensor(our_losses)))
    # same adapter values, same fp16 base, same steps: the losses follow PEFT's to fp16 precision
    assert our_losses == pytest.approx(their_losses, rel=AUTOCAST_TOL["fp16"], abs=AUTOCAST_TOL["fp16"])
    params = dict(ours.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in base_before.items())  # the fp16 base is frozen
    assert any(not torch.equal(params[n], value) for n, value in adapters_before.items())


QUANT_CASES = {
    "nf4-uint8": dict(bits=4, quant_type="nf4", double_quant=False, storage="uint8"),
    "nf4-double-uint8": dict(bits=4, quant_type="nf4", double_quant=True, storage="uint8"),
    "fp4-uint8": dict(bits=4, quant_type="fp4", double_quant=False, storage="uint8"),
    "nf4-double-bf16storage": dict(bits=4, quant_type="nf4", double_quant=True, storage="bf16"),
    "fp4-double-bf16storage": dict(bits=4, quant_type="fp4", double_quant=True, storage="bf16"),
    "int8": dict(bits=8),
}


def _quantized(device: torch.device, case: str) -> torch.nn.Module:
    return load_llama(dtype="bf16", compute="bf16", device=str(device), **QUANT_CASES[case])


# On the CPU one case keeps this path running (tests/quant/test_bnb_dtypes.py covers bitsandbytes' CPU
# kernels case by case); on CUDA every case runs, since each quant type and storage has its own kernels.
CPU_QUANT_CASE = "nf4-double-uint8"


@pytest.mark.parametrize("case", [case if case == CPU_QUANT_CASE else pytest.param(case, marks=pytest.mark.gpu)
                                  for case in QUANT_CASES])
def test_bitsandbytes_lora_dtypes_outputs_and_gradients_equal_peft(device, case):
    config = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(_quantized(device, case), peft.LoraConfig(**config))
    ours = loracast.get_peft_model(_quantized(device, case), loracast.LoraConfig(**config))
    copy_params(theirs, ours)
    assert _placement(ours) == _placement(theirs)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}
    ours.train(), theirs.train()  # the same bitsandbytes kernels on both sides
    ids = _ids(device)
    our_logits, their_logits = _step(ours, ids), _step(theirs, ids)
    assert our_logits.device.type == device.type and our_logits.dtype == their_logits.dtype == torch.bfloat16
    torch.testing.assert_close(our_logits.float(), their_logits.float(), atol=QUANT_TOL, rtol=QUANT_TOL)
    ours_g, theirs_g = _lora_grads(ours), _lora_grads(theirs)
    scale = max(float(g.abs().max()) for g in theirs_g.values())
    assert scale > 0
    for name, grad in ours_g.items():
        torch.testing.assert_close(grad, theirs_g[name], atol=QUANT_TOL * scale, rtol=QUANT_TOL, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_merge_rounds_once_and_unmerge_restores_the_bits(make_llama, device, dtype):
    model = get_peft_model(make_llama(dtype), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    layers = dict(model.base_model.lora_layers())
    before = {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()}
    expected = {name: nearest_even(before[name].double() + layer.get_delta_weight("default"), dtype)
                for name, layer in layers.items()}
    model.merge_adapter()
    for name, layer in layers.items():
        assert layer.get_base_layer().weight.device.type == device.type
        assert torch.equal(layer.get_base_layer().weight, expected[name]), name
    model.unmerge_adapter()
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight.view(torch.int16), before[name].view(torch.int16)), name


@pytest.mark.parametrize("case", ["nf4-double-uint8", "fp4-double-bf16storage"])
def test_4bit_merge_requantizes_the_exact_sum_and_unmerge_restores_the_bytes(device, case):
    from bitsandbytes import functional as bnb_f

    config = loracast.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    model = loracast.get_peft_model(_quantized(device, case), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    state = base.weight.quant_state
    before = packed_bytes(base)
    exact = exact_sum(bnb_f.dequantize_4bit(base.weight.data, state), [layer.get_delta_weight("default")])
    with pytest.warns(loracast.RequantizationWarning):
        model.merge_adapter()
    merged = layer.get_base_layer()
    expected, _ = bnb_f.quantize_4bit(exact, blocksize=state.blocksize, compress_statistics=state.nested,
                                      quant_type=state.quant_type, quant_storage=base.weight.dtype)
    assert merged.weight.device.type == device.type
    assert torch.equal(merged.weight.data.view(torch.uint8), expected.view(torch.uint8))
    model.unmerge_adapter()
    assert packed_bytes(layer.get_base_layer()) == before


@pytest.mark.gpu
def test_adapter_saved_on_cuda_loads_on_the_cpu_and_the_fingerprint_names_the_move(make_llama, device, tmp_path):
    ours, _ = _pair(make_llama, torch.float32)
    ids = _ids(device)
    with torch.no_grad():
        on_device = ours(input_ids=ids).logits.cpu()
    ours.save_pretrained(tmp_path)
    with torch.device("cpu"):
        cpu_base = copy.deepcopy(make_llama(torch.float32)).to("cpu")
        with pytest.warns(loracast.PrecisionWarning) as said:
            loaded = PeftModel.from_pretrained(cpu_base, tmp_path)
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        with torch.no_grad():
            on_cpu = loaded(input_ids=ids.cpu()).logits
    messages = [str(w.message) for w in said]
    assert any("device type: cuda at save, cpu now" in m for m in messages), messages
    torch.testing.assert_close(on_cpu, on_device, atol=LOCATION_TOL, rtol=LOCATION_TOL)


@pytest.mark.gpu
@pytest.mark.multiprocess
def test_fsdp2_one_rank_over_nccl_trains_like_one_process(tmp_path):
    done = torchrun(["tests/support/fsdp2_one_rank.py", str(tmp_path)], nproc=1, gpus=True)
    assert done.returncode == 0, done.stdout[-6000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backend"] == "nccl" and results["device"].startswith("cuda")
    assert results["param_types"] == {"base": ["DTensor:torch.bfloat16"], "adapter": ["DTensor:torch.float32"]}
    assert results["moved"] > 1e-3  # training changed the adapters, so the comparison means something
    # one rank: the same batches through the same bf16 kernels; allow the bf16 batch-shape tolerance of
    # tests/distributed/test_multiprocess.py for FSDP2's fp32 reduce and cast order
    assert results["max_diff_vs_single"] <= 5e-4
    assert results["loaded_dtypes"] == ["torch.float32"]
    assert results["logits_loaded_vs_sharded"] <= results["logit_scale"] * 2 ** -8


def test_the_test_device_variable_is_read_and_checked():
    from tests.conftest import DEVICE_VARIABLE, read_test_device

    assert read_test_device({}) == torch.device("cpu")
    assert read_test_device({DEVICE_VARIABLE: " cpu "}) == torch.device("cpu")
    with pytest.raises(pytest.UsageError, match="'gpu0' is not a torch device name; use cpu or cuda"):
        read_test_device({DEVICE_VARIABLE: "gpu0"})
    with pytest.raises(pytest.UsageError, match="only cpu and cuda are supported"):
        read_test_device({DEVICE_VARIABLE: "mps"})
    if not torch.cuda.is_available():
        with pytest.raises(pytest.UsageError, match="sees no CUDA device"):
            read_test_device({DEVICE_VARIABLE: "cuda"})
