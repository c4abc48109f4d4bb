"""What a live model's frozen base holds, for the checks that look past the adapters.

The adapter table says what the LoRA tensors are; these checks need the rest of the model: the
dtype the model declares (``config.dtype``) against the dtypes its frozen weights are really
in (``prepare_model_for_kbit_training`` upcasts them; a partial ``.to()`` or TRL's QLoRA set-up
mixes them), quantized layers that hold a requantized merge (which ``merge_and_unload`` leaves
behind), and inf or nan in base weights (an overflowing float16 merge writes them there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loracast.precision.rules import declared_dtype
from loracast.precision.view import base_parameters
from loracast.quant import find_backend
from loracast.quant.base import foreign_tensor
from loracast.quant.kbit import is_quantized
from loracast.quant.merge import RequantizationStats, requantization_record


@dataclass
class FrozenParam:
    """One frozen, floating, unquantized base parameter."""

    name: str
    dtype: torch.dtype
    numel: int
    nbytes: int  # as held now, in `dtype`
    owner: str  # class name of the module that holds it (e.g. "LlamaRMSNorm", "Embedding")

    @property
    def is_norm(self) -> bool:
        """A normalization layer's parameter: tiny, and the one PEFT and TRL keep in float32 on purpose."""
        return "norm" in self.owner.lower()


@dataclass
class BaseState:
    """The frozen base of a live model, as the base checks read it."""

    declared: torch.dtype | None = None  # the model's config.dtype
    frozen: list[FrozenParam] = field(default_factory=list)
    requantized: dict[str, RequantizationStats] = field(default_factory=dict)  # module path -> rounding
    non_finite: list[str] = field(default_factory=list)  # "name: k of n values are inf or nan"
    quantized: bool = False  # whether the model holds quantized layers (or transformers loaded it in 4/8 bits)


def _quantized_owners(model: nn.Module) -> tuple[dict[str, nn.Module], set[str]]:
    """Module path -> module, and the paths of quantized layers (whose parameters are packed codes)."""
    modules = dict(model.named_modules())
    return modules, {path for path, module in modules.items() if find_backend(module) is not None}


def collect_base_state(model: nn.Module) -> BaseState:
    """Read the frozen base of `model` (the module holding the LoRA layers, or a merged model)."""
    state = BaseState(declared=declared_dtype(model), quantized=is_quantized(model))
    modules, quantized = _quantized_owners(model)
    for path in quantized:
        record = requantization_record(modules[path])
        if record is not None:
            state.requantized[path] = record
    # transformers keeps these modules in float32 on purpose (T5's `wo`, some routers) and casts around them
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in base_parameters(model):
        owner_path = name.rpartition(".")[0]
        if not param.is_floating_point() or param.device.type == "meta":
            continue
        if owner_path not in quantized and not foreign_tensor(param):  # packed codes: torch ops cannot read them
            finite = torch.isfinite(param.detach())
            if not bool(finite.all()):
                state.non_finite.append(f"{name}: {int((~finite).sum())} of {param.numel()} values are inf or nan")
            kept = param.dtype == torch.float32 and bool(keep_fp32 & set(name.split(".")))
            if not param.requires_grad and not kept:
                owner = type(modules.get(owner_path, model)).__name__
                state.frozen.append(FrozenParam(name, param.dtype, param.numel(), param.numel() * param.element_size(), owner))
    return state
