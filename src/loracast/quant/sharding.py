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

import sys

from torch import nn


def _linear4bit_type() -> type | None:
    if "bitsandbytes" not in sys.modules:  # not imported: the model cannot hold its layers
        return None
    from bitsandbytes.nn import Linear4bit

    return Linear4bit


def prepare_quantized_for_sharding(model: nn.Module) -> int:
    """Make `model`'s bitsandbytes 4-bit layers safe to shard; returns how many were changed.

    Each layer stops repacking in place, and gets its weight back in the standard packed layout if
    an eval-mode forward on the CPU had already repacked it (bitsandbytes' own conversion, as on
    save; with double quantization it re-quantizes the scales, moving outputs by a bf16 rounding,
    so call this before any eval forward: `shard_model` and `fsdp1_auto_wrap_policy` do). Only
    CPU inference speed at batch size 1 is given up (the repacked kernel); training never used it.
    """
    linear4bit = _linear4bit_type()
    if linear4bit is None:
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
        module.support_avx512bf16_for_cpu = False  # the switch Linear4bit.forward reads before repacking
        changed += 1
    return changed
