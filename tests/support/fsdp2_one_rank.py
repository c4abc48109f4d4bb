"""FSDP2 with one rank on the machine's device, run by tests/test_cuda_paths.py under
``torchrun --standalone --nproc_per_node 1 tests/support/fsdp2_one_rank.py OUT_DIR`` (NCCL on a GPU, gloo
on the CPU). Trains a bf16 tiny Llama with fp32 adapters sharded and unsharded on the same batches,
saves the sharded adapter and reloads it; writes what it measured to ``OUT_DIR/results.json``.
Tolerances are asserted by the test, not here.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from loracast import PeftModel
from loracast.distributed import shard_model, shutdown
from loracast.distributed.runtime import choose_backend, choose_device, current_context
from tests.support.dist_worker import adapter_values, base_model, global_batches, lora_model, max_diff

LR = 1e-2


def train(model: torch.nn.Module, device: torch.device) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for batch in global_batches():
        ids = batch.to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def on_cpu(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.cpu() for name, value in values.items()}


def probe_logits(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    ids = (torch.arange(16).reshape(2, 8) % 128).to(device)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def main() -> None:
    out = sys.argv[1]
    # init_distributed() starts no group for a single process; FSDP2 needs one, even of one rank
    device = choose_device(int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=choose_backend(device))
    ctx = current_context()
    device = ctx.device
    initial = on_cpu(adapter_values(lora_model(torch.bfloat16)))
    single = lora_model(torch.bfloat16).to(device)  # the oracle: the same steps without FSDP
    train(single, device)
    sharded = lora_model(torch.bfloat16).to(device)
    shard_model(sharded)
    param_types: dict[str, set[str]] = {}
    for name, param in sharded.named_parameters():
        kind = "adapter" if "lora_" in name else "base"
        param_types.setdefault(kind, set()).add(f"{type(param).__name__}:{param.dtype}")
    train(sharded, device)
    values = on_cpu(adapter_values(sharded))
    folder = os.path.join(out, "adapter")
    sharded.save_pretrained(folder, is_main_process=ctx.is_main)
    dist.barrier()
    sharded_logits = probe_logits(sharded, device)
    loaded = PeftModel.from_pretrained(base_model(torch.bfloat16).to(device), folder)
    results = {"backend": ctx.backend, "device": str(device),
               "param_types": {kind: sorted(types) for kind, types in param_types.items()},
               "moved": max_diff(values, initial),
               "max_diff_vs_single": max_diff(values, on_cpu(adapter_values(single))),
               "loaded_dtypes": sorted({str(p.dtype) for n, p in loaded.named_parameters() if "lora_" in n}),
               "logits_loaded_vs_sharded": float((probe_logits(loaded, device) - sharded_logits).abs().max()),
               "logit_scale": float(sharded_logits.abs().max())}
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    shutdown()


if __name__ == "__main__":
    main()
