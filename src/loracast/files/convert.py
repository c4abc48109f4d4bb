"""Rewriting a saved adapter in another dtype, with the rounding error it introduces, and
turning a legacy pickle adapter (``adapter_model.bin``) into safetensors when the caller trusts it.

Values are converted exactly as `Tensor.to(dtype)` rounds them (to nearest, ties to even). A
conversion to float16 is refused when a finite value would become infinite (|x| > 65504);
values that flush to zero are counted. The adapter config and the other small files in the
folder are copied unchanged; loading the result still gives the dtypes of the precision rules.
"""

from __future__ import annotations

import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracast._atomic import atomic_save_safetensors
from loracast.config import CONFIG_NAME
from loracast.dtypes import dtype_name
from loracast.errors import PrecisionError
from loracast.files.fingerprint import fingerprint_metadata, parse_fingerprint
from loracast.files.format import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter_weights


@dataclass
class ConversionReport:
    """What converting one adapter file did."""

    out: Path
    dtype: torch.dtype | None  # None: each tensor kept its dtype
    source_dtypes: dict[str, int]  # dtype name -> number of values before conversion
    tensors: int
    values: int
    max_abs_error: float
    relative_error: float  # ||converted - original||_2 / ||original||_2 over all values
    max_relative_error: float  # max |converted - original| / |original| over non-zero values
    flushed_to_zero: int  # non-zero values that became 0
    bytes_before: int
    bytes_after: int
    copied: list[str] = field(default_factory=list)


def overflowing(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, float]:
    """Name -> largest finite |value| for the tensors holding values beyond `dtype`'s range."""
    limit = torch.finfo(dtype).max
    out = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            finite = tensor[torch.isfinite(tensor)].double().abs()
            if finite.numel() and float(finite.max()) > limit:
                out[name] = float(finite.max())
    return out


def convert_adapter(adapter: str | Path, out: str | Path, dtype: torch.dtype | None,
                    allow_pickle: bool = False) -> ConversionReport:
    """Write the adapter in `adapter` to `out` as safetensors, every floating tensor in `dtype`
    (None: each keeps its dtype).

    `allow_pickle`: read an ``adapter_model.bin`` when the folder has no safetensors file (with
    ``torch.load(weights_only=True)``, and a warning: only for files from a source you trust).

    Raises:
        FileNotFoundError / AdapterLoadError: `adapter` holds no readable adapter file, or only a
            pickle file and `allow_pickle` is False.
        PrecisionError: a value does not fit `dtype` (names the tensors and their largest values).
        ValueError: `out` is a file.
    """
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise FileNotFoundError(f"adapter folder {str(adapter)!r} does not exist; pass the folder written by "
                                "save_pretrained")
    if not (adapter / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(adapter)!r}; pass the folder written by save_pretrained")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; pass a folder path")
    tensors, metadata = read_adapter_weights(str(adapter), allow_pickle=allow_pickle)
    source_file = _weights_file(adapter)
    if source_file.name == LEGACY_WEIGHTS_NAME:
        warnings.warn(f"read the pickle file {source_file} (torch.load with weights_only=True) because "
                      f"allow_pickle was given; {out / WEIGHTS_NAME} holds the same tensors as safetensors",
                      UserWarning, stacklevel=2)
    if dtype is None:
        return _rewrite(adapter, out, tensors, metadata, source_file)
    too_big = overflowing(tensors, dtype)
    if too_big:
        shown = ", ".join(f"{name} (max |x| {value:.4g})" for name, value in list(too_big.items())[:3])
        more = f" and {len(too_big) - 3} more" if len(too_big) > 3 else ""
        raise PrecisionError(f"{len(too_big)} tensor(s) hold values beyond {str(dtype).removeprefix('torch.')}'s "
                             f"largest finite value {torch.finfo(dtype).max:.6g}: {shown}{more}; they would become "
                             "inf. Convert to bf16 (same range as fp32) or keep fp32")
    converted: dict[str, torch.Tensor] = {}
    source_dtypes: dict[str, int] = {}
    err_sq = ref_sq = max_abs = max_rel = 0.0
    flushed = values = 0
    for name, tensor in tensors.items():
        source_dtypes[dtype_name(tensor.dtype)] = source_dtypes.get(dtype_name(tensor.dtype), 0) + tensor.numel()
        if not tensor.is_floating_point():
            converted[name] = tensor
            continue
        new = tensor.to(dtype).contiguous()
        original, rounded = tensor.double(), new.double()
        error = (rounded - original).abs()
        err_sq += float((error ** 2).sum())
        ref_sq += float((original ** 2).sum())
        nonzero = original != 0
        if error.numel():
            max_abs = max(max_abs, float(error.max()))
        if bool(nonzero.any()):
            max_rel = max(max_rel, float((error[nonzero] / original[nonzero].abs()).max()))
        flushed += int((nonzero & (rounded == 0)).sum())
        values += tensor.numel()
        converted[name] = new
    out.mkdir(parents=True, exist_ok=True)
    bytes_before = source_file.stat().st_size
    target = out / WEIGHTS_NAME
    atomic_save_safetensors(str(target), converted, _converted_metadata(metadata, dtype))
    copied = [] if out.resolve() == adapter.resolve() else _copy_side_files(adapter, out)
    return ConversionReport(out=out, dtype=dtype, source_dtypes=source_dtypes, tensors=len(converted), values=values,
                            max_abs_error=max_abs, relative_error=math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
                            max_relative_error=max_rel, flushed_to_zero=flushed, bytes_before=bytes_before,
                            bytes_after=target.stat().st_size, copied=copied)


def _rewrite(adapter: Path, out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
             source_file: Path) -> ConversionReport:
    """The tensors unchanged, written as safetensors (a format conversion: no rounding)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / WEIGHTS_NAME
    bytes_before = source_file.stat().st_size
    atomic_save_safetensors(str(target), {k: t.contiguous() for k, t in tensors.items()},
                            dict(metadata or {"format": "pt"}))
    copied = [] if out.resolve() == adapter.resolve() else _copy_side_files(adapter, out)
    counts: dict[str, int] = {}
    for tensor in tensors.values():
        counts[dtype_name(tensor.dtype)] = counts.get(dtype_name(tensor.dtype), 0) + tensor.numel()
    return ConversionReport(out=out, dtype=None, source_dtypes=counts, tensors=len(tensors),
                            values=sum(t.numel() for t in tensors.values() if t.is_floating_point()),
                            max_abs_error=0.0, relative_error=0.0, max_relative_error=0.0, flushed_to_zero=0,
                            bytes_before=bytes_before, bytes_after=target.stat().st_size, copied=copied)


def _converted_metadata(metadata: dict[str, str], dtype: torch.dtype) -> dict[str, str]:
    """The source's safetensors metadata, its fingerprint (if any) recording the new file dtype;
    the dtypes the adapter was trained in stay as recorded."""
    out = dict(metadata or {"format": "pt"})
    try:
        fingerprint = parse_fingerprint(out)
    except ValueError:
        return out  # an unreadable fingerprint is passed on untouched; the doctor reports it
    if fingerprint is not None:
        fingerprint["save_dtype"] = dtype_name(dtype)
        out.update(fingerprint_metadata(fingerprint))
    return out


def _weights_file(adapter: Path) -> Path:
    path = adapter / WEIGHTS_NAME
    return path if path.is_file() else adapter / LEGACY_WEIGHTS_NAME


def _copy_side_files(adapter: Path, out: Path) -> list[str]:
    """Copy the config and other small files beside the weights (not sub-folders, not weights)."""
    copied = []
    for item in sorted(adapter.iterdir()):
        if item.is_file() and item.name not in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) and not item.name.startswith("."):
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    return copied
