"""What the doctor inspects, read into one `Inventory` whatever the input was.

A live model is walked with `loracast.precision.view`; a saved adapter folder is read from its files
(config JSON, safetensors tensors and metadata, the fingerprint when loracast wrote it); an
adapter with a base model is loaded into a copy of the base the way `PeftModel.from_pretrained`
does and then walked like a live model, with the files' dtypes and fingerprint attached. The
checks in `checks` read only the `Inventory`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loracast.config import CONFIG_NAME
from loracast.diagnostics.base_state import BaseState, collect_base_state
from loracast.diagnostics.report import UnreadableInput
from loracast.distributed.accelerate_env import accelerate_fsdp_launched
from loracast.dtypes import dtype_from_name
from loracast.errors import PrecisionWarning
from loracast.files.fingerprint import (
    Difference,
    build_fingerprint,
    compare_fingerprints,
    environment,
    parse_fingerprint,
)
from loracast.files.format import KEY_PREFIX, adapter_tensors, read_adapter_weights
from loracast.integrations.hf_loading import quiet_transformers
from loracast.layers.compute import adapter_compute_record
from loracast.precision.view import (
    ROLES,
    BaseLayerInfo,
    adapter_tensors_of,
    base_layer_info,
    base_parameters,
    is_lora_layer,
    is_saved_wrapper,
    model_dtype,
    quantized_layers,
)
from loracast.tuner.peft_model import PeftModel

_FILE_KEY = re.compile(r"^(?P<module>.+)\.(?P<container>" + "|".join(ROLES) + r")(?:\.(?P<param>[^.]+))?$")


@dataclass
class TensorRecord:
    """One adapter tensor, from a live model or a file."""

    name: str                  # parameter name (live) or file key (folder)
    module: str                # adapted module path
    adapter: str
    role: str                  # "A", "B", "B.bias", "magnitude", "copy", or "base" (a base tensor a file carries)
    dtype: torch.dtype         # in memory (live) or in the file
    values: torch.Tensor
    requires_grad: bool | None = None
    device: str | None = None
    file_dtype: torch.dtype | None = None     # the dtype in the saved file, when a file was read
    trained_dtype: torch.dtype | None = None  # the in-memory dtype at save, from the fingerprint


@dataclass
class Inventory:
    """Everything the checks look at."""

    subject: str
    kind: str
    live: bool
    tensors: list[TensorRecord] = field(default_factory=list)
    base_layers: dict[str, BaseLayerInfo] = field(default_factory=dict)
    quantized: list[BaseLayerInfo] = field(default_factory=list)
    model_dtype: torch.dtype | None = None
    base_params: Counter = field(default_factory=Counter)  # dtype -> number of base parameters (live)
    base_grad: list[tuple[str, torch.dtype]] = field(default_factory=list)
    integer_params: list[tuple[str, torch.dtype]] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprints: dict[str, dict | None] = field(default_factory=dict)
    fingerprint_problems: dict[str, str] = field(default_factory=dict)
    differences: dict[str, list[Difference]] = field(default_factory=dict)
    load_problems: dict[str, str] = field(default_factory=dict)
    fsdp_reason: str | None = None
    fsdp1_setup: str | None = None  # the FSDP1 wrap the flatten prediction assumed (live models)
    fsdp1_problems: list[str] = field(default_factory=list)  # units that wrap would fail to flatten
    peft_model: bool = False  # a live model of PEFT itself (its adapters work there whatever loracast supports)
    base_state: BaseState | None = None  # the frozen base of a live model (`base_state`)
    notes: list[str] = field(default_factory=list)


# -- entry ---------------------------------------------------------------------------------------

def collect(model_or_path: Any, base: Any = None, fsdp: bool | None = None) -> Inventory:
    """Read a model, an adapter folder, or an adapter folder with its base into an `Inventory`.

    Raises:
        UnreadableInput: the input cannot be read; the message says why.
    """
    if isinstance(model_or_path, nn.Module):
        if base is not None:
            raise UnreadableInput("base= goes with an adapter folder; a live model already holds its base")
        return _from_model(model_or_path, type(model_or_path).__name__, "model", fsdp)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise UnreadableInput(f"cannot inspect a {type(model_or_path).__name__}: pass a model (nn.Module) or the "
                              "path of an adapter folder")
    path = os.fspath(model_or_path)
    if not os.path.exists(path):
        raise UnreadableInput(f"{path} does not exist")
    if not os.path.isdir(path):
        raise UnreadableInput(f"{path} is a file; pass the folder that holds {CONFIG_NAME}")
    folders = adapter_folders(path)
    if not folders:
        if os.path.isfile(os.path.join(path, "config.json")) and base is None:
            return _from_model(load_model_folder(path), path, "model folder", fsdp)
        raise UnreadableInput(f"no {CONFIG_NAME} in {path} or its sub-folders: pass a folder written by "
                              "save_pretrained (loracast or PEFT)")
    files = {name: _read_files(folder) for name, folder in folders.items()}
    if base is None:
        inventory = Inventory(path, "adapter folder", live=False)
        for name, adapter in files.items():
            _add_files(inventory, name, adapter, compare_environment=True)
        _set_fsdp(inventory, fsdp, None)
        return inventory
    return _with_base(path, folders, files, base, fsdp)


# -- folders ----------------------------------------------------------------------------------------

def adapter_folders(path: str) -> dict[str, str]:
    """Adapter name -> folder: the root ("default") and each sub-folder holding an adapter."""
    found: dict[str, str] = {}
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        found["default"] = path
    for entry in sorted(os.listdir(path)):
        sub = os.path.join(path, entry)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found[entry] = sub
    return found


@dataclass
class _AdapterFiles:
    folder: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    fingerprint: dict | None
    fingerprint_problem: str | None


def _read_files(folder: str) -> _AdapterFiles:
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as exc:
        raise UnreadableInput(f"{config_path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise UnreadableInput(f"cannot read {config_path}: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise UnreadableInput(f"{config_path} holds a JSON {type(config).__name__}, not an object")
    try:
        tensors, file_metadata = read_adapter_weights(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise UnreadableInput(str(exc)) from None
    try:
        fingerprint, problem = parse_fingerprint(file_metadata), None
    except ValueError as exc:
        fingerprint, problem = None, str(exc)
    return _AdapterFiles(folder, config, tensors, fingerprint, problem)


def _file_records(name: str, files: _AdapterFiles) -> list[TensorRecord]:
    saved_modules = files.config.get("modules_to_save") or []
    recorded = (files.fingerprint or {}).get("adapter_dtypes") or {}
    records = []
    for key, tensor in files.tensors.items():
        full_key = key if key.startswith(KEY_PREFIX) else KEY_PREFIX + key
        short = full_key[len(KEY_PREFIX):]
        found = _FILE_KEY.match(short)
        if found:
            module = found["module"]
            role = ROLES[found["container"]] + (".bias" if found["param"] == "bias" else "")
        else:
            module = short.rpartition(".")[0]
            is_copy = any(module == m or module.endswith("." + m) for m in saved_modules)
            role = "copy" if is_copy else "base"
        records.append(TensorRecord(full_key, module, name, role, tensor.dtype, tensor, file_dtype=tensor.dtype,
                                    trained_dtype=dtype_from_name(recorded.get(full_key))))
    return records


def _layer_from_record(module: str, record: str) -> BaseLayerInfo:
    """Invert `fingerprint._layer_record`: "bfloat16" or "<backend>:<storage>/<compute>"."""
    backend, _, dtypes = record.rpartition(":")
    storage, _, compute = dtypes.partition("/")
    storage_dtype = dtype_from_name(storage)
    return BaseLayerInfo(module, storage_dtype, dtype_from_name(compute) if backend else storage_dtype,
                         backend or None, None)


def _add_files(inventory: Inventory, name: str, files: _AdapterFiles, compare_environment: bool) -> None:
    inventory.configs[name] = files.config
    inventory.fingerprints[name] = files.fingerprint
    if files.fingerprint_problem:
        inventory.fingerprint_problems[name] = files.fingerprint_problem
    inventory.tensors += _file_records(name, files)
    fingerprint = files.fingerprint
    if fingerprint is None:
        return
    if fingerprint.get("precision"):
        inventory.plans.setdefault(name, fingerprint["precision"])
    inventory.model_dtype = inventory.model_dtype or dtype_from_name(fingerprint.get("model_dtype"))
    for module, record in (fingerprint.get("base_layers") or {}).items():
        inventory.base_layers.setdefault(module, _layer_from_record(module, str(record)))
    if compare_environment:
        inventory.differences[name] = compare_fingerprints(fingerprint, {"environment": environment()})


# -- live models ------------------------------------------------------------------------------------

def _unwrap(obj: nn.Module) -> nn.Module:
    """The module holding the LoRA layers: PeftModel.base_model.model for PEFT's and loracast's."""
    tuner = getattr(obj, "base_model", None)
    if hasattr(obj, "peft_config") and isinstance(getattr(tuner, "model", None), nn.Module):
        return tuner.model
    return obj


def _config_dict(config: Any) -> dict[str, Any]:
    to_dict = getattr(config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else dict(vars(config))


def _trained_bias_names(model: nn.Module, configs: dict[str, dict]) -> set[str]:
    modes = {c.get("bias", "none") for c in configs.values()}
    names = set()
    for name, _ in model.named_parameters():
        if not name.endswith(".bias"):
            continue
        owner = name[: -len(".bias")]
        if "all" in modes or ("lora_only" in modes and owner.endswith(".base_layer")):
            names.add(name)
    return names


def _from_model(obj: nn.Module, subject: str, kind: str, fsdp: bool | None) -> Inventory:
    model = _unwrap(obj)
    inventory = Inventory(subject, kind, live=True, peft_model=type(obj).__module__.startswith("peft."))
    inventory.configs = {name: _config_dict(c) for name, c in (getattr(obj, "peft_config", None) or {}).items()}
    for t in adapter_tensors_of(model):
        inventory.tensors.append(TensorRecord(t.name, t.module, t.adapter, t.role, t.tensor.dtype, t.tensor.detach(),
                                              t.tensor.requires_grad, str(t.tensor.device)))
    for path, module in model.named_modules():
        if is_lora_layer(module):
            inventory.base_layers[path] = base_layer_info(path, module.get_base_layer())
        elif is_saved_wrapper(module):
            inventory.base_layers[path] = base_layer_info(path, module.original_module)
    inventory.quantized = list(quantized_layers(model))
    inventory.model_dtype = model_dtype(model)
    inventory.base_state = collect_base_state(model)
    trained_biases = _trained_bias_names(model, inventory.configs)
    for name, param in base_parameters(model):
        inventory.base_params[param.dtype] += 1
        if param.requires_grad and name not in trained_biases:
            inventory.base_grad.append((name, param.dtype))
        if not param.is_floating_point():
            inventory.integer_params.append((name, param.dtype))
    # PEFT's own PeftModel records neither how dtypes were chosen nor a fingerprint
    is_ours = isinstance(obj, PeftModel)
    plans = obj.precision_plans if is_ours else {}
    # the compute mode as the layers have it now, whatever the plan said
    inventory.plans = {name: {**plan.to_dict(), **adapter_compute_record(model, name)} for name, plan in plans.items()}
    for name, fingerprint in (obj.loaded_fingerprints if is_ours else {}).items():
        inventory.fingerprints[name] = fingerprint
        now = build_fingerprint(model, name, plans.get(name))
        inventory.differences[name] = compare_fingerprints(fingerprint, now)
        _attach_trained_dtypes(inventory, model, name, fingerprint)
    _set_fsdp(inventory, fsdp, obj)
    _predict_fsdp1(inventory, obj)
    return inventory


def _fsdp_wrapped_path(obj: nn.Module) -> str | None:
    """The path of the first module FSDP (1 or 2) wraps in `obj`, or None."""
    for path, module in obj.named_modules():
        if {c.__name__ for c in type(module).__mro__} & {"FullyShardedDataParallel", "FSDPModule"}:
            return path
    return None


def _predict_fsdp1(inventory: Inventory, obj: nn.Module) -> None:
    """Which units FSDP1 would fail to flatten, under accelerate's set-up from the environment
    (its defaults when not launched by it); skipped when FSDP is not in play, already wraps the
    model (it flattened), or accelerate is set to FSDP2."""
    if not inventory.fsdp_reason or _fsdp_wrapped_path(obj) is not None:
        return
    from loracast.distributed import accelerate_fsdp1_setup, fsdp1_flatten_problems

    try:
        setup = accelerate_fsdp1_setup(obj)
    except ValueError as exc:
        inventory.notes.append(f"FSDP1 flattening not predicted: {exc}")
        return
    if setup is not None:
        inventory.fsdp1_setup = setup.description
        problems = fsdp1_flatten_problems(obj, setup.policy, use_orig_params=setup.use_orig_params)
        inventory.fsdp1_problems = [str(p) for p in problems]


def _file_keys(model: nn.Module, adapter: str) -> dict[str, str]:
    """Parameter name in `model` -> the key the adapter's file uses for it (loracast models)."""
    key_of = {id(param): key for key, param in adapter_tensors(model, adapter).items()}
    return {name: key_of[id(param)] for name, param in model.named_parameters() if id(param) in key_of}


def _attach_trained_dtypes(inventory: Inventory, model: nn.Module, adapter: str, fingerprint: dict) -> None:
    recorded = fingerprint.get("adapter_dtypes") or {}
    keys = _file_keys(model, adapter)
    for record in inventory.tensors:
        key = keys.get(record.name)
        if record.adapter == adapter and key in recorded:
            record.trained_dtype = dtype_from_name(recorded[key])


def _set_fsdp(inventory: Inventory, fsdp: bool | None, obj: nn.Module | None) -> None:
    if fsdp is not None:
        inventory.fsdp_reason = "FSDP was requested" if fsdp else None
        return
    wrapped = _fsdp_wrapped_path(obj) if obj is not None else None
    if wrapped is not None:
        inventory.fsdp_reason = f"{wrapped or 'the model'} is wrapped by FSDP"
        return
    if accelerate_fsdp_launched():
        inventory.fsdp_reason = "ACCELERATE_USE_FSDP is set"
    elif any(plan.get("policy") == "fsdp" for plan in inventory.plans.values()):
        inventory.fsdp_reason = "an adapter was made with precision='fsdp'"


# -- adapter + base -------------------------------------------------------------------------------

def load_model_folder(path: str) -> nn.Module:
    """A transformers model from a local folder, in the dtype its config records.

    Raises:
        UnreadableInput: transformers is missing or the folder does not hold a loadable model.
    """
    try:
        import transformers
    except ImportError:
        raise UnreadableInput(f"reading the model folder {path} needs transformers: "
                              "pip install 'loracast[transformers]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        model_class = model_class or transformers.AutoModel
        with warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            return model_class.from_pretrained(path, local_files_only=True).eval()
    except Exception as exc:  # transformers raises many types for a bad folder; all mean "unreadable"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnreadableInput(f"cannot load a model from {path}: {type(exc).__name__}: {first_line}") from None


def _with_base(path: str, folders: dict[str, str], files: dict[str, _AdapterFiles], base: Any,
               fsdp: bool | None) -> Inventory:
    if isinstance(base, nn.Module):
        model, base_label = copy.deepcopy(base), type(base).__name__
    elif isinstance(base, (str, os.PathLike)):
        if not os.path.isdir(base):
            raise UnreadableInput(f"base model folder {os.fspath(base)} does not exist")
        model, base_label = load_model_folder(os.fspath(base)), os.fspath(base)
    else:
        raise UnreadableInput(f"base must be a model or a model folder path, not a {type(base).__name__}")
    peft_model = None
    problems: dict[str, str] = {}
    notes: list[str] = []
    for name, folder in folders.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warnings.simplefilter("ignore", PrecisionWarning)  # the doctor reports the differences itself
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name)
                else:
                    peft_model.load_adapter(folder, name)
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:  # AdapterLoadError, ConfigError among them
            problems[name] = f"{type(exc).__name__}: {exc}"
            continue
        said = sorted({str(w.message) for w in caught})
        notes += [f"loading adapter {name!r}: {m}" for m in said if "fields unknown to loracast" not in m]
    inventory = _from_model(peft_model if peft_model is not None else model, path, "adapter folder + base", fsdp)
    if peft_model is None:
        inventory.base_grad = []  # nothing was loaded, so nothing is being trained
    inventory.subject = f"{path} on {base_label}"
    inventory.notes += notes
    inventory.load_problems = problems
    loaded = set(peft_model.peft_config) if peft_model is not None else set()
    for name, adapter in files.items():
        if name in loaded:
            inventory.configs[name] = adapter.config
            if adapter.fingerprint_problem:
                inventory.fingerprint_problems[name] = adapter.fingerprint_problem
            inventory.fingerprints.setdefault(name, adapter.fingerprint)
            _attach_file_dtypes(inventory, peft_model, name, adapter)
        else:
            _add_files(inventory, name, adapter, compare_environment=True)
    return inventory


def _attach_file_dtypes(inventory: Inventory, peft_model: nn.Module, adapter: str, files: _AdapterFiles) -> None:
    keys = _file_keys(peft_model.base_model.model, adapter)
    saved = {k if k.startswith(KEY_PREFIX) else KEY_PREFIX + k: v for k, v in files.tensors.items()}
    for record in inventory.tensors:
        key = keys.get(record.name)
        if record.adapter == adapter and key in saved:
            record.file_dtype = saved[key].dtype
