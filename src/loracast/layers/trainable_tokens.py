"""Trainable tokens: only chosen rows of an embedding (and of a tied output head) train.

PEFT's `trainable_token_indices`. The module tree is PEFT's: the embedding is replaced by a
`TrainableTokensWrapper` whose ``token_adapter`` (a `TrainableTokensLayer`) holds the frozen
embedding as ``base_layer`` and one row table per adapter in ``trainable_tokens_delta``, so the
parameter name is ``<embedding>.token_adapter.trainable_tokens_delta.<adapter>`` and the file key
``<embedding>.token_adapter.trainable_tokens_delta``, as in PEFT's files.

The rows are the new values of those tokens (not a difference), created from the base rows in
the adapter dtype (float32 on a bf16/fp16 base with autocast on, as every loracast adapter).
Forward looks the base up and puts the trainable rows, rounded to the output dtype, in place of
the chosen tokens; a tied output head computes only the chosen tokens' logits from the rows. The
full table is never copied per step (PEFT copies the whole embedding matrix in every forward).
A merge writes the rows, rounded once, into the base weight; unmerge puts the saved base rows
back bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loracast.errors import AdapterStateError, LoracastError
from loracast.layers.base import LoraLayer
from loracast.layers.merge import check_finite
from loracast.layers.routing import PerSampleNames, routed_adapter_names


class TrainableTokensLayer(LoraLayer):
    """Trainable rows of an `nn.Embedding`, or the tied view of them on an `nn.Linear` head.

    A tied layer (`tied_to` given) owns no tensors: it reads the rows and indices of the
    embedding's layer, so they are saved once and train once.
    """

    adapter_layer_names: tuple[str, ...] = ("trainable_tokens_delta",)

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise LoracastError(f"trainable tokens need an nn.Embedding (or a tied nn.Linear head), got "
                                f"{type(base_layer).__name__}; name the input embedding in trainable_token_indices")
        # the tied source is a plain attribute, out of the module tree; a tied head shows the
        # embedding's rows under its own name too (as PEFT's state dict does) but does not list them
        # as its adapter tensors, so they are saved and counted once
        self.__dict__.update(token_indices={}, _tied_to=tied_to)
        if tied_to is None:
            self.trainable_tokens_delta = nn.ParameterDict()
        else:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.adapter_layer_names = ()

    @property
    def rows(self) -> nn.ParameterDict:
        """Adapter name -> its trainable rows (the tied embedding's, for a tied head)."""
        return self.trainable_tokens_delta

    def indices(self, adapter_name: str) -> list[int]:
        """The token ids adapter `adapter_name` trains."""
        source = self._tied_to if self._tied_to is not None else self
        return source.token_indices[adapter_name]

    def add_tokens(self, adapter_name: str, token_indices: Sequence[int], *, dtype: torch.dtype,
                   initialize: bool = True) -> None:
        """Add adapter `adapter_name` training rows `token_indices`, created in `dtype` from the
        base rows (`initialize` False leaves them uninitialised: they are about to be loaded).

        Raises:
            ValueError: an index is out of range or repeated.
        """
        indices = [int(i) for i in token_indices]
        weight = self.base_layer.weight
        size = weight.shape[0]
        bad = [i for i in indices if not 0 <= i < size]
        if bad or len(set(indices)) != len(indices):
            problem = f"ids {bad} outside [0, {size})" if bad else "repeated ids"
            raise LoracastError(f"trainable_token_indices has {problem}; give distinct ids of the "
                                f"{size}-token vocabulary (resize the embeddings first for new tokens)")
        self._register_numbers(adapter_name, len(indices), 1.0, False, False, 0.0)
        if self._tied_to is not None:
            return
        self.token_indices[adapter_name] = indices
        if initialize and weight.device.type != "meta":
            index = torch.tensor(indices, device=weight.device)
            values = weight.detach().index_select(0, index).to(dtype)
        else:
            values = torch.empty((len(indices), weight.shape[1]), dtype=dtype, device=weight.device)
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.token_indices.pop(adapter_name, None)

    # -- forward ----------------------------------------------------------------------------------

    def _check_disjoint(self, names: Sequence[str]) -> None:
        seen: set[int] = set()
        for name in names:
            ids = set(self.indices(name))
            if seen & ids:
                raise LoracastError(f"adapter {name!r} trains token ids {sorted(seen & ids)} that another active or "
                                    "merged adapter trains too; only adapters with disjoint token ids can be combined")
            seen |= ids

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged:
            if self._disable_adapters and self.merged:
                raise AdapterStateError("adapters are disabled while merged into the base weight; call "
                                        "unmerge_adapter() first")
            return result
        routed = routed_adapter_names()
        if routed is not None:
            return self._mixed_batch(x, result, routed)
        names = [n for n in self._active_adapters if n in self.r]
        self._check_disjoint(names)
        for name in names:
            result = self._replace(x, result, name)
        return result

    def _mixed_batch(self, x: torch.Tensor, result: torch.Tensor, routed: PerSampleNames) -> torch.Tensor:
        """Per-sample adapters (`adapter_names=` in forward): each sample gets its adapter's rows."""
        names = routed.for_batch(x.shape[0])
        for name in dict.fromkeys(names):
            if name not in self.r:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            result = result.index_copy(0, rows, self._replace(x.index_select(0, rows), result.index_select(0, rows), name))
        return result

    def _replace(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        rows = self.rows[name]
        index = torch.tensor(self.indices(name), device=result.device)
        weight = self.base_layer.weight
        if isinstance(self.base_layer, nn.Embedding):
            hits = x.unsqueeze(-1) == index  # (..., k): which chosen token each position is
            found = hits.any(-1, keepdim=True)
            new = rows[hits.to(torch.uint8).argmax(-1)].to(result.dtype)
            embed_scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
            if embed_scale is not None:
                new = new * (embed_scale.to(new.dtype) if isinstance(embed_scale, torch.Tensor) else embed_scale)
            return torch.where(found, new, result)
        # a tied output head: the chosen tokens' logits from the trainable rows, in the head's dtype
        logits = F.linear(x, rows.to(weight.dtype))
        bias = self.base_layer.bias
        if bias is not None:
            logits = logits + bias.index_select(0, index)
        return result.index_copy(-1, index, logits.to(result.dtype))

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the active adapters' rows in place (PEFT's ``weight`` of the wrapper)."""
        weight = self.base_layer.weight
        if self.merged or self._disable_adapters:
            return weight
        for name in (n for n in self._active_adapters if n in self.r):
            index = torch.tensor(self.indices(name), device=weight.device)
            weight = weight.index_copy(0, index, self.rows[name].to(weight.dtype))
        return weight

    # -- merge -------------------------------------------------------------------------------------

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False,
              keep_restore: bool = True) -> None:
        """Write the adapters' rows, rounded once to the base dtype, into the base weight.

        A tied head shares its weight with the embedding, which writes it; the head only records
        the merge. Unmerge restores the overwritten base rows exactly.

        Raises:
            NonFiniteMergeError: `safe_merge` and a row holds inf/nan (nothing is changed).
            ValueError: two adapters train the same token id.
        """
        requested = self._active_adapters if adapter_names is None else list(adapter_names)
        new = [n for n in requested if n in self.r and n not in self.merged_adapters]
        if not new:
            return
        self._check_disjoint(self.merged_adapters + new)
        if self._tied_to is None:
            weight = self.base_layer.weight
            if self._weight_restore is None:
                self._weight_restore = {}
            for name in new:
                index = torch.tensor(self.indices(name), device=weight.device)
                values = self.rows[name].detach().to(weight.dtype)
                if safe_merge:
                    check_finite(values, "the trainable token rows", [name])
                if keep_restore:
                    self._weight_restore[name] = weight.detach().index_select(0, index).clone()
                with torch.no_grad():
                    weight.index_copy_(0, index, values)
            if not keep_restore:
                self._weight_restore = None
        self.merged_adapters = self.merged_adapters + new

    def unmerge(self) -> None:
        """Put back the base rows the merge overwrote, bit for bit."""
        if not self.merged:
            return
        if self._tied_to is None:
            if self._weight_restore is None:
                raise AdapterStateError("the merge kept no copy of the base rows (merged with keep_restore=False); "
                                        "reload the base model to undo it")
            weight = self.base_layer.weight
            for name in reversed(self.merged_adapters):
                index = torch.tensor(self.indices(name), device=weight.device)
                with torch.no_grad():
                    weight.index_copy_(0, index, self._weight_restore[name])
            self._weight_restore = None
        self.merged_adapters = []

    @property
    def merge_restore_nbytes(self) -> int:
        """Memory held to restore the base rows on unmerge."""
        saved = self._weight_restore.values() if isinstance(self._weight_restore, dict) else ()
        return sum(t.numel() * t.element_size() for t in saved)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change a merge makes to the base weight, in float64 (zero outside the trained rows)."""
        weight = self.base_layer.weight
        delta = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
        index = torch.tensor(self.indices(adapter_name), device=weight.device)
        change = self.rows[adapter_name].detach().to(weight.dtype).double() - weight.detach().index_select(0, index).double()
        return delta.index_copy(0, index, change)


class TrainableTokensWrapper(nn.Module):
    """Stands where the embedding (or tied head) was; PEFT's name for the module holding ``token_adapter``."""

    def __init__(self, module: nn.Module, tied_to: TrainableTokensLayer | None = None) -> None:
        super().__init__()
        self.token_adapter = TrainableTokensLayer(module, tied_to)

    @property
    def original_module(self) -> nn.Module:
        """The wrapped embedding or head."""
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight forward uses: the base with the active adapters' rows in place (as PEFT)."""
        return self.token_adapter.merged_weight()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "token_adapter":
                raise
            return getattr(self.token_adapter.base_layer, name)
