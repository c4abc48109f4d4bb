"""Cheap construction of the small modules a LoRA layer is made of.

Injection creates seven modules per targeted layer (the wrapper, three ModuleDicts, two
Linears, a dropout). Built the usual way, each costs `nn.Module.__init__` plus a checked
`nn.Module.__setattr__` per attribute: together most of the time `get_peft_model` takes on a
deep model. Here a module gets nn.Module's bookkeeping by copying the (empty) containers of a
pristine `nn.Module`, whatever this torch version keeps there, and its own attributes are
written straight into ``__dict__`` / ``_modules`` / ``_parameters``, which is where
`nn.Module.__setattr__` would put them after its checks (the names here are fixed and known
to be valid). The resulting modules are ordinary instances of their classes.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# nn.Module's own attributes: plain values, and the containers each module needs fresh
_CONSTANTS: dict[str, object] | None = None
_CONTAINERS: list[tuple[str, type]] = []


def _module_state() -> tuple[dict[str, object], list[tuple[str, type]]]:
    global _CONSTANTS
    if _CONSTANTS is None:
        constants = {}
        for key, value in nn.Module().__dict__.items():
            if isinstance(value, (dict, set, list)):
                if value:
                    raise RuntimeError(f"nn.Module() starts with a non-empty {key}; loracast cannot build modules "
                                       "cheaply with this torch version")
                _CONTAINERS.append((key, type(value)))
            else:
                constants[key] = value
        _CONSTANTS = constants
    return _CONSTANTS, _CONTAINERS


def bare(cls: type[M]) -> M:
    """An instance of `cls` holding only nn.Module's own (empty) bookkeeping; `cls.__init__` is not run."""
    constants, containers = _module_state()
    module = object.__new__(cls)
    state = module.__dict__
    state.update(constants)
    for key, container in containers:
        state[key] = container()
    return module


def module_dict() -> nn.ModuleDict:
    """An empty `nn.ModuleDict`."""
    return bare(nn.ModuleDict)


def identity() -> nn.Identity:
    """An `nn.Identity`."""
    return bare(nn.Identity)


def put(container: nn.ModuleDict, key: str, module: nn.Module) -> None:
    """``container[key] = module`` for a key already known to be a valid module name."""
    container._modules[key] = module


_KAIMING_BOUNDS: dict[int, float] = {}


def kaiming_bound(fan_in: int) -> float:
    """The bound of `nn.init.kaiming_uniform_(w, a=sqrt(5))` (nn.Linear's init) for `fan_in`,
    computed with the same float operations, so the same random draws give the same values."""
    bound = _KAIMING_BOUNDS.get(fan_in)
    if bound is None:
        gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
        bound = _KAIMING_BOUNDS[fan_in] = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    return bound


def linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device,
           init: str | None = None) -> nn.Linear:
    """An `nn.Linear` whose weight is uninitialised (`init` None), "kaiming" (nn.Linear's own
    init) or "zeros"; the bias, if any, is uninitialised. Nothing is initialised on the meta device."""
    layer = bare(nn.Linear)
    layer.__dict__["in_features"] = in_features
    layer.__dict__["out_features"] = out_features
    weight = torch.empty((out_features, in_features), dtype=dtype, device=device)
    if init is not None and weight.device.type != "meta":
        if init == "kaiming":
            bound = kaiming_bound(in_features)
            weight.uniform_(-bound, bound)
        elif init == "zeros":
            weight.zero_()
        else:
            raise ValueError(f"init={init!r} is not an initialisation of linear(); use None, 'kaiming' or 'zeros'")
    params = layer._parameters
    params["weight"] = nn.Parameter(weight)
    params["bias"] = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
    return layer
