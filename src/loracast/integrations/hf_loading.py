"""Loading transformers models and tokenizers from local folders, offline, with clear errors.

Shared by the `train` and `merge` commands. Nothing here downloads: every call passes
``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loracast.errors import LoracastError

# The transformers auto class that builds the model an adapter of each PEFT task type was trained on.
TASK_AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class ModelFolderError(LoracastError):
    """A model folder is missing, incomplete, or cannot be loaded; the message says which and why."""


def check_model_folder(path: str | Path, what: str = "model") -> Path:
    """`path` as a Path if it is a folder holding a transformers ``config.json``.

    Raises:
        ModelFolderError: it does not exist, is not a folder, or has no config.json.
    """
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{what} folder {str(folder)!r} does not exist; pass a local transformers model folder "
                               "(loracast does not download from the Hub)")
    if not folder.is_dir():
        raise ModelFolderError(f"{what} {str(folder)!r} is a file; pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{what} folder {str(folder)!r} has no config.json; pass a folder written by "
                               "save_pretrained (config.json + weights)")
    return folder


def read_model_config(folder: Path) -> dict[str, Any]:
    """The raw ``config.json`` of a model folder.

    Raises:
        ModelFolderError: the file is not valid JSON.
    """
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {folder / 'config.json'}: {exc}") from exc


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside the block, transformers logs only errors and draws no loading bars (loracast reports
    what matters itself); bitsandbytes' note about its optional 'kernels' package is hidden."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    bnb_logger = logging.getLogger("bitsandbytes")  # it logs the note once, when first imported
    bnb_level = bnb_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        bnb_logger.setLevel(bnb_level)


def auto_class(task_type: str | None) -> type:
    """The transformers auto class for a PEFT task type (`AutoModel` when none)."""
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES.get(task_type or "", "AutoModel"))


def _dtype_kwarg(dtype: torch.dtype | None) -> dict[str, Any]:
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    # transformers 4.56 renamed torch_dtype to dtype (the old name warns from 5.0)
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_model(cls: type, folder: Path, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """`cls.from_pretrained(folder)` from local files only, in `dtype` when given.

    Raises:
        ModelFolderError: transformers cannot build the model from the folder (message included).
    """
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **_dtype_kwarg(dtype), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFolderError(f"cannot load a model from {str(folder)!r} with {cls.__name__}: {first_line}") from exc


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in `folder`.

    Raises:
        ModelFolderError: the folder holds no usable tokenizer files.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"no usable tokenizer in {str(folder)!r} ({type(exc).__name__}); save one there with "
                               "tokenizer.save_pretrained") from exc
    if tokenizer.pad_token is None:  # causal-LM tokenizers often lack one; batching needs it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def drop_dequantized_gguf_record(model: nn.Module) -> None:
    """Make a model that transformers loaded from a GGUF file and dequantized into plain layers (as
    it does for Llama) a plain model that ``save_pretrained`` writes and ``from_pretrained`` reads
    back without the GGUF file, in place: its GGUF quantizer and ``config.quantization_config`` go.
    A model not loaded from a GGUF is left as it is.

    transformers keeps the GGUF quantizer on such a model although no weight is quantized any more,
    and that quantizer refuses serialization ("quantized with gguf and is not serializable").

    Raises:
        ModelFolderError: some weights are still packed GGUF blocks (not floating point).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return
    packed = [name for name, tensor in model.state_dict().items() if not tensor.is_floating_point()]
    if packed:
        raise ModelFolderError(f"{len(packed)} weights of the model loaded from GGUF stay packed ({packed[0]}, ...); "
                               "load it dequantized (GgufConfig(dequantize=True)) before writing it as a plain model")
    quantizer.remove_quantization_config(model)
