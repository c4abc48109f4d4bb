"""Multi-process checks, run by tests/distributed/test_multiprocess.py under
``torchrun --standalone --nproc_per_node 2 tests/support/dist_worker.py OUT_DIR`` (gloo on the CPU).

One launch runs every check (each process start costs seconds). Every rank trains; rank 0 also
trains the single-process reference on the whole global batch and writes ``OUT_DIR/results.json``:
the largest differences it saw, the dtypes, and the errors the naive FSDP1 wrap raised.
Tolerances are asserted by the test, not here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from loracast import LoraConfig, PeftModel, get_peft_model
from loracast.distributed import (
    FSDPSetupError,
    explain_flatten_errors,
    fsdp1_auto_wrap_policy,
    fsdp1_flatten_problems,
    global_mean_weight,
    init_distributed,
    prepare_quantized_for_sharding,
    rank_share,
    save_adapter,
    shard_model,
    shutdown,
    wrap_ddp,
)
from loracast.files.format import full_tensor
from tests.support.models import tiny_llama_config

STEPS = 3
BATCH_SIZES = [6, 5, 6]  # 5: ranks hold 3 and 2 examples, so the loss weighting is exercised
SEQ = 8
LR = 1e-2


def base_model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).to(dtype)


def lora_model(dtype: torch.dtype, base: torch.nn.Module | None = None) -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = base_model(dtype) if base is None else base
    torch.manual_seed(1)
    return get_peft_model(base, config)


def quantized_base(folder: str, storage: torch.dtype) -> LlamaForCausalLM:
    """The tiny Llama from `folder`, its linear layers in bitsandbytes nf4 stored as `storage`."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_quant_storage=storage)
    return LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                            device_map="cpu")


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (size, SEQ), generator=generator) for size in BATCH_SIZES]


def train(model: torch.nn.Module, rank: int, world: int, accumulate: int = 1) -> list[float]:
    """AdamW steps on each global batch; this rank computes on its share, weighted to the global mean.

    `accumulate` > 1 (one process): the batch is cut into that many shares, as ranks would hold
    them, and their gradients summed before the step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses = []
    for batch in global_batches():
        for part in range(accumulate):
            local = rank_share(batch, rank if accumulate == 1 else part, world if accumulate == 1 else accumulate)
            weight = global_mean_weight(len(local), len(batch), world if accumulate == 1 else accumulate)
            loss = model(input_ids=local, labels=local).loss
            (loss * weight / accumulate).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (gathered) values of every trainable tensor, by name without wrapper prefixes."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            clean = name.replace("module.", "", 1) if name.startswith("module.") else name
            out[clean] = full_tensor(param.detach()).float().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        raise AssertionError(f"different tensors: {sorted(set(a) ^ set(b))[:4]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rank_spread(values: dict[str, torch.Tensor]) -> float:
    """Largest difference between this rank's adapter and rank 0's (reported on every rank)."""
    flat = torch.cat([values[k].flatten() for k in sorted(values)])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(2 * SEQ).reshape(2, SEQ) % 128
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def reload_logits(folder: str, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, str]]:
    loaded = PeftModel.from_pretrained(base_model(dtype), folder)
    dtypes = {n: str(p.dtype) for n, p in loaded.named_parameters() if "lora_" in n}
    return probe_logits(loaded), dtypes


def check_ddp(ctx, out: str, results: dict) -> None:
    reference = lora_model(torch.float32)
    ref_losses = train(reference, 0, 1)
    model = wrap_ddp(lora_model(torch.float32), ctx)
    start = time.perf_counter()
    losses = train(model, ctx.rank, ctx.world_size)
    seconds = time.perf_counter() - start
    values = adapter_values(model)
    spread = rank_spread(values)
    folder = os.path.join(out, "ddp_adapter")
    save_adapter(model, folder)
    if ctx.is_main:
        saved = adapter_values(PeftModel.from_pretrained(base_model(torch.float32), folder, is_trainable=True))
        results["ddp"] = {"max_diff_vs_single": max_diff(values, adapter_values(reference)),
                          "rank_spread": spread, "saved_vs_live": max_diff(saved, values),
                          "moved": max_diff(values, adapter_values(lora_model(torch.float32))),
                          "losses": losses, "ref_losses": ref_losses, "train_s": seconds}


def check_fsdp2(ctx, out: str, results: dict, reference: PeftModel, accumulated: PeftModel) -> None:
    model = lora_model(torch.bfloat16)
    shard_model(model)
    dtypes = {}
    for name, param in model.named_parameters():
        kind = "adapter" if "lora_" in name else "base"
        dtypes.setdefault(kind, set()).add(f"{type(param).__name__}:{param.dtype}")
    train(model, ctx.rank, ctx.world_size)
    values = adapter_values(model)  # collective
    spread = rank_spread(values)
    folder = os.path.join(out, "fsdp2_adapter")
    model.save_pretrained(folder, is_main_process=ctx.is_main)  # collective: every rank gathers
    dist.barrier()
    sharded_logits = probe_logits(model)  # collective
    if ctx.is_main:
        logits, loaded_dtypes = reload_logits(folder, torch.bfloat16)
        results["fsdp2"] = {"param_types": {k: sorted(v) for k, v in dtypes.items()},
                            "max_diff_vs_single": max_diff(values, adapter_values(reference)),
                            "max_diff_vs_accumulated": max_diff(values, adapter_values(accumulated)),
                            "rank_spread": spread, "loaded_dtypes": sorted(set(loaded_dtypes.values())),
                            "logits_loaded_vs_sharded": float((logits - sharded_logits).abs().max()),
                            "logit_scale": float(sharded_logits.abs().max())}
    # fp32 adapters computed in bf16 (gathered in bf16), still sharded and stepped in fp32
    fast = lora_model(torch.bfloat16)
    shard_model(fast, compute_dtype=torch.bfloat16)
    fast_losses = train(fast, ctx.rank, ctx.world_size)
    if ctx.is_main:
        results["fsdp2"]["bf16_compute"] = {
            "losses": fast_losses,
            "adapter_dtypes": sorted({str(p.dtype) for n, p in fast.named_parameters() if p.requires_grad})}


def check_fsdp1(ctx, out: str, results: dict, reference: PeftModel, accumulated: PeftModel) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, transformer_auto_wrap_policy

    cpu = torch.device("cpu")
    report: dict = {}
    # the wraps users write: accelerate's TRANSFORMER_BASED_WRAP (a function) and torch's ModuleWrapPolicy
    naive_policies = {"transformer_auto_wrap_policy": partial(transformer_auto_wrap_policy,
                                                              transformer_layer_cls={LlamaDecoderLayer}),
                      "ModuleWrapPolicy": ModuleWrapPolicy({LlamaDecoderLayer})}
    for use_orig in (False, True):
        naive_report = {}
        for policy_name, naive in naive_policies.items():
            model = lora_model(torch.bfloat16)
            predicted = sorted({p.kind for p in fsdp1_flatten_problems(model, naive, use_orig_params=use_orig)})
            try:
                with explain_flatten_errors():
                    FSDP(model, auto_wrap_policy=naive, use_orig_params=use_orig, device_id=cpu)
                raised = None
            except FSDPSetupError as exc:
                raised = {"torch": str(exc.__cause__).splitlines()[0], "loracast": str(exc)}
            naive_report[policy_name] = {"predicted": predicted, "raised": raised}
        model = lora_model(torch.bfloat16)
        policy = fsdp1_auto_wrap_policy(model)
        remaining = [str(p) for p in fsdp1_flatten_problems(model, policy, use_orig_params=use_orig)]
        wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=use_orig, device_id=cpu)
        train(wrapped, ctx.rank, ctx.world_size)
        folder = os.path.join(out, f"fsdp1_adapter_{use_orig}")
        save_adapter(wrapped, folder)
        sharded_logits = probe_logits(wrapped)  # collective
        entry = {"naive": naive_report, "policy_problems": remaining}
        if ctx.is_main:
            saved = adapter_values(PeftModel.from_pretrained(base_model(torch.bfloat16), folder, is_trainable=True))
            logits, loaded_dtypes = reload_logits(folder, torch.bfloat16)
            entry.update({"saved_vs_single": max_diff(saved, adapter_values(reference)),
                          "saved_vs_accumulated": max_diff(saved, adapter_values(accumulated)),
                          "loaded_dtypes": sorted(set(loaded_dtypes.values())),
                          "logits_loaded_vs_sharded": float((logits - sharded_logits).abs().max())})
        report[f"use_orig_params={use_orig}"] = entry
    results["fsdp1"] = report


def check_4bit(ctx, out: str, results: dict) -> None:
    """QLoRA-style bases: nf4 weights stored as bf16 (FSDP1 and FSDP2) or uint8 (FSDP2; FSDP1 refuses)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    folder = os.path.join(out, "tiny_llama")
    if ctx.is_main:
        base_model(torch.float32).save_pretrained(folder)
    dist.barrier()
    report: dict = {}
    integer = lora_model(torch.bfloat16, quantized_base(folder, torch.uint8))
    predicted = sorted({p.kind for p in fsdp1_flatten_problems(integer, fsdp1_auto_wrap_policy(integer))})
    try:
        with explain_flatten_errors():
            FSDP(integer, auto_wrap_policy=fsdp1_auto_wrap_policy(integer), device_id=torch.device("cpu"))
        raised = None
    except FSDPSetupError as exc:
        raised = str(exc.__cause__)
    report["fsdp1_uint8"] = {"predicted": predicted, "raised": raised}
    for version, storage in (("fsdp1", torch.bfloat16), ("fsdp2", torch.bfloat16), ("fsdp2", torch.uint8)):
        model = lora_model(torch.bfloat16, quantized_base(folder, storage))
        if version == "fsdp1":
            wrapped = FSDP(model, auto_wrap_policy=fsdp1_auto_wrap_policy(model), device_id=torch.device("cpu"))
        else:
            wrapped = shard_model(model)
        wrapped.eval()  # on AVX512-BF16 CPUs bitsandbytes would repack the gathered weights here
        first, second = probe_logits(wrapped), probe_logits(wrapped)
        wrapped.train()
        losses = train(wrapped, ctx.rank, ctx.world_size)
        adapter = os.path.join(out, f"{version}_{storage}_4bit")
        save_adapter(wrapped, adapter)
        trained = probe_logits(wrapped)
        if ctx.is_main:
            single = lora_model(torch.bfloat16, quantized_base(folder, storage))
            prepare_quantized_for_sharding(single)
            single.eval()
            loaded = PeftModel.from_pretrained(quantized_base(folder, storage), adapter)
            prepare_quantized_for_sharding(loaded)  # the same 4-bit kernel as the sharded model
            report[f"{version}_{str(storage).removeprefix('torch.')}"] = {
                "eval_repeat_diff": float((first - second).abs().max()),
                "eval_vs_single": float((first - probe_logits(single)).abs().max()),
                "loaded_vs_sharded": float((probe_logits(loaded) - trained).abs().max()),
                "losses": losses}
    results["4bit"] = report


def main() -> None:
    out = sys.argv[1]
    ctx = init_distributed()
    results: dict = {"backend": ctx.backend, "world_size": ctx.world_size}
    check_ddp(ctx, out, results)
    reference = lora_model(torch.bfloat16)  # single process, whole global batches: the FSDP oracle
    train(reference, 0, 1)
    accumulated = lora_model(torch.bfloat16)  # single process, the ranks' shares accumulated
    train(accumulated, 0, 1, accumulate=ctx.world_size)
    check_fsdp2(ctx, out, results, reference, accumulated)
    check_fsdp1(ctx, out, results, reference, accumulated)
    check_4bit(ctx, out, results)
    if ctx.is_main:
        with open(os.path.join(out, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
