"""Saving and loading adapters in PEFT's format, as methods of `PeftModel`.

`AdapterFiles` is a mixin: `PeftModel` inherits `save_pretrained`, `load_adapter` and
`from_pretrained` from it, and it relies on `PeftModel`'s `base_model`, `peft_config`,
`_add`, `_remove_everywhere` and `_precision_plans`. Kept apart so that peft_model.py holds the
adapter API and this module the file I/O around it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from loracast._atomic import atomic_save_safetensors
from loracast.config import CONFIG_NAME, LoraConfig
from loracast.dtypes import parse_dtype
from loracast.errors import UnsupportedArgumentError
from loracast.files.fingerprint import build_fingerprint, check_loaded_adapter, fingerprint_metadata, read_fingerprint
from loracast.files.format import (
    WEIGHTS_NAME,
    adapter_tensors,
    load_adapter_tensors,
    prepare_for_safetensors,
    read_adapter_weights,
    trained_bias_tensors,
)
from loracast.precision.policies import apply_recorded_dtypes, resolve_precision
from loracast.tuner.names import check_adapter_name

_Model = TypeVar("_Model", bound="AdapterFiles")


class AdapterFiles:
    """`save_pretrained` / `load_adapter` / `from_pretrained` for `PeftModel`."""

    def adapter_state_dict(self, adapter_name: str | None = None,
                           save_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors `save_pretrained` writes for one adapter, keyed as in PEFT's files."""
        name = adapter_name or self.active_adapter
        config = self.peft_config[name]
        tensors = dict(trained_bias_tensors(self.base_model.model, name, config.bias))
        tensors.update(adapter_tensors(self.base_model.model, name))
        return prepare_for_safetensors(tensors, save_dtype)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None,
                        save_dtype: torch.dtype | str | None = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """Write adapters in PEFT's format: the default one in `save_directory`, others in sub-folders.

        `save_dtype` (e.g. torch.bfloat16) writes smaller files; loading still gives the dtypes of
        the precision rules. Each file is written atomically. A model sharded with FSDP2 is saved
        by calling this on every rank with ``is_main_process=(rank == 0)``: all ranks gather the
        adapter tensors and rank 0 writes them.

        Of PEFT's other arguments, the ones that change nothing here are accepted at their
        harmless values (`save_embedding_layers` "auto" or False, `push_to_hub=False`,
        `path_initial_model_for_weight_conversion=None`); anything else is refused.

        Raises:
            ValueError: an unknown adapter is selected, or `safe_serialization=False` is asked for.
            UnsupportedArgumentError: an argument loracast does not implement (`push_to_hub=True`,
                `max_shard_size`, `state_dict`, ...).
        """
        if not safe_serialization:
            raise ValueError("loracast writes only safetensors (pickle files can run code when read); "
                             "drop safe_serialization=False")
        _refuse_unsupported_save_kwargs(kwargs)
        dtype = parse_dtype(save_dtype, "save_dtype")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} not found; this model has {sorted(self.peft_config)}")
        root = os.fspath(save_directory)
        if os.path.isfile(root):
            raise ValueError(f"save_directory {root!r} is a file; give a folder path")
        for name in names:
            # FSDP2-sharded tensors are gathered here, on every rank together; only the main process writes
            tensors = self.adapter_state_dict(name, dtype)
            if not is_main_process:
                continue
            folder = root if name == "default" else os.path.join(root, check_adapter_name(name))
            os.makedirs(folder, exist_ok=True)
            atomic_save_safetensors(os.path.join(folder, WEIGHTS_NAME), tensors, self._file_metadata(name, dtype))
            self.peft_config[name].save_pretrained(folder)

    def _file_metadata(self, adapter_name: str, save_dtype: torch.dtype | None = None) -> dict[str, str]:
        """safetensors header metadata: PEFT's {"format": "pt"} plus the precision fingerprint
        (`loracast.fingerprint`; PEFT ignores metadata it does not know)."""
        fingerprint = build_fingerprint(self.base_model.model, adapter_name,
                                        self._precision_plans.get(adapter_name), save_dtype)
        return {"format": "pt", **fingerprint_metadata(fingerprint)}

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                     allow_pickle: bool = False, *, precision: str | None = None, strict_precision: bool = False,
                     **kwargs: Any) -> None:
        """Add an adapter read from a folder written by loracast or PEFT (inactive until `set_adapter`).

        Dtypes as in `from_pretrained`; the saved fingerprint is compared with this model and
        environment (a `PrecisionWarning`, or with `strict_precision` a `PrecisionError`).

        Raises:
            FileNotFoundError: no adapter files at `model_id`.
            AdapterLoadError / ConfigError: the files do not fit this model or are malformed.
            PrecisionError: the precision arguments conflict, or `strict_precision` and the
                fingerprint differs.
        """
        _reject_unknown_kwargs("load_adapter", kwargs)
        config = _read_config(model_id)
        config.inference_mode = not is_trainable
        fingerprint = read_fingerprint(model_id)
        plan = resolve_precision(self.base_model.model, precision, autocast_adapter_dtype, adapter_dtype,
                                 fingerprint=fingerprint, loading=True)
        self._add(adapter_name, config, plan, initialize=False)
        try:
            self._load_weights(model_id, adapter_name, allow_pickle, fingerprint, strict_precision)
        except BaseException:
            self._remove_everywhere(adapter_name)
            raise
        self.base_model.set_adapter(self.active_adapters)

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str, allow_pickle: bool,
                      fingerprint: dict | None = None, strict_precision: bool = False) -> None:
        folder = os.fspath(model_id)
        tensors, _ = read_adapter_weights(folder, allow_pickle=allow_pickle)
        model = self.base_model.model
        config = self.peft_config[adapter_name]
        targets = adapter_tensors(model, adapter_name)
        load_adapter_tensors(model, tensors, targets, source=os.path.join(folder, WEIGHTS_NAME),
                             optional=trained_bias_tensors(model, adapter_name, config.bias))
        plan = self._precision_plans[adapter_name]
        apply_recorded_dtypes(targets, plan)
        if fingerprint is not None:
            check_loaded_adapter(model, adapter_name, fingerprint, plan, source=folder, strict=strict_precision,
                                 live=targets)
            self._fingerprints[adapter_name] = fingerprint

    @classmethod
    def from_pretrained(cls: type[_Model], model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                        allow_pickle: bool = False, *, precision: str | None = None,
                        strict_precision: bool = False, **kwargs: Any) -> _Model:
        """Wrap `model` with an adapter read from a folder written by loracast or PEFT.

        Adapter dtypes follow `precision` (a `loracast.precision.policies` name; "match-training" restores
        the dtypes recorded at save) or the knobs, as in `get_peft_model`. A loracast-written
        adapter's fingerprint is compared with this model and environment: each difference is
        listed in one `PrecisionWarning`, or raised as a `PrecisionError` with `strict_precision`.

        Raises:
            FileNotFoundError: no adapter at `model_id` (loracast reads local folders only).
            AdapterLoadError / ConfigError: the files do not fit this model or are malformed.
            PrecisionError: the precision arguments conflict, or `strict_precision` and the
                fingerprint differs.
        """
        _reject_unknown_kwargs("from_pretrained", kwargs)
        config = config or _read_config(model_id)
        config.inference_mode = not is_trainable
        fingerprint = read_fingerprint(model_id)
        plan = resolve_precision(model, precision, autocast_adapter_dtype, adapter_dtype,
                                 fingerprint=fingerprint, loading=True)
        peft_model = cls._for_loading(model, config, adapter_name, plan)
        try:
            peft_model._load_weights(model_id, adapter_name, allow_pickle, fingerprint, strict_precision)
        except BaseException:
            peft_model.base_model.unload()
            raise
        return peft_model


_IGNORED_KWARGS = {"low_cpu_mem_usage", "torch_device", "ephemeral_gpu_offload", "subfolder"}

# PEFT's save_pretrained arguments that change nothing at these values (the first is PEFT's default).
_HARMLESS_SAVE_KWARGS: dict[str, tuple[Any, ...]] = {
    "save_embedding_layers": ("auto", False),
    "push_to_hub": (False,),
    "path_initial_model_for_weight_conversion": (None,),
}
_SAVE_FIXES = {
    "push_to_hub": "save to a folder, then upload it with huggingface_hub.upload_folder",
    "max_shard_size": "drop it: an adapter is written as one adapter_model.safetensors file",
    "state_dict": "drop it: the adapter tensors are read from the model",
}


def _refuse_unsupported_save_kwargs(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        harmless = _HARMLESS_SAVE_KWARGS.get(name)
        if harmless is not None and any(value is v or (type(value) is type(v) and value == v) for v in harmless):
            continue
        allowed = "" if harmless is None else f" (accepted: {', '.join(repr(v) for v in harmless)})"
        fix = _SAVE_FIXES.get(name, "drop it")
        raise UnsupportedArgumentError(
            f"save_pretrained({name}={value!r}): loracast does not implement this argument{allowed}; {fix}")


def _reject_unknown_kwargs(where: str, kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        hint = " (use adapter_dtype= to choose the adapter dtype)" if {"torch_dtype", "dtype"} & set(unknown) else ""
        raise UnsupportedArgumentError(f"{where}() got unexpected arguments {unknown}{hint}")
    if kwargs.get("subfolder"):
        raise UnsupportedArgumentError(f"{where}(): pass the sub-folder in the path instead of subfolder=")


def _read_config(model_id: str | os.PathLike) -> LoraConfig:
    path = os.fspath(model_id)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"adapter folder {path!r} does not exist; loracast loads adapters from local folders "
            f"(holding {CONFIG_NAME} and {WEIGHTS_NAME}). For a Hub repo, download it first with "
            "huggingface_hub.snapshot_download")
    return LoraConfig.from_pretrained(path)
