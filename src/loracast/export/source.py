"""Reading a GGUF base for export and refusing outputs that would overwrite something."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracast.export.encode import ExportError

# Fields the writer sets itself: the header's counts and version, the architecture it is built with.
_WRITER_FIELDS = ("GGUF.", "general.architecture", "general.alignment")


def check_output(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Raises ExportError when `out` is an input, a folder, or an existing file not to be overwritten,
    or when its folder does not exist."""
    if any(out.resolve() == source.resolve() for source in inputs):
        raise ExportError(f"output {str(out)!r} is one of the inputs; write the GGUF file somewhere else")
    if out.is_dir():
        raise ExportError(f"output {str(out)!r} is a folder; pass a file path such as {str(out / 'model.gguf')!r}")
    if out.exists() and not overwrite:
        raise ExportError(f"output {str(out)!r} exists; pass --overwrite (overwrite=True) to replace it, or another path")
    if not out.parent.is_dir():
        raise ExportError(f"output folder {str(out.parent)!r} does not exist; create it first")


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` over `path` (memory-mapped: tensor data is read only when copied).

    Raises:
        ExportError: the file is cut short or damaged.
    """
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError) as exc:  # what gguf's reader raises on a bad file
        raise ExportError(f"{str(path)!r} is not a complete GGUF file ({exc.__class__.__name__}: its metadata or "
                          "tensors run past the end or are damaged); fetch it again") from exc


def read_gguf_field(reader: Any, key: str) -> Any:
    """The value of metadata field `key` (None when absent)."""
    found = reader.fields.get(key)
    return found.contents() if found is not None else None


def copy_metadata(reader: Any, writer: Any) -> None:
    """Every metadata field of `reader` onto `writer`, with its stored type (tokenizer, chat template,
    hyperparameters exactly as the base's converter wrote them), and the base's tensor alignment."""
    for key, found in reader.fields.items():
        if key.startswith(_WRITER_FIELDS):
            continue
        main = found.types[0]
        sub = found.types[-1] if len(found.types) > 1 else None
        writer.add_key_value(key, found.contents(), main, sub)
    alignment = read_gguf_field(reader, "general.alignment")
    if alignment is not None:
        writer.add_custom_alignment(int(alignment))
    if not reader.tensors:
        raise ExportError("the GGUF base holds no tensors; pass a model file, not a LoRA adapter or vocabulary file")
