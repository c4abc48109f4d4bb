"""`LoraModel`: PEFT's tuner object, holding the adapted model and the adapter configs.

It owns what acts on every LoRA layer at once: activating adapters, merging, unmerging and
unloading. `PeftModel` (peft_model.py) is the user-facing wrapper around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from loracast.config import LoraConfig
from loracast.errors import LoracastError
from loracast.files.format import trained_bias_tensors
from loracast.integrations import transformers as transformers_integration
from loracast.layers import LoraLayer
from loracast.layers.modules_to_save import ModulesToSaveWrapper
from loracast.layers.trainable_tokens import TrainableTokensWrapper
from loracast.quant.merge import requantization_report
from loracast.tuner.inject import iter_adapter_modules, iter_lora_layers, iter_wrappers


class LoraModel(nn.Module):
    """Holds the adapted model (``.model``) and the adapter configs; PEFT's tuner object."""

    prefix = "lora_"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        """(name, layer) for every LoRA layer."""
        return iter_lora_layers(self.model)

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """(name, wrapper) for every modules_to_save wrapper."""
        return iter_wrappers(self.model)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Activate adapters on every layer; active ones train unless their config says inference_mode."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise LoracastError(f"adapter(s) {unknown} not found; this model has {sorted(self.peft_config)}")
        trainable = any(not self.peft_config[n].inference_mode for n in names)
        for module in iter_adapter_modules(self.model):
            module.set_adapter(names, trainable=trainable)
        self._apply_bias_mode(names)
        self._active_adapters = names

    def _apply_bias_mode(self, names: list[str]) -> None:
        for name in names:
            config = self.peft_config[name]
            if config.bias != "none" and not config.inference_mode:
                for tensor in trained_bias_tensors(self.model, name, config.bias).values():
                    tensor.requires_grad_(True)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names."""
        return list(self.__dict__.get("_active_adapters", []))

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights, keeping exact restore data."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        with requantization_report():  # one warning for all quantized layers merged
            for _, layer in self.lora_layers():
                layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore every base weight exactly as it was before merging."""
        for _, layer in self.lora_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool, adapter_names: Sequence[str] | None) -> nn.Module:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        with requantization_report():
            for name, layer in reversed(list(self.lora_layers())):  # nested wrappers: inner first
                if merge:
                    layer.merge(names, safe_merge=safe_merge, keep_restore=False)
                elif layer.merged:
                    layer.unmerge()
                _replace(self.model, _slot_of(self.model, name), layer.release_base_layer())
        for name, wrapper in list(self.wrappers()):
            _replace(self.model, name, wrapper.unwrap(names[0] if (merge and names) else None))
        transformers_integration.uninstall(self.model)  # a plain model again: saves in full
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge adapters into the base and return the plain model (no LoRA layers left)."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove all LoRA layers without merging and return the plain model."""
        return self._unload(False, False, None)


def _slot_of(root: nn.Module, name: str) -> str:
    """Where a layer's base goes back on unload: the place of its PEFT-named wrapper, if any
    (a trainable-tokens layer sits inside one), else its own."""
    parent_name, _, _ = name.rpartition(".")
    if parent_name and isinstance(root.get_submodule(parent_name), TrainableTokensWrapper):
        return parent_name
    return name


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
