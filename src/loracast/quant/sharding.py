"""bitsandbytes 4-bit layers under FSDP: keeping the sharded packed weights intact.

FSDP shards a 4-bit layer's packed weight like any frozen tensor, and bitsandbytes keeps the
quantization state on the layer, so sharding works (FSDP1 needs the packed values in a float
storage dtype, ``bnb_4bit_quant_storage`` equal to the model dtype; FSDP2 also takes uint8).
One thing breaks it: on a CPU with AVX512-BF16, `Linear4bit.forward` in eval mode repacks the
weight it is given, in place, into a CPU-specific layout and flags the shared quantization state
as repacked. Under FSDP that weight is the temporary gathered copy; the next gather brings back
the original layout while the state still says "repacked", and every later forward (and the
training that follows) runs on garbage (measured: logits off by 0.66 on a tiny Llama, both FSDP
versions). `prepare_quantized_for_sharding` undoes any repacking and turns it off.
"""

from __future__ import annotations

from torch import nn

from loracast.quant.base import find_backend


def prepare_quantized_for_sharding(model: nn.Module) -> int:
    """Make `model`'s quantized layers safe to shard; returns how many were changed.

    Each layer whose backend needs it (bitsandbytes 4-bit) stops repacking in place, and gets its
    weight back in the standard packed layout if an eval-mode forward on the CPU had already
    repacked it (exactly: the scales are rebuilt, not re-quantized). Call this before sharding:
    `shard_model` and `fsdp1_auto_wrap_policy` do.
    """
    changed = 0
    for module in model.modules():
        prepare = getattr(find_backend(module), "prepare_for_sharding", None)
        if prepare is not None:
            prepare(module)
            changed += 1
    return changed
