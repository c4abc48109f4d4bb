"""Fixes that did not work as printed: each test reproduces the user's failing step, runs the
doctor, applies the printed fix and runs the step again.

- fp16-trainable: the in-place cast left stale float16 grads ("Attempting to unscale FP16
  gradients" again at the next step) and broke PEFT's modules_to_save copy outside autocast
  ("expected m1 and m2 to have the same dtype, but got: c10::Half != float").
- fsdp-mixed-dtypes / fsdp-storage-dtype: precision="fsdp" alone still fails under FSDP1's default
  use_orig_params=False ("Must flatten tensors with uniform requires_grad", huggingface/peft#1702).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile

import pytest
import torch

import loracast
from loracast import doctor
from tests.support.doctor_fixes import apply_fix, the

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(7))
TARGETS = ["q_proj", "v_proj"]


def amp_step(model, optimizer) -> None:
    """One fp16 mixed-precision step as Trainer(fp16=True) takes it: autocast forward, GradScaler."""
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        loss = model(input_ids=IDS, labels=IDS).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("library", ["peft", "loracast"])
def test_fp16_trainable_fix_lets_the_amp_step_run(library, make_llama):
    """fp16 adapters and an fp16 modules_to_save copy under Trainer(fp16=True): huggingface/peft#341,
    #1249 ("Attempting to unscale FP16 gradients", also from fp16 modules_to_save). Oracle: the AMP
    step raising before the fix and completing after it, with every trainable tensor float32."""
    import peft

    if library == "peft":
        model = peft.get_peft_model(make_llama(torch.float16), peft.LoraConfig(target_modules=TARGETS,
                                    modules_to_save=["lm_head"]), autocast_adapter_dtype=False)
    else:
        model = loracast.get_peft_model(make_llama(torch.float16), loracast.LoraConfig(
            target_modules=TARGETS, modules_to_save=["lm_head"]), precision="fast")
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        amp_step(model, torch.optim.SGD(trainable(model), lr=1e-3))
    finding = the(doctor(model), "fp16-trainable")
    assert ("modules_to_save copies do not cast" in finding.fix) == (library == "peft")
    namespace = apply_fix(finding, 1, model=model, batch={"input_ids": IDS, "labels": IDS})
    assert {p.dtype for p in trainable(model)} == {torch.float32}
    assert all(p.grad is None for p in trainable(model))  # no stale float16 grads
    if library == "peft":  # why the fix says autocast: PEFT's copy does not cast its input
        assert torch.isfinite(namespace["loss"])
        with pytest.raises(RuntimeError, match="same dtype"):
            model(input_ids=IDS)
    amp_step(model, torch.optim.SGD(trainable(model), lr=1e-3))  # the optimizer made again, as the fix says
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable(model))
    assert "fp16-trainable" not in doctor(model).ids


@contextlib.contextmanager
def process_group():
    import torch.distributed as dist

    logging.getLogger("torch.distributed").setLevel(logging.ERROR)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp1():
    """FullyShardedDataParallel with its defaults (use_orig_params=False), on the CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return functools.partial(FullyShardedDataParallel, device_id=torch.device("cpu"))


def fsdp_step(wrapped) -> None:
    wrapped(input_ids=IDS, labels=IDS).loss.backward()


def test_fsdp_mixed_dtypes_fix_wraps_with_fsdp1_defaults(make_llama):
    """A bf16 base with fp32 adapters under FSDP1: "Must flatten tensors with uniform dtype"
    (axolotl-ai-cloud/axolotl#1482, huggingface/trl#1723); the policy precision="fsdp" alone then
    fails with "uniform requires_grad" under use_orig_params=False (huggingface/peft#1702). Oracle:
    FSDP1 wrapping and a forward/backward completing with the printed fix, on PEFT's and loracast's
    models."""
    import peft

    def peft_stable():
        return peft.get_peft_model(make_llama(torch.bfloat16), peft.LoraConfig(target_modules=TARGETS))

    config = loracast.LoraConfig(target_modules=TARGETS)
    stable = loracast.get_peft_model(make_llama(torch.bfloat16), config)
    for model in (peft_stable(), stable):
        finding = the(doctor(model, fsdp=True), "fsdp-mixed-dtypes")
        assert "use_orig_params" in finding.fix and "fsdp1_auto_wrap_policy" in finding.fix
    with process_group():
        with pytest.raises(ValueError, match="uniform dtype"):
            fsdp1()(stable)
        policy_only = loracast.get_peft_model(make_llama(torch.bfloat16), config, precision="fsdp")
        with pytest.raises(ValueError, match="uniform `requires_grad`"):
            fsdp1()(policy_only)
        fixed = apply_fix(finding, base_model=make_llama(torch.bfloat16), config=config,
                          FullyShardedDataParallel=fsdp1())["model"]
        fsdp_step(fixed)
        # the wrap policy alone, adapters kept float32 (the fix's last line), on PEFT's model
        model = peft_stable()
        fsdp_step(fsdp1()(model, auto_wrap_policy=loracast.distributed.fsdp1_auto_wrap_policy(model)))


def test_fsdp_integer_storage_fix_wraps_a_4bit_model_with_fsdp1_defaults():
    """bitsandbytes' default uint8 storage under FSDP1: "Cannot flatten integer dtype tensors"
    (hiyouga/LlamaFactory#3853, axolotl-ai-cloud/axolotl#1494). The printed fix (float storage equal
    to the model dtype, policy "fsdp", the adapters' own units) must wrap with use_orig_params=False
    and run a forward/backward."""
    from transformers import BitsAndBytesConfig

    from tests.support.bnb_models import _saved_llama, load_llama

    config = loracast.LoraConfig(target_modules=TARGETS)
    packed = loracast.get_peft_model(load_llama(4, "bf16", "uint8", "bf16"), config).train()
    finding = the(doctor(packed, fsdp=True), "fsdp-integer-storage")
    with process_group():
        with pytest.raises(ValueError, match="integer dtype|uniform dtype"):  # whichever FSDP meets first
            fsdp1()(packed)
        fixed = apply_fix(finding, name=_saved_llama(False), config=config, BitsAndBytesConfig=BitsAndBytesConfig,
                          FullyShardedDataParallel=fsdp1())["model"]
        fixed.train()
        fsdp_step(fixed)


def small_step_changes(model) -> float:
    """The share of lora_A values one small SGD step (lr 1e-4) changes."""
    params = [p for n, p in model.named_parameters() if "lora_A" in n]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(trainable(model), lr=1e-4)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    return changed / sum(b.numel() for b in before)


def test_bf16_trainable_adapters_lose_small_updates_until_cast_to_fp32(make_llama):
    """bf16 adapters under an optimizer: updates below half a bf16 spacing vanish and training stalls
    while the loss looks flat (keras-team/keras-hub#2629, Adam on bf16 LoRA weights; the README's
    --compare-precision run at lr 1e-4). Made here as PEFT users make it: model.to(bf16) after
    get_peft_model (advised against in huggingface/peft#2421). Oracle: the share of lora_A values a
    small step changes, under 5 % in bf16 and over half after the fix (89.6 % measured)."""
    import peft

    model = peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=TARGETS)).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = (torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype)
    model.train()
    assert small_step_changes(model) < 0.05
    finding = the(doctor(model), "bf16-trainable")
    apply_fix(finding, 1, model=model)
    assert small_step_changes(model) > 0.5 and "bf16-trainable" not in doctor(model).ids
    # a loracast adapter made bf16 by a policy is a decision: not reported
    chosen = loracast.get_peft_model(make_llama(torch.bfloat16), loracast.LoraConfig(target_modules=TARGETS),
                                     precision="fast")
    assert "bf16-trainable" not in doctor(chosen).ids
