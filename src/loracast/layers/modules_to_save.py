"""`ModulesToSaveWrapper`: a module trained in full, as one copy per adapter.

Names follow PEFT (``<path>.original_module.*`` and ``<path>.modules_to_save.<adapter>.*``) so
state dicts and files match. Unlike PEFT, a copy follows the adapter dtype rule: with autocast on,
the copy of a bf16/fp16 module is float32; its floating input is cast to the copy's dtype and its
output back to the original module's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from loracast.layers.routing import PerSampleNames, routed_adapter_names


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and one trainable copy per adapter."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapters: list[str] = []
        self._disable_adapters = False

    @property
    def adapter_names(self) -> list[str]:
        """Adapters holding a copy."""
        return list(self.modules_to_save.keys())

    @property
    def active_adapters(self) -> list[str]:
        """The adapters whose copy is in use (the first one present wins in forward)."""
        return self._active_adapters

    def add_copy(self, adapter_name: str, dtype: torch.dtype | None) -> None:
        """Make a copy of the original module for `adapter_name`, floating tensors cast to `dtype`."""
        module_copy = copy.deepcopy(self.original_module)
        if dtype is not None:
            for tensor in list(module_copy.parameters()) + list(module_copy.buffers()):
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        self.modules_to_save[adapter_name] = module_copy

    def set_adapter(self, adapter_names: str | Sequence[str], trainable: bool = True) -> None:
        """Activate copies; only the first active copy may require grad."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = [n for n in names if n in self.modules_to_save]
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and bool(self._active_adapters) and name == self._active_adapters[0])

    def enable_adapters(self, enabled: bool) -> None:
        """Use the copies (True) or the original module (False)."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop one adapter's copy."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self._active_adapters:
            self._active_adapters.remove(adapter_name)

    def _original_dtype(self) -> torch.dtype | None:
        for tensor in self.original_module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return None

    def _run(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if module is self.original_module:
            return module(*args, **kwargs)
        copy_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
        original_dtype = self._original_dtype()
        if copy_dtype is None or copy_dtype == original_dtype:
            return module(*args, **kwargs)
        args = tuple(a.to(copy_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        out = module(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.to(original_dtype)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        routed = routed_adapter_names()
        if routed is not None and not self._disable_adapters:
            return self._mixed_batch_forward(routed, *args, **kwargs)
        return self._run(self._module_in_use(), args, kwargs)

    def _module_in_use(self) -> nn.Module:
        if self._disable_adapters or not self._active_adapters:
            return self.original_module
        return self.modules_to_save[self._active_adapters[0]]

    def _mixed_batch_forward(self, routed: PerSampleNames, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        names = routed.for_batch(x.shape[0])
        pieces, order = [], []
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            index = torch.tensor(rows, device=x.device)
            pieces.append(self._run(module, (x.index_select(0, index),) + args, kwargs))
            order.extend(rows)
        out = torch.cat(pieces, dim=0)
        inverse = torch.empty(len(order), dtype=torch.long, device=out.device)
        inverse[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
        return out.index_select(0, inverse)

    def unwrap(self, adapter_name: str | None) -> nn.Module:
        """The module to put back in the model: the adapter's copy in the original dtype, or the original."""
        if adapter_name is None or adapter_name not in self.modules_to_save:
            return self.original_module
        module = self.modules_to_save[adapter_name]
        dtype = self._original_dtype()
        if dtype is not None:
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        module.requires_grad_(False)
        return module

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self._active_adapters}"
