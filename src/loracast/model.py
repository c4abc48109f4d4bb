"""`PeftModel` and `get_peft_model`: PEFT's LoRA API over loracast's layers.

The module tree is PEFT's: ``PeftModel.base_model`` is a `LoraModel` whose ``.model`` is the
user's model with LoRA layers injected in place, so parameter names
(``base_model.model.<path>.lora_A.default.weight``) and state dicts match PEFT's.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .compute import set_lora_compute
from .config import CONFIG_NAME, LoraConfig
from .fingerprint import build_fingerprint, check_loaded_adapter, fingerprint_metadata, read_fingerprint
from .integrations import transformers as transformers_integration
from .inject import (TASK_HEADS, inject_adapter, iter_adapter_modules, iter_lora_layers, iter_wrappers,
                     wrap_modules_to_save)
from .io import (KEY_PREFIX, WEIGHTS_NAME, adapter_tensors, atomic_save_safetensors, load_adapter_tensors,
                 prepare_for_safetensors, read_adapter_weights, trained_bias_tensors)
from .layers import LoraLayer
from .modules_to_save import ModulesToSaveWrapper
from .policies import PrecisionPlan, apply_recorded_dtypes, resolve_precision
from .precision import parse_dtype
from .quant.merge import requantization_report

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
BASE_ONLY = "__base__"  # per-sample adapter name meaning "no adapter"


def check_adapter_name(name: Any) -> str:
    """Return `name` if it can name an adapter (a module key and a folder name).

    Raises:
        ValueError: it is empty, reserved, or holds characters other than letters, digits, '_' and '-'.
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name == BASE_ONLY:
        raise ValueError(f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-' (it becomes a "
                         f"module key and a folder name), not starting with '-', and not {BASE_ONLY!r}")
    return name


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
            raise ValueError(f"adapter(s) {unknown} not found; this model has {sorted(self.peft_config)}")
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
            for name, layer in list(self.lora_layers()):
                if merge:
                    layer.merge(names, safe_merge=safe_merge, keep_restore=False)
                elif layer.merged:
                    layer.unmerge()
                _replace(self.model, name, layer.get_base_layer())
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


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _freeze_all(model: nn.Module) -> bool:
    """Freeze every parameter of `model`; returns whether activation checkpointing is on.

    One walk for both. The flag is transformers' ``is_activation_checkpointing`` (some module's
    ``gradient_checkpointing`` is set), read from each module's dict rather than through
    nn.Module's slow attribute fallback.
    """
    checkpointing = False
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                param.requires_grad_(False)
        if not checkpointing:
            checkpointing = bool(module.__dict__.get("gradient_checkpointing",
                                                     getattr(type(module), "gradient_checkpointing", False)))
    return checkpointing


class PeftModel(nn.Module):
    """A model with LoRA adapters, with PEFT's `PeftModel` API.

    Adapter dtypes follow `loracast.precision` (explicit `adapter_dtype` > autocast flag > base dtype),
    or a named `precision` policy (`loracast.policies`).
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                 low_cpu_mem_usage: bool = False, *, precision: str | None = None, _initialize: bool = True,
                 _plan: PrecisionPlan | None = None) -> None:
        super().__init__()
        self._precision_plans: dict[str, PrecisionPlan] = {}  # adapter -> how its dtypes were chosen
        self._fingerprints: dict[str, dict] = {}  # adapter -> fingerprint of the file it was loaded from
        if isinstance(model, PeftModel):
            raise ValueError("the model already is a PeftModel; use add_adapter() to add another adapter")
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"peft_config must be a loracast LoraConfig, got {type(peft_config).__name__}; "
                            "build it with loracast.LoraConfig(...) or LoraConfig.from_dict(peft_config.to_dict())")
        checkpointing = _freeze_all(model)  # the base is frozen; adapters decide their own requires_grad
        plan = _plan or resolve_precision(model, precision, autocast_adapter_dtype, adapter_dtype)
        self.base_model = LoraModel(model)
        self._add(adapter_name, peft_config, plan, _initialize)
        self.base_model.set_adapter(adapter_name)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            # reentrant checkpointing needs an input that requires grad, or no grad reaches the adapters
            model.enable_input_require_grads()
        transformers_integration.install(self)  # Trainer / save_pretrained see an adapter model

    # -- attribute forwarding, as PEFT: unknown attributes come from the wrapped model ------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name -> config."""
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters."""
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str:
        """Name of the (first) active adapter."""
        active = self.base_model.active_adapters
        return active[0] if active else ""

    def get_base_model(self) -> nn.Module:
        """The adapted model itself (LoRA layers in place)."""
        return self.base_model.model

    # -- adapters -------------------------------------------------------------------------------

    def _add(self, adapter_name: str, config: LoraConfig, plan: PrecisionPlan, initialize: bool) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.base_model.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        model = self.base_model.model
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        heads = TASK_HEADS.get(config.task_type or "", [])
        if heads:
            config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + heads))
        self.base_model.peft_config[adapter_name] = config
        self._precision_plans[adapter_name] = plan
        try:
            inject_adapter(model, config, adapter_name, autocast_adapter_dtype=plan.autocast_adapter_dtype,
                           adapter_dtype=plan.adapter_dtype, initialize=initialize)
            wrap_modules_to_save(model, config, adapter_name, autocast_adapter_dtype=plan.autocast_adapter_dtype,
                                 adapter_dtype=plan.adapter_dtype)
            if plan.lora_compute != "exact":
                set_lora_compute(model, plan.lora_compute, adapter_name)
        except BaseException:
            self._remove_everywhere(adapter_name)
            raise

    def _remove_everywhere(self, adapter_name: str) -> None:
        self.base_model.peft_config.pop(adapter_name, None)
        self._precision_plans.pop(adapter_name, None)
        self._fingerprints.pop(adapter_name, None)
        for _, module in list(self.base_model.lora_layers()) + list(self.base_model.wrappers()):
            if adapter_name in module.adapter_names:
                module.delete_adapter(adapter_name)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                    precision: str | None = None) -> None:
        """Add a new, inactive adapter (activate it with `set_adapter`); dtypes as in `get_peft_model`."""
        plan = resolve_precision(self.base_model.model, precision, autocast_adapter_dtype, adapter_dtype)
        self._add(adapter_name, peft_config, plan, True)
        self.base_model.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make `adapter_name` the active adapter; only it trains.

        Raises:
            ValueError: no such adapter.
        """
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active.

        Raises:
            ValueError: no such adapter.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; this model has {sorted(self.peft_config)}")
        if any(adapter_name in layer.merged_adapters for _, layer in self.base_model.lora_layers()):
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() "
                               "before deleting it")
        active = [n for n in self.active_adapters if n != adapter_name]
        self._remove_everywhere(adapter_name)
        if not active and self.peft_config:
            active = [next(iter(self.peft_config))]
        if active:
            self.base_model.set_adapter(active)
        else:
            self.base_model._active_adapters = []

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; merged adapters are unmerged exactly and merged back."""
        layers = [layer for _, layer in self.base_model.lora_layers()]
        wrappers = [wrapper for _, wrapper in self.base_model.wrappers()]
        merged = {id(layer): list(layer.merged_adapters) for layer in layers if layer.merged}
        try:
            for layer in layers:
                if layer.merged:
                    layer.unmerge()
                layer.enable_adapters(False)
            for wrapper in wrappers:
                wrapper.enable_adapters(False)
            yield
        finally:
            with requantization_report():
                for layer in layers:
                    layer.enable_adapters(True)
                    if id(layer) in merged:
                        layer.merge(merged[id(layer)])
            for wrapper in wrappers:
                wrapper.enable_adapters(True)

    # -- forward ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _per_sample_adapters(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        known = set(self.peft_config) | {BASE_ONLY}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(f"adapter_names holds unknown adapter(s) {unknown}; known: {sorted(known)}")
        modules = [m for _, m in list(self.base_model.lora_layers()) + list(self.base_model.wrappers())]
        if any(isinstance(m, LoraLayer) and m.merged for m in modules):
            raise ValueError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        try:
            for module in modules:
                module._batch_adapter_names = list(adapter_names)
            yield
        finally:
            for module in modules:
                module._batch_adapter_names = None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; `adapter_names` picks an adapter per sample ('__base__': none)."""
        with self._per_sample_adapters(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's `generate`, with the active adapters (or per-sample `adapter_names`)."""
        with self._per_sample_adapters(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    # -- merge -----------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: active) into the base weights, rounding once; idempotent."""
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore the base weights bit for bit."""
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge adapters into the base and return the plain model."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the plain model."""
        return self.base_model.unload()

    def merge_restore_nbytes(self) -> int:
        """Bytes held so that unmerge can restore the base exactly."""
        return sum(layer.merge_restore_nbytes for _, layer in self.base_model.lora_layers())

    # -- counting --------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # -- files -----------------------------------------------------------------------------------

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

        Raises:
            ValueError: an unknown adapter is selected, or `safe_serialization=False` is asked for.
        """
        if not safe_serialization:
            raise ValueError("loracast writes only safetensors (pickle files can run code when read); "
                             "drop safe_serialization=False")
        unknown_kwargs = set(kwargs) - {"save_embedding_layers", "max_shard_size", "push_to_hub"}
        if unknown_kwargs:
            raise TypeError(f"save_pretrained got unexpected arguments {sorted(unknown_kwargs)}")
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
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                        allow_pickle: bool = False, *, precision: str | None = None,
                        strict_precision: bool = False, **kwargs: Any) -> "PeftModel":
        """Wrap `model` with an adapter read from a folder written by loracast or PEFT.

        Adapter dtypes follow `precision` (a `loracast.policies` name; "match-training" restores
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
        peft_model = cls(model, config, adapter_name, _initialize=False, _plan=plan)
        try:
            peft_model._load_weights(model_id, adapter_name, allow_pickle, fingerprint, strict_precision)
        except BaseException:
            peft_model.base_model.unload()
            raise
        return peft_model


_IGNORED_KWARGS = {"low_cpu_mem_usage", "torch_device", "ephemeral_gpu_offload", "subfolder"}


def _reject_unknown_kwargs(where: str, kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        hint = " (use adapter_dtype= to choose the adapter dtype)" if {"torch_dtype", "dtype"} & set(unknown) else ""
        raise TypeError(f"{where}() got unexpected arguments {unknown}{hint}")
    if kwargs.get("subfolder"):
        raise TypeError(f"{where}(): pass the sub-folder in the path instead of subfolder=")


def _read_config(model_id: str | os.PathLike) -> LoraConfig:
    path = os.fspath(model_id)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"adapter folder {path!r} does not exist; loracast loads adapters from local folders "
            f"(holding {CONFIG_NAME} and {WEIGHTS_NAME}). For a Hub repo, download it first with "
            "huggingface_hub.snapshot_download")
    return LoraConfig.from_pretrained(path)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool | None = None, revision: str | None = None,
                   low_cpu_mem_usage: bool = False, adapter_dtype: torch.dtype | str | None = None,
                   precision: str | None = None) -> PeftModel:
    """Add a LoRA adapter to `model` and return it wrapped in a `PeftModel`.

    Adapter dtype, in order of precedence: `adapter_dtype` if given; else float32 when
    `autocast_adapter_dtype` is True (the default) and the base is fp16/bf16; else the base
    layer's dtype (a quantized layer's compute dtype). Or name a policy with `precision`
    ("stable", "mixed", "fast", "fsdp"; see `loracast.policies`), which sets all of these at once; a knob
    passed with it must agree with it. Base parameters are frozen.

    Raises:
        ValueError: target_modules matches nothing (the message lists module names), or a matched
            module cannot carry LoRA.
        PrecisionError: the precision arguments conflict, or the base cannot satisfy the policy.
    """
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel) is not supported; loracast models hold several LoRA "
                         "adapters without it (add_adapter / set_adapter)")
    if revision is not None:
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     adapter_dtype=adapter_dtype, precision=precision)
