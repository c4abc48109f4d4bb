"""`LoraLayer`: the wrapper every adapted layer shares.

A LoRA layer keeps the original module as ``base_layer`` (so quantization state, hooks and
checkpoint names survive) and holds its adapters in dicts keyed by adapter name: one entry per
adapter in each container named by `adapter_layer_names`, plus plain dicts of per-adapter
numbers (rank, alpha, scaling). Subclasses say how to build an adapter for their base type,
how to apply it in forward, and what delta it adds to the base weight. Each adapter also holds a
variant (`loracast.layers.variant`): plain LoRA, or one that computes its output and merged
weight another way; the layer calls it and names none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loracast.config import lora_scaling
from loracast.errors import AdapterStateError, LoracastError
from loracast.layers import build
from loracast.layers.merge import BitResidual, check_finite, exact_sum
from loracast.layers.routing import PerSampleNames, routed_adapter_names
from loracast.layers.variant import PLAIN, LoraVariant, merged_weight
from loracast.precision.rules import cast_for_adapter


class LoraLayer(nn.Module):
    """Base class of LoRA wrappers; adapters are keyed by name.

    Attributes:
        base_layer: the wrapped original module (frozen).
        r, lora_alpha, scaling: per-adapter rank, alpha, and alpha/r (or alpha/sqrt(r)).
        lora_variant: per-adapter `LoraVariant` (plain LoRA unless the config chose another).
        merged_adapters: adapters whose delta is currently merged into the base weight.
    """

    # Containers holding per-adapter tensors; every generic loop goes through this tuple.
    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B")

    r: dict[str, int]
    lora_alpha: dict[str, float]
    scaling: dict[str, float]
    use_rslora: dict[str, bool]
    lora_bias: dict[str, bool]
    lora_variant: dict[str, LoraVariant]
    merged_adapters: list[str]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        # Straight into the module's dicts, where nn.Module.__setattr__ would put them after its
        # checks: injection builds hundreds of these (see layers/build.py).
        self._modules["base_layer"] = base_layer
        self._modules["lora_dropout"] = build.module_dict()
        self.__dict__.update(
            r={}, lora_alpha={}, scaling={}, use_rslora={}, lora_bias={}, lora_variant={},
            _active_adapters=[], _disable_adapters=False, merged_adapters=[],
            _weight_restore=None,  # BitResidual (float base) or a backend snapshot
            _bias_original=None,
        )

    # -- adapter bookkeeping ---------------------------------------------------------------------

    def get_base_layer(self) -> nn.Module:
        """The original module this layer wraps."""
        return self.base_layer

    def adapter_reference(self) -> nn.Module:
        """The layer whose weight decides a new adapter's device and dtype (the wrapped layer)."""
        return self.base_layer

    def release_base_layer(self) -> nn.Module:
        """The wrapped module, freed of any LoRA parts placed inside it, to put back in the model."""
        return self.base_layer

    # The wrapped layer's weight and bias, passed through as PEFT's layers do: model code reads
    # them (transformers' T5 feed-forward checks `self.wo.weight.dtype`). Read-only here, so the
    # frozen base cannot be replaced through the wrapper by accident.

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (the same tensor; replace it on `base_layer`, not here)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (the same tensor, or None; replace it on `base_layer`, not here)."""
        return self.get_base_layer().bias

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias"):
            raise ReadOnlyBaseTensorError(
                f"{type(self).__name__}.{name} is the wrapped layer's {name}, read-only through the LoRA "
                f"wrapper; to replace it on purpose, set base_layer.{name}")
        super().__setattr__(name, value)

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.r)

    @property
    def active_adapters(self) -> list[str]:
        """Adapters applied in forward, in order."""
        return self._active_adapters

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter (PEFT's name for it)."""
        return self._active_adapters[0] if self._active_adapters else None

    @property
    def disable_adapters(self) -> bool:
        """True while adapters are switched off (the base layer alone runs)."""
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        """True while at least one adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        """The parameters belonging to one adapter."""
        for container_name in self.adapter_layer_names:
            container = getattr(self, container_name)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                yield entry
            elif not entry._modules:  # a leaf module (nn.Linear): its own parameters, no walk
                yield from (param for param in entry._parameters.values() if param is not None)
            else:
                yield from entry.parameters()

    def set_adapter(self, adapter_names: str | Sequence[str], trainable: bool = True) -> None:
        """Make `adapter_names` the active adapters; only they may require grad."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = [n for n in names if n in self.r]
        for name in self.r:
            wants_grad = trainable and name in self._active_adapters
            for param in self.adapter_parameters(name):
                param.requires_grad_(wants_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off for forward."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove one adapter's tensors and numbers.

        Raises:
            RuntimeError: the adapter is merged (unmerge first).
        """
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(f"adapter {adapter_name!r} is merged into {type(self.base_layer).__name__}; "
                                    "call unmerge_adapter() before deleting it")
        for container_name in self.adapter_layer_names + ("lora_dropout",):
            container = getattr(self, container_name)
            if adapter_name in container:
                del container[adapter_name]
        variant = self.lora_variant.pop(adapter_name, PLAIN)
        if variant.flag is not None:
            getattr(self, variant.flag).pop(adapter_name, None)
        for numbers in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.lora_bias):
            numbers.pop(adapter_name, None)
        if adapter_name in self._active_adapters:
            self._active_adapters.remove(adapter_name)

    def _register_numbers(self, adapter_name: str, r: int, lora_alpha: float, use_rslora: bool,
                          lora_bias: bool, dropout: float) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.use_rslora[adapter_name] = use_rslora
        self.lora_bias[adapter_name] = lora_bias
        self.scaling[adapter_name] = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_variant[adapter_name] = PLAIN
        build.put(self.lora_dropout, adapter_name, nn.Dropout(p=dropout) if dropout > 0.0 else build.identity())

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Multiply an adapter's update by `scale` (relative to alpha/r)."""
        base = lora_scaling(self.r[adapter_name], self.lora_alpha[adapter_name], self.use_rslora[adapter_name])
        self.scaling[adapter_name] = base * scale

    # -- what subclasses provide -----------------------------------------------------------------

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, *, lora_dropout: float,
                     init_lora_weights: bool | str | None, use_rslora: bool, lora_bias: bool,
                     dtype: torch.dtype, device: torch.device) -> None:
        """Add adapter `adapter_name` of rank `r`, created in `dtype` on `device`.

        `init_lora_weights` None leaves the values uninitialised (they are about to be loaded).
        """
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The update one adapter adds to the base weight, in float64 (one layer's worth of memory at a time), base layout."""
        raise NotImplementedError

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """One adapter's contribution for input `x`, before the cast back to the output dtype:
        ``B(A(dropout(x))) * scaling`` in the adapter dtype, for layers whose factors are modules."""
        lora_a = self.lora_A[adapter_name]
        x = cast_for_adapter(x, lora_a.weight.dtype)
        return self.lora_B[adapter_name](lora_a(self.lora_dropout[adapter_name](x))) * self.scaling[adapter_name]

    def set_variant(self, adapter_name: str, variant: LoraVariant, *, dtype: torch.dtype, device: torch.device,
                    initialize: bool) -> None:
        """Make `variant` the arithmetic of adapter `adapter_name` (already added by `update_layer`):
        its containers join `adapter_layer_names`, and it creates its tensors in `dtype` on `device`
        (left for a load to fill when `initialize` is False)."""
        for container_name in variant.containers:
            if container_name not in self._modules:
                self._modules[container_name] = nn.ModuleDict()
            if container_name not in self.adapter_layer_names:
                # an instance-level tuple, so generic loops (grad, deletion, saving) see the container
                self.__dict__["adapter_layer_names"] = self.adapter_layer_names + (container_name,)
        if variant.flag is not None:
            self.__dict__.setdefault(variant.flag, {})[adapter_name] = True
        self.lora_variant[adapter_name] = variant
        variant.create(self, adapter_name, dtype=dtype, device=device, initialize=initialize)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters:
            if self.merged:
                raise AdapterStateError(
                    "adapters are disabled while merged into the base weight; use PeftModel.disable_adapter() "
                    "(which unmerges exactly and re-merges) or call unmerge_adapter() first")
            return self.base_layer(x, *args, **kwargs)
        routed = routed_adapter_names()
        if self.merged:
            if routed is not None:
                raise AdapterStateError("per-sample adapter_names cannot be used while adapters are merged; "
                                        "call unmerge_adapter() first")
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if routed is not None:
            return self._mixed_batch_forward(x, result, routed)
        out_dtype = result.dtype
        for name in self._active_adapters:
            result = self.lora_variant[name].forward(self, x, name, result)
        return result.to(out_dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor, routed: PerSampleNames) -> torch.Tensor:
        names = routed.for_batch(x.shape[0])
        refused = sorted({n for n in names if n in self.lora_variant and not self.lora_variant[n].per_sample})
        if refused:
            titles = sorted({self.lora_variant[n].title for n in refused})
            raise VariantMixedBatchError(f"per-sample adapter_names cannot include {'/'.join(titles)} adapters "
                                         f"({refused}), as in PEFT; run each of them on its own batch")
        out_dtype = result.dtype
        for name in dict.fromkeys(names):
            if name == "__base__" or name not in self.r:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            update = self.lora_output(x.index_select(0, rows), name).to(out_dtype)
            result = result.index_add(0, rows, update)
        return result

    # -- merge ------------------------------------------------------------------------------------

    def _merge_target(self) -> torch.Tensor:
        """The base weight tensor a merge writes into (float layers)."""
        return self.get_base_layer().weight

    def _read_original_weight(self) -> torch.Tensor:
        """The base weight as it was before any merge, as a float tensor."""
        weight = self._merge_target()
        if self._weight_restore is not None:
            return self._weight_restore.restore(weight)
        return weight.detach()

    def _write_merged_weight(self, original: torch.Tensor, merged: torch.Tensor, keep_restore: bool) -> None:
        self._weight_restore = BitResidual.between(original, merged) if keep_restore else None
        with torch.no_grad():
            self._merge_target().copy_(merged)

    def _restore_original_weight(self) -> None:
        original = self._read_original_weight()
        with torch.no_grad():
            self._merge_target().copy_(original)
        self._weight_restore = None

    @property
    def merge_restore_nbytes(self) -> int:
        """Memory held to restore the base exactly on unmerge."""
        total = getattr(self._weight_restore, "nbytes", 0)
        if self._bias_original is not None:
            total += self._bias_original.numel() * self._bias_original.element_size()
        return total

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
              keep_restore: bool = True) -> None:
        """Merge adapters into the base weight: ``round(W0 + sum of deltas)``, rounded once.

        Merging an adapter that is already merged is a no-op. With `keep_restore` the original
        weight can later be restored bit for bit by `unmerge`.

        Raises:
            NonFiniteMergeError: `safe_merge` and the result holds inf/nan (nothing is changed).
        """
        requested = self._active_adapters if adapter_names is None else list(adapter_names)
        new = [n for n in requested if n in self.r and n not in self.merged_adapters]
        if not new:
            return
        names = self.merged_adapters + new
        original = self._read_original_weight()
        merged = merged_weight(self, original, names)
        where = type(self.base_layer).__name__
        if safe_merge:
            check_finite(merged, f"the weight of a {where}", new)
        new_bias = self._merged_bias(names)
        if safe_merge and new_bias is not None:
            check_finite(new_bias, f"the bias of a {where}", new)
        self._write_merged_weight(original, merged, keep_restore)
        if new_bias is not None:
            bias = self.get_base_layer().bias
            if self._bias_original is None:
                self._bias_original = bias.detach().clone()
            with torch.no_grad():
                bias.copy_(new_bias)
        self.merged_adapters = names

    def _merged_bias(self, names: Sequence[str]) -> torch.Tensor | None:
        with_bias = [n for n in names if self.lora_bias.get(n)]
        bias = getattr(self.get_base_layer(), "bias", None)
        if not with_bias or bias is None:
            return None
        original = self._bias_original if self._bias_original is not None else bias.detach()
        return exact_sum(original, [self.lora_B[n].bias.detach().float() * self.scaling[n] for n in with_bias])

    def unmerge(self) -> None:
        """Restore the base weight (and bias) exactly as before the first merge."""
        if not self.merged:
            return
        self._restore_original_weight()
        if self._bias_original is not None:
            with torch.no_grad():
                self.get_base_layer().bias.copy_(self._bias_original)
            self._bias_original = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self._active_adapters}, merged={self.merged_adapters}"


class VariantMixedBatchError(LoracastError):
    """Per-sample adapter names were given for a batch that uses an adapter whose variant cannot
    serve part of a batch (`LoraVariant.per_sample` False)."""


class ReadOnlyBaseTensorError(LoracastError, AttributeError):
    """Code tried to replace a base layer's weight or bias through its LoRA wrapper."""


def delta_dtype(factor: torch.Tensor) -> torch.dtype:
    """The dtype deltas are computed in: float64, where the device has it (not MPS), so that the
    product of the factors is exact to ~1e-16 and a merge rounds only once, into the base dtype."""
    return torch.float32 if factor.device.type == "mps" else torch.float64
