"""DDP (`DistributedDataParallel`) for loracast models.

Every rank holds the whole model; DDP averages the gradients of the trainable parameters (the
adapters, in their own dtype) after each backward, so the replicas stay identical. A frozen
bf16 base with fp32 adapters needs nothing special: DDP only reduces what requires grad.
"""

from __future__ import annotations

from torch import nn

from loracast.distributed.runtime import DistContext


def wrap_ddp(model: nn.Module, context: DistContext) -> nn.Module:
    """`model` wrapped in DDP when `context` has several processes, else `model` itself.

    The model must already be on `context.device`.

    Raises:
        ValueError: the model has no trainable parameter, or sits on another device.
    """
    if not context.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError("DDP needs trainable parameters and this model has none; build it with get_peft_model "
                         "(adapters train) before wrapping")
    devices = {p.device for p in params}
    if devices != {context.device}:
        raise ValueError(f"the model's parameters are on {sorted(map(str, devices))} but this rank computes on "
                         f"{context.device}; move it there first: model.to({str(context.device)!r})")
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
