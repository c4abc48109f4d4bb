"""Which modules the compute paths may bypass: read a weight and call ``F.linear`` themselves
instead of calling the module, because nothing (a hook, a wrapper, a quantized tensor) would
make the module's own call give a different result."""

from __future__ import annotations

from torch import nn

from loracast.quant.base import foreign_tensor


def no_hooks(module: nn.Module) -> bool:
    """True when `module` has no forward hooks or pre-hooks of its own."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def plain_factor(module: nn.Module) -> bool:
    """True for a LoRA factor whose weight the fast paths may read directly: a plain `nn.Linear`
    without hooks. A wrapper (an FSDP1 unit) materialises the weight only inside its own forward."""
    return type(module) is nn.Linear and no_hooks(module)


def global_hooks() -> bool:
    """True when forward hooks are registered for every module (`nn.modules.module`'s global hooks)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def plain_linear_base(base: nn.Module) -> bool:
    """True when calling ``F.linear`` ourselves gives exactly what calling `base` gives."""
    if type(base) is not nn.Linear or not no_hooks(base):
        return False
    if foreign_tensor(base.weight):  # a quantized weight (torchao): its backward has no in-place matmul-add
        return False
    return not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))
