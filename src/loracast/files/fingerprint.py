"""The precision fingerprint saved with an adapter, and its comparison on load.

`save_pretrained` writes, as one JSON string under the safetensors metadata key
``loracast.fingerprint`` (PEFT reads only the tensors, so the file still loads there), what
decides the adapter's numbers: the dtype each tensor had in memory when saved ("trained"
dtype) and the dtype it was written in, the base model's dtype and the storage/compute dtypes
of every adapted base layer, the quantization config, the precision policy and autocast
choice, the library versions and the device type. Loading compares it with the model and
environment at hand and reports each difference in one warning (`PrecisionWarning`), or
raises `PrecisionError` with ``strict_precision=True``. A damaged fingerprint (`parse_fingerprint`
raises) is warned about and ignored by the loader. Adapters written by PEFT carry no
fingerprint and load as before.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections import defaultdict
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import torch
from torch import nn

from loracast.dtypes import dtype_name
from loracast.errors import PrecisionError, PrecisionWarning
from loracast.files.fingerprint_schema import fingerprint_problem
from loracast.files.format import adapter_tensors
from loracast.layers import LoraLayer
from loracast.layers.compute import adapter_compute_record
from loracast.precision.view import BaseLayerInfo, base_layer_info, model_dtype
from loracast.quant import find_backend
from loracast.quant.base import QUANT_LIBRARIES
from loracast.quant.merge import requantization_record

FINGERPRINT_KEY = "loracast.fingerprint"
FINGERPRINT_VERSION = 1
_QUANT_CONFIG_TYPES = (str, int, float, bool, type(None))


@functools.cache
def _installed_version(distribution: str) -> str | None:
    try:
        return importlib_metadata.version(distribution)
    except importlib_metadata.PackageNotFoundError:
        return None


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    return _installed_version(distribution)  # cached: reading package metadata costs milliseconds


def environment(device_type: str | None = None) -> dict[str, str | None]:
    """Versions of the libraries that decide the numbers, and the device type."""
    from loracast._version import __version__

    return {"torch": torch.__version__.split("+")[0], "transformers": package_version("transformers"),
            **{library: package_version(library) for library in QUANT_LIBRARIES},
            "loracast": __version__, "device_type": device_type}


def _layer_record(info: BaseLayerInfo) -> str:
    storage = dtype_name(info.storage) or "none"
    if info.backend is None:
        return storage
    return f"{info.backend}:{storage}/{dtype_name(info.compute) or 'unknown'}"


def _quantization(model: nn.Module, layers: list[BaseLayerInfo], requantized: int = 0) -> dict[str, Any] | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not layers and not config:
        return None
    method = (config or {}).get("quant_method")
    if not layers and str(getattr(method, "value", method)).lower() == "gguf":
        return None  # transformers dequantizes GGUF weights on load: the base holds plain float layers
    # what merges requantize with (torchao), as one string per distinct config
    configs = sorted({f"{info.backend}: {info.config}" for info in layers if info.config})
    kept = {k: v if isinstance(v, _QUANT_CONFIG_TYPES) else str(v)
            for k, v in (config or {}).items() if isinstance(v, _QUANT_CONFIG_TYPES + (torch.dtype,))}
    return {"backends": sorted({info.backend for info in layers}),
            "storage": sorted({dtype_name(info.storage) or "none" for info in layers}),
            "compute": sorted({dtype_name(info.compute) or "unknown" for info in layers}),
            "config": kept or None,
            # the extra keys only where they say something, so older fingerprints compare equal
            **({"layer_configs": configs} if configs else {}),
            **({"requantized_merges": requantized} if requantized else {})}


def _precision_record(model: nn.Module, adapter_name: str, plan: Any) -> dict[str, Any] | None:
    """The plan the adapter was made with, its compute mode replaced by what its layers do now
    (`set_lora_compute` or a shared layer may have changed it since)."""
    if plan is None:
        return None
    return {**plan.to_dict(), **adapter_compute_record(model, adapter_name)}


def build_fingerprint(model: nn.Module, adapter_name: str, plan: Any = None,
                      save_dtype: torch.dtype | None = None,
                      live: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The fingerprint of one adapter of `model` (the model holding the LoRA layers).

    `plan` is the adapter's `PrecisionPlan` (None when unknown); `save_dtype` the dtype the
    file is written in, when it differs from the tensors' own; `live` the adapter's tensors by
    file key (`io.adapter_tensors`), when the caller has them already.
    """
    live = adapter_tensors(model, adapter_name) if live is None else live
    devices = sorted({t.device.type for t in live.values()})
    layers: dict[str, str] = {}
    quantized: list[BaseLayerInfo] = []
    requantized = 0  # quantized layers holding a requantized merge (a record of the state at save)
    for path, module in model.named_modules():  # one walk: this runs on every save and load
        if isinstance(module, LoraLayer):
            if adapter_name in module.r:
                layers[path] = _layer_record(base_layer_info(path, module.get_base_layer()))
        elif find_backend(module) is not None:
            quantized.append(base_layer_info(path, module))
            requantized += requantization_record(module) is not None
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "adapter_name": adapter_name,
        "environment": environment(",".join(devices) or None),
        "precision": _precision_record(model, adapter_name, plan),
        "model_dtype": dtype_name(model_dtype(model)),
        "base_layers": layers,
        "quantization": _quantization(model, quantized, requantized),
        "adapter_dtypes": {key: dtype_name(t.dtype) for key, t in live.items()},
        # DoRA magnitudes, summarised (each one is also under adapter_dtypes); None without DoRA
        "magnitude_dtypes": sorted({dtype_name(t.dtype) for key, t in live.items()
                                    if key.endswith(".lora_magnitude_vector")}) or None,
        "save_dtype": dtype_name(save_dtype),
        "trainable": any(t.requires_grad for t in live.values()),
    }


def fingerprint_metadata(fingerprint: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata entries that carry `fingerprint`."""
    return {FINGERPRINT_KEY: json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))}


def parse_fingerprint(file_metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """The fingerprint in a safetensors file's metadata, or None when there is none.

    Raises:
        ValueError: the entry exists but is not a JSON object, or an entry in it is malformed.
    """
    text = (file_metadata or {}).get(FINGERPRINT_KEY)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the {FINGERPRINT_KEY} metadata entry is not valid JSON ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:  # over-long integers, nesting too deep
        raise ValueError(f"the {FINGERPRINT_KEY} metadata entry cannot be parsed ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"the {FINGERPRINT_KEY} metadata entry is not a JSON object")
    problem = fingerprint_problem(value)
    if problem is not None:
        raise ValueError(f"the {FINGERPRINT_KEY} metadata entry is damaged: {problem}")
    return value


# -- comparison ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    """One way the current model or environment differs from what the fingerprint recorded."""

    kind: str   # "version", "device", "model-dtype", "base-dtype", "quantization", "adapter-dtype"
    what: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.what}: {self.saved} at save, {self.now} now"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"kind": self.kind, "what": self.what, "saved": self.saved, "now": self.now}


def _grouped(kind: str, noun: str, saved: dict[str, Any], now: dict[str, Any]) -> list[Difference]:
    changed: dict[tuple, list[str]] = defaultdict(list)
    for key in saved.keys() & now.keys():
        if saved[key] != now[key]:
            changed[(saved[key], now[key])].append(key)
    out = []
    for (before, after), keys in sorted(changed.items(), key=lambda item: -len(item[1])):
        keys.sort()
        example = keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
        out.append(Difference(kind, f"{noun} of {example}", before, after))
    return out


def compare_fingerprints(saved: dict[str, Any], now: dict[str, Any],
                         adapter_dtypes: bool = True) -> list[Difference]:
    """The differences between a saved fingerprint and the current one (only the parts both hold).

    `adapter_dtypes` False leaves out the adapter tensors' dtypes (the caller chose them).
    """
    out: list[Difference] = []
    env_saved, env_now = saved.get("environment") or {}, now.get("environment") or {}
    quantized = bool(saved.get("quantization") or now.get("quantization"))
    for library in ("torch", "transformers", *QUANT_LIBRARIES, "loracast"):
        if library in QUANT_LIBRARIES and not quantized:
            continue
        if library in env_saved and library in env_now and env_saved[library] != env_now[library]:
            out.append(Difference("version", f"{library} version", env_saved[library] or "not installed",
                                  env_now[library] or "not installed"))
    if env_saved.get("device_type") and env_now.get("device_type") and \
            env_saved["device_type"] != env_now["device_type"]:
        out.append(Difference("device", "device type", env_saved["device_type"], env_now["device_type"]))
    if saved.get("model_dtype") and now.get("model_dtype") and saved["model_dtype"] != now["model_dtype"]:
        out.append(Difference("model-dtype", "base model dtype", saved["model_dtype"], now["model_dtype"]))
    if "quantization" in saved and "quantization" in now and \
            _settings(saved["quantization"]) != _settings(now["quantization"]):
        out.append(Difference("quantization", "quantization", *_quant_texts(saved["quantization"],
                                                                          now["quantization"])))
    if "base_layers" in now:
        layers = _grouped("base-dtype", "base layer dtype", saved.get("base_layers") or {}, now["base_layers"])
        # a layer that changed exactly as the whole model did is already said
        out += [d for d in layers if (d.saved, d.now) != (saved.get("model_dtype"), now.get("model_dtype"))]
    if adapter_dtypes and "adapter_dtypes" in now:
        out += _grouped("adapter-dtype", "adapter dtype", saved.get("adapter_dtypes") or {}, now["adapter_dtypes"])
    return out


def _settings(quantization: dict[str, Any] | None) -> dict[str, Any] | None:
    """The quantization entry without its record of merges: a merged state at save is no setting
    the adapter needs again."""
    if not quantization:
        return quantization
    return {k: v for k, v in quantization.items() if k != "requantized_merges"}


def _quant_text(quantization: dict[str, Any] | None) -> str:
    if not quantization:
        return "none"
    return (f"{','.join(quantization.get('backends') or []) or 'no quantized layers'} "
            f"storage {','.join(quantization.get('storage') or []) or '-'} "
            f"compute {','.join(quantization.get('compute') or []) or '-'}")


def _quant_texts(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> tuple[str, str]:
    """Both sides in words; when the layer summary agrees, the config entries that differ."""
    before, after = _quant_text(saved), _quant_text(now)
    if before == after:
        config_saved, config_now = (saved or {}).get("config") or {}, (now or {}).get("config") or {}
        keys = sorted(k for k in config_saved.keys() | config_now.keys() if config_saved.get(k) != config_now.get(k))
        before += " " + ", ".join(f"{k}={config_saved.get(k)!r}" for k in keys)
        after += " " + ", ".join(f"{k}={config_now.get(k)!r}" for k in keys)
        if not keys:  # the layers' own configs (torchao) differ
            before += " " + "; ".join((saved or {}).get("layer_configs") or ["no layer config"])
            after += " " + "; ".join((now or {}).get("layer_configs") or ["no layer config"])
    return before, after


def check_loaded_adapter(model: nn.Module, adapter_name: str, fingerprint: dict[str, Any], plan: Any,
                         source: str, strict: bool = False,
                         live: dict[str, torch.Tensor] | None = None) -> list[Difference]:
    """Compare a just-loaded adapter with its fingerprint: one warning listing the differences,
    or, when `strict`, a `PrecisionError`. Returns the differences. `live` as in `build_fingerprint`.

    The adapter tensors' dtypes are compared only when the caller left them to the defaults
    (``plan.explicit`` False): an explicit policy or dtype is a choice, not a surprise.
    """
    now = build_fingerprint(model, adapter_name, plan, live=live)
    differences = compare_fingerprints(fingerprint, now, adapter_dtypes=not getattr(plan, "explicit", False))
    if not differences:
        return differences
    listed = "; ".join(str(d) for d in differences)
    message = (f"adapter {adapter_name!r} loaded from {source} differs from the precision it was saved with: "
               f"{listed}. Outputs may differ from those seen at save time")
    if strict:
        raise PrecisionError(message + ". Load it where it was saved, or drop strict_precision=True to accept this")
    hint = ". Pass precision='match-training' to load the saved dtypes" if any(
        d.kind == "adapter-dtype" for d in differences) else ""
    warnings.warn(message + hint + "; strict_precision=True makes this an error", PrecisionWarning, stacklevel=4)
    return differences
