"""transformers' `Trainer` and `save_pretrained` on loracast models, without peft.

transformers treats a `PreTrainedModel` as an adapter model when it carries its PEFT-integration
attributes: ``_hf_peft_config_loaded`` (lets `Trainer` train a quantized base, and makes
`save_pretrained` write only ``adapter_model.safetensors`` + ``adapter_config.json``),
``active_adapters()``, ``get_adapter_state_dict()`` and ``peft_config[name].save_pretrained``.
transformers' own versions of these methods import peft; loracast installs its own on the model
instance, so the peft package is never needed.

loracast injects LoRA layers into the user's model in place, so ``peft_model.get_base_model()``
stays the `PreTrainedModel` it was, carrying these attributes: transformers' `Trainer` given it
trains and saves only the adapter. Resuming and ``load_best_model_at_end`` are reserved by
transformers for ``peft.PeftModel`` instances; `loracast.training.trainers` (above the tuner) adds
them, and takes the `PeftModel` itself.

These attributes are private to transformers and unversioned; `tests/test_trainer_integration.py`
and `tests/integrations/test_trainer_pipelines.py` pin the behaviour this module relies on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from loracast.errors import LoracastError
from loracast.files.format import KEY_PREFIX, adapter_tensors, prepare_for_safetensors, trained_bias_tensors


class PeftModel(Protocol):
    """What the bridge needs of a `loracast.PeftModel` (declared here so that integrations, which
    the tuner uses, never import the tuner back)."""

    peft_config: dict[str, Any]
    active_adapters: list[str]
    base_model: Any

    def get_base_model(self) -> nn.Module: ...
    def set_adapter(self, adapter_name: str) -> None: ...
    def add_adapter(self, adapter_name: str, peft_config: Any) -> None: ...
    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs: Any) -> Any: ...
    def delete_adapter(self, adapter_name: str) -> None: ...


def is_transformers_model(model: nn.Module) -> bool:
    """True when `model` is a transformers `PreTrainedModel` (never imports transformers itself)."""
    if "transformers" not in sys.modules:
        return False  # a model cannot be a PreTrainedModel unless transformers was imported
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


class _Installed:
    """A method set on a model instance: calls ``FUNCTIONS[name](peft_model, ...)``.

    It holds the `PeftModel`, never a closure, so a model carrying it can be pickled
    (``torch.save(model)``) and deep-copied, and the copy's methods act on the copy.
    """

    def __init__(self, name: str, peft_model: PeftModel) -> None:
        self.name = name
        self.peft_model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return FUNCTIONS[self.name](self.peft_model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<loracast {self.name} for transformers>"


def install(peft_model: PeftModel) -> bool:
    """Give the `PreTrainedModel` inside `peft_model` transformers' PEFT-integration attributes.

    Returns False (and does nothing) when the wrapped model is not a `PreTrainedModel`.
    """
    model = peft_model.get_base_model()
    if not is_transformers_model(model):
        return False
    # object.__setattr__: plain instance attributes, never registered as submodules
    object.__setattr__(model, "_hf_peft_config_loaded", True)
    object.__setattr__(model, "peft_config", peft_model.peft_config)  # the same dict: always in step
    for name in FUNCTIONS:
        object.__setattr__(model, name, _Installed(name, peft_model))
    return True


def installed_peft_model(model: nn.Module) -> PeftModel | None:
    """The loracast `PeftModel` whose adapters `model` (a `PreTrainedModel`) carries, or None."""
    method = model.__dict__.get("get_adapter_state_dict")
    return method.peft_model if isinstance(method, _Installed) else None


def uninstall(model: nn.Module) -> None:
    """Remove what `install` set, so the model saves and trains as a plain model again."""
    for name in INSTALLED_ATTRIBUTES:
        model.__dict__.pop(name, None)


def _active_adapters(peft_model: PeftModel) -> list[str]:
    active = peft_model.active_adapters
    if not active:
        raise LoracastError("the model has no active adapter; add one with get_peft_model or load_adapter")
    return active


def _enable(peft_model: PeftModel, enabled: bool) -> None:
    tuner = peft_model.base_model
    for _, module in list(tuner.lora_layers()) + list(tuner.wrappers()):
        module.enable_adapters(enabled)


def _delete(peft_model: PeftModel, adapter_names: str | Sequence[str]) -> None:
    for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
        peft_model.delete_adapter(name)


def _get_adapter_state_dict(peft_model: PeftModel, adapter_name: str | None = None,
                            state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    return adapter_state_dict_for_transformers(peft_model.get_base_model(), peft_model.peft_config,
                                               adapter_name or _active_adapters(peft_model)[0], state_dict)


def _load_adapter(peft_model: PeftModel, peft_model_id: str, adapter_name: str | None = None,
                  is_trainable: bool = False, **kwargs: Any) -> None:
    peft_model.load_adapter(peft_model_id, adapter_name or "default", is_trainable=is_trainable, **kwargs)


# transformers' PeftAdapterMixin methods, each answered by loracast (theirs would import peft).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "active_adapters": _active_adapters,
    "active_adapter": lambda peft_model: _active_adapters(peft_model)[0],
    "get_adapter_state_dict": _get_adapter_state_dict,
    "set_adapter": lambda peft_model, adapter_name: peft_model.set_adapter(adapter_name),
    "enable_adapters": lambda peft_model: _enable(peft_model, True),
    "disable_adapters": lambda peft_model: _enable(peft_model, False),
    "add_adapter": lambda peft_model, adapter_config, adapter_name=None: peft_model.add_adapter(
        adapter_name or "default", adapter_config),
    "load_adapter": _load_adapter,
    "delete_adapter": _delete,
}
# Instance attributes `install` sets; `uninstall` removes exactly these.
INSTALLED_ATTRIBUTES = ("_hf_peft_config_loaded", "peft_config", *FUNCTIONS)


def adapter_state_dict_for_transformers(model: nn.Module, peft_config: dict, adapter_name: str,
                                        state_dict: dict[str, torch.Tensor] | None = None
                                        ) -> dict[str, torch.Tensor]:
    """One adapter's tensors keyed as PEFT's file keys without the ``base_model.model.`` prefix
    (transformers' `save_pretrained` adds it back).

    When `state_dict` (the model's own state dict, as Trainer passes under DeepSpeed or FSDP) holds
    an adapter parameter, its value is taken from there instead of the live parameter.
    """
    if adapter_name not in peft_config:
        raise LoracastError(f"adapter {adapter_name!r} not found; this model has {sorted(peft_config)}")
    live = dict(trained_bias_tensors(model, adapter_name, peft_config[adapter_name].bias))
    live.update(adapter_tensors(model, adapter_name))
    if state_dict is not None:
        names = {id(param): name for name, param in model.named_parameters()}
        live = {key: state_dict.get(names.get(id(tensor), ""), tensor) for key, tensor in live.items()}
    return {key.removeprefix(KEY_PREFIX): tensor for key, tensor in prepare_for_safetensors(live).items()}
