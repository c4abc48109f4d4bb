"""Saving and loading adapters in PEFT's format, as methods of `PeftModel`.

`AdapterFiles` is a mixin: `PeftModel` inherits `save_pretrained`, `load_adapter` and
`from_pretrained` from it, and it relies on `PeftModel`'s `base_model`, `peft_config`,
`_add`, `_remove_everywhere` and `_precision_plans`. Kept apart so that peft_model.py holds the
adapter API and this module the file I/O around it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from loracast.config import LoraConfig
from loracast.dtypes import parse_dtype
from loracast.errors import LoracastError, PrecisionError, PrecisionWarning, UnsupportedArgumentError
from loracast.files.fingerprint import build_fingerprint, check_loaded_adapter, fingerprint_metadata, parse_fingerprint
from loracast.files.folder import AdapterFolder, read_adapter_folder, write_adapter_folder
from loracast.files.format import (
    WEIGHTS_NAME,
    adapter_tensors,
    load_adapter_tensors,
    prepare_for_safetensors,
    trained_bias_tensors,
)
from loracast.files.pissa_to_lora import converted_config, subtract_initial
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
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **kwargs: Any) -> None:
        """Write adapters in PEFT's format: the default one in `save_directory`, others in sub-folders.

        `save_dtype` (e.g. torch.bfloat16) writes smaller files; loading still gives the dtypes of
        the precision rules. Each adapter is written as a unit: its config is validated first, and
        after an interruption at any moment the folder loads as the old adapter or the new one, or
        is refused as a mix (see `loracast.files.folder`). A model sharded with FSDP2 is saved
        by calling this on every rank with ``is_main_process=(rank == 0)``: all ranks gather the
        adapter tensors and rank 0 writes them.

        `path_initial_model_for_weight_conversion` (PEFT's option): the folder a PiSSA / OLoRA /
        LoftQ adapter was saved to before training; the adapter is then written as the plain
        rank-2r LoRA adapter that applies the same change to the original, unmodified base.

        Of PEFT's other arguments, the ones that change nothing here are accepted at their
        harmless values (`save_embedding_layers` "auto" or False, `push_to_hub=False`); anything
        else is refused.

        Raises:
            ValueError: an unknown adapter is selected, or `safe_serialization=False` is asked for.
            UnsupportedArgumentError: an argument loracast does not implement (`push_to_hub=True`,
                `max_shard_size`, `state_dict`, ...).
            ConfigError: a config is invalid or cannot be written as JSON (nothing is written for it).
            ConfigError / AdapterLoadError: the initial adapter does not fit (see `files.pissa_to_lora`).
            OSError: a file could not be written; that adapter's earlier files are unchanged.
        """
        if not safe_serialization:
            raise LoracastError("loracast writes only safetensors (pickle files can run code when read); "
                                "drop safe_serialization=False")
        _refuse_unsupported_save_kwargs(kwargs)
        dtype = parse_dtype(save_dtype, "save_dtype")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise LoracastError(f"selected_adapters {unknown} not found; this model has {sorted(self.peft_config)}")
        root = os.fspath(save_directory)
        if os.path.isfile(root):
            raise LoracastError(f"save_directory {root!r} is a file; give a folder path")
        for name in names:
            self.peft_config[name].validate()  # before any rank gathers or writes anything
        for name in names:
            # FSDP2-sharded tensors are gathered here, on every rank together; only the main process writes
            tensors = self.adapter_state_dict(name, dtype)
            if not is_main_process:
                continue
            config = self.peft_config[name]
            if path_initial_model_for_weight_conversion is not None:
                tensors = subtract_initial(tensors, path_initial_model_for_weight_conversion)
                config = converted_config(config)
            folder = root if name == "default" else os.path.join(root, check_adapter_name(name))
            write_adapter_folder(folder, tensors, self._file_metadata(name, dtype), config)

    def _file_metadata(self, adapter_name: str, save_dtype: torch.dtype | None = None) -> dict[str, str]:
        """safetensors header metadata: PEFT's {"format": "pt"} plus the precision fingerprint
        (`loracast.fingerprint`; PEFT ignores metadata it does not know)."""
        fingerprint = build_fingerprint(self.base_model.model, adapter_name,
                                        self._precision_plans.get(adapter_name), save_dtype)
        return {"format": "pt", **fingerprint_metadata(fingerprint)}

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                     allow_pickle: bool = False, *, precision: str | None = None, strict_precision: bool = False,
                     allow_nonfinite: bool = False, **kwargs: Any) -> None:
        """Add an adapter read from a folder written by loracast or PEFT (inactive until `set_adapter`).

        Dtypes and `allow_nonfinite` as in `from_pretrained`; the saved fingerprint is compared with
        this model and environment (a `PrecisionWarning`, or with `strict_precision` a `PrecisionError`).
        When `adapter_name` exists already, its values are replaced by the file's, in place, as PEFT
        does (what `Trainer` relies on to resume or restore the best checkpoint): the tensors, and so
        an optimizer holding them, stay the same objects.

        Raises:
            FileNotFoundError: no adapter files at `model_id`.
            AdapterLoadError / ConfigError: the files do not fit this model or are malformed.
            PrecisionError: the precision arguments conflict, or `strict_precision` and the
                fingerprint differs.
        """
        _reject_unknown_kwargs("load_adapter", kwargs)
        files = read_adapter_folder(model_id, allow_pickle)
        fingerprint = _usable_fingerprint(files, precision)
        if adapter_name in self.peft_config:
            self._load_weights(files, adapter_name, fingerprint, strict_precision, allow_nonfinite)
            return
        files.config.inference_mode = not is_trainable
        plan = resolve_precision(self.base_model.model, precision, autocast_adapter_dtype, adapter_dtype,
                                 fingerprint=fingerprint, loading=True)
        self._add(adapter_name, files.config, plan, initialize=False)
        try:
            self._load_weights(files, adapter_name, fingerprint, strict_precision, allow_nonfinite)
        except BaseException:
            self._remove_everywhere(adapter_name)
            raise
        self.base_model.set_adapter(self.active_adapters)

    def _load_weights(self, files: AdapterFolder, adapter_name: str, fingerprint: dict | None = None,
                      strict_precision: bool = False, allow_nonfinite: bool = False) -> None:
        folder = files.path
        model = self.base_model.model
        config = self.peft_config[adapter_name]
        targets = adapter_tensors(model, adapter_name)
        load_adapter_tensors(model, files.tensors, targets, source=os.path.join(folder, WEIGHTS_NAME),
                             optional=trained_bias_tensors(model, adapter_name, config.bias),
                             allow_nonfinite=allow_nonfinite)
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
                        strict_precision: bool = False, allow_nonfinite: bool = False, **kwargs: Any) -> _Model:
        """Wrap `model` with an adapter read from a folder written by loracast or PEFT.

        Adapter dtypes follow `precision` (a `loracast.precision.policies` name; "match-training" restores
        the dtypes recorded at save) or the knobs, as in `get_peft_model`. A loracast-written
        adapter's fingerprint is compared with this model and environment: each difference is
        listed in one `PrecisionWarning`, or raised as a `PrecisionError` with `strict_precision`; a
        damaged fingerprint is warned about and ignored. NaN or infinite values in the weights are
        refused unless `allow_nonfinite=True` (then loaded, with a warning). A `config` given here
        is used instead of the folder's, which is then neither read nor checked against the weights.

        Raises:
            FileNotFoundError: no adapter at `model_id` (loracast reads local folders only).
            AdapterLoadError / ConfigError: the files do not fit this model, are malformed, hold
                non-finite values, or come from two different saves (an interrupted save).
            PrecisionError: the precision arguments conflict, or `strict_precision` and the
                fingerprint differs.
        """
        _reject_unknown_kwargs("from_pretrained", kwargs)
        files = read_adapter_folder(model_id, allow_pickle, config=config)
        files.config.inference_mode = not is_trainable
        fingerprint = _usable_fingerprint(files, precision)
        plan = resolve_precision(model, precision, autocast_adapter_dtype, adapter_dtype,
                                 fingerprint=fingerprint, loading=True)
        peft_model = cls._for_loading(model, files.config, adapter_name, plan)
        try:
            peft_model._load_weights(files, adapter_name, fingerprint, strict_precision, allow_nonfinite)
        except BaseException:
            peft_model.base_model.unload()
            raise
        return peft_model


_IGNORED_KWARGS = {"low_cpu_mem_usage", "torch_device", "ephemeral_gpu_offload", "subfolder"}

# PEFT's save_pretrained arguments that change nothing at these values (the first is PEFT's default).
_HARMLESS_SAVE_KWARGS: dict[str, tuple[Any, ...]] = {
    "save_embedding_layers": ("auto", False),
    "push_to_hub": (False,),
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


def _usable_fingerprint(files: AdapterFolder, precision: str | None) -> dict[str, Any] | None:
    """The folder's fingerprint; a damaged one is warned about and ignored, or refused when
    `precision="match-training"` needs it."""
    try:
        return parse_fingerprint(files.metadata)
    except ValueError as exc:
        path = os.path.join(files.path, WEIGHTS_NAME)
        if precision == "match-training":
            raise PrecisionError(f"{path}: precision='match-training' needs the dtypes recorded at save, but {exc}; "
                                 "load it with precision='stable' or 'fast', or save the adapter again") from None
        warnings.warn(f"{path}: {exc}; the adapter is loaded without comparing its precision fingerprint",
                      PrecisionWarning, stacklevel=3)
        return None
