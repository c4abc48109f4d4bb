"""PEFT's adapter files: `adapter_model.safetensors` + `adapter_config.json`.

Keys are the model's parameter names under ``base_model.model.`` with the adapter name removed
(``...q_proj.lora_A.default.weight`` is written ``...q_proj.lora_A.weight``; a modules_to_save
copy ``...score.modules_to_save.default.weight`` is written ``...score.weight``). Writes are
atomic: each file goes to a temporary name in the same folder and is renamed over the old one
only once complete, so a failed save leaves the previous adapter intact. Pickle files
(`adapter_model.bin`) are refused unless the caller opts in, and are then read with
``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from loracast.errors import AdapterLoadError
from loracast.layers import LoraLayer
from loracast.layers.modules_to_save import ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# Module names torch's wrappers insert into paths (FSDP1, activation checkpointing, torch.compile);
# files never hold them, so a wrapped model saves and loads the same keys as a plain one.
_WRAPPER_NAMES = re.compile(r"(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


# -- key mapping ---------------------------------------------------------------------------------

def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor for one adapter's own tensors in `model` (the model holding the
    LoRA layers): LoRA factors and modules_to_save copies.

    The same map serves saving (read the tensors) and loading (copy into them).
    """
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        prefix = KEY_PREFIX + (path + "." if path else "")
        if isinstance(module, LoraLayer):
            for container_name in module.adapter_layer_names:
                container = getattr(module, container_name)
                if adapter_name not in container:
                    continue
                entry = container[adapter_name]
                if isinstance(entry, nn.Parameter):
                    out[f"{prefix}{container_name}"] = entry
                elif container_name == "lora_magnitude_vector":  # PEFT's key drops the module's ".weight"
                    out[f"{prefix}{container_name}"] = entry.weight
                else:
                    for name, param in entry.named_parameters():
                        out[f"{prefix}{container_name}.{name}"] = param
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for name, param in module.modules_to_save[adapter_name].named_parameters():
                out[f"{prefix}{name}"] = param
    return _without_wrapper_names(out)


def _without_wrapper_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_WRAPPER_NAMES.sub("", key): tensor for key, tensor in tensors.items()}


def trained_bias_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """File key -> live base bias for the biases a config's `bias` mode trains and saves:
    every bias for "all", those of adapted layers for "lora_only", none for "none"."""
    out: dict[str, torch.Tensor] = {}
    if bias == "lora_only":
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.r:
                base_bias = getattr(module.get_base_layer(), "bias", None)
                if isinstance(base_bias, torch.Tensor):
                    out[f"{KEY_PREFIX}{path}.base_layer.bias"] = base_bias
    elif bias == "all":
        for name, param in _params_outside_adapters(model):
            if name.rsplit(".", 1)[-1] == "bias":
                out[KEY_PREFIX + name] = param
    return _without_wrapper_names(out)


def _params_outside_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    adapter_ids = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for container_name in module.adapter_layer_names:
                adapter_ids.update(id(p) for p in getattr(module, container_name).parameters())
        elif isinstance(module, ModulesToSaveWrapper):
            adapter_ids.update(id(p) for p in module.modules_to_save.parameters())
    for name, param in model.named_parameters():
        if id(param) not in adapter_ids:
            yield name, param


def prepare_for_safetensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                            ) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no memory (safetensors refuses otherwise),
    floating ones cast to `dtype` when given. Sharded (FSDP2) tensors are gathered first, which
    every rank must do together (see `full_tensor`)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        t = full_tensor(tensor.detach())
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    return out


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or, for a parameter sharded by FSDP2 (a DTensor), all of it gathered from
    its shards: a collective, so every rank must make the same calls in the same order."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support: nothing can be sharded
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# -- reading -------------------------------------------------------------------------------------

def read_adapter_weights(folder: str, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of a saved adapter (CPU tensors).

    Raises:
        FileNotFoundError: neither adapter file is in `folder`.
        AdapterLoadError: only a pickle file exists and `allow_pickle` is False, or the file is unreadable.
    """
    safetensors_path = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(safetensors_path):
        try:
            with safe_open(safetensors_path, framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except BaseException as exc:  # safetensors raises its own error types for corrupt files
            if not _is_reader_error(exc):
                raise
            raise AdapterLoadError(f"cannot read {safetensors_path}: {exc}. The file is damaged or not a "
                                   "safetensors file; save the adapter again") from exc
        return tensors, metadata
    legacy_path = os.path.join(folder, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy_path):
        if not allow_pickle:
            raise AdapterLoadError(
                f"{legacy_path} is a pickle file, which can run code when read; loracast reads only "
                f"{WEIGHTS_NAME} by default. If you trust its source, convert it once to safetensors with "
                f"`loracast convert {folder} OUT --allow-pickle` (or pass allow_pickle=True; either way it is "
                "read with torch.load(weights_only=True))")
        try:
            state = torch.load(legacy_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterLoadError(f"cannot read {legacy_path} with weights_only=True: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterLoadError(f"{legacy_path} does not hold a dict of tensors")
        return state, {}
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {folder!r}: pass the folder "
                            "written by save_pretrained")


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def _is_reader_error(exc: BaseException) -> bool:
    # the Rust reader reports some damaged headers by a panic, a BaseException (pyo3's PanicException)
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                         source: str, optional: dict[str, torch.Tensor] | None = None,
                         allow_nonfinite: bool = False) -> None:
    """Copy checkpoint `tensors` into the adapter's live tensors (`targets`, from `adapter_tensors`).

    The live tensors keep their dtype (set by the precision rules); values are rounded into it.
    Other keys that name a model parameter (trained biases, base tensors PEFT saves) are loaded
    into it; keys naming nothing are reported in one warning.

    NaN or infinite values (in the file, or after rounding into the live dtype) are refused
    before anything is copied, unless `allow_nonfinite` (then one warning names the tensors).

    Raises:
        AdapterLoadError: the file holds no tensors, a tensor is not floating point, a shape does not
            fit (key and both shapes named), a tensor holds NaN/inf values, or weights for targeted
            modules are missing (named).
    """
    if not tensors:
        raise AdapterLoadError(f"{source} holds no tensors; it is not a trained adapter")
    normalized = {key if key.startswith(KEY_PREFIX) else KEY_PREFIX + key: value for key, value in tensors.items()}
    extra_targets: dict[str, torch.Tensor] | None = None
    unexpected: list[str] = []
    nonfinite: list[str] = []
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, value in normalized.items():
        target = targets.get(key)
        if target is None and optional:
            target = optional.get(key)
        if target is None:
            if extra_targets is None:  # base tensors a file may carry (e.g. PEFT's saved embeddings)
                extra_targets = {KEY_PREFIX + name: p for name, p in _params_outside_adapters(model)}
            target = extra_targets.get(key)
            if target is None:
                unexpected.append(key)
                continue
        if not value.is_floating_point():
            raise AdapterLoadError(f"{source}: tensor {key!r} has dtype {value.dtype}; adapter tensors must be "
                                   "floating point")
        if tuple(value.shape) != tuple(target.shape):
            raise AdapterLoadError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target.shape)}; the adapter was trained for a different base model or config "
                "(check r, rank_pattern and the base model)")
        value = value.to(target.dtype)  # rounded as the copy would; a huge value may become inf here
        if not bool(torch.isfinite(value).all()):
            nonfinite.append(key)
        pairs.append((target, value))
    loaded = {key for key in normalized if key not in unexpected}
    missing = [key for key in targets if key not in loaded]
    if missing:
        shown = _listed(missing)
        raise AdapterLoadError(
            f"{source} lacks weights for modules the config targets: {shown}. The file does not belong to "
            "this config, or was saved incompletely; loading it would leave a fresh, untrained adapter")
    if nonfinite:
        shown = _listed(nonfinite)
        message = (f"{source}: tensors holding NaN or infinite values (in the file or once rounded to the "
                   f"model's dtype): {shown}")
        if not allow_nonfinite:
            raise AdapterLoadError(message + ". The model would return non-finite outputs; the training run that "
                                   "saved it diverged. Load an earlier checkpoint, or pass allow_nonfinite=True to "
                                   "load it anyway (e.g. to inspect it)")
        warnings.warn(message + "; loaded as asked (allow_nonfinite=True)", UserWarning, stacklevel=3)
    with torch.no_grad():  # only once every check passed: a refused file changes nothing
        for target, value in pairs:
            target.copy_(value)
    if unexpected:
        shown = _listed(unexpected)
        warnings.warn(f"{source}: tensors that match nothing in the model were ignored: {shown}",
                      UserWarning, stacklevel=3)
