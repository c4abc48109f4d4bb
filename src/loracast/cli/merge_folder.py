"""Merging a saved adapter into its base model and writing the result as a transformers model
folder (safetensors), checked against the unmerged model on a few inputs.

The check is end to end: outputs of the adapter model (LoRA branch separate) are compared with
outputs of the model read back from the written folder with transformers' `from_pretrained`; for
a causal LM, greedy generations are compared as well. A causal LM's base may be a GGUF file
(dequantized by transformers on load); the folder written is then a plain transformers model with
the GGUF's tokenizer and chat template.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loracast.config import LoraConfig
from loracast.errors import AdapterLoadError, PrecisionWarning
from loracast.files.format import read_adapter_weights
from loracast.integrations.hf_loading import (
    auto_class,
    check_model_folder,
    drop_dequantized_gguf_record,
    load_model,
    load_tokenizer,
    quiet_transformers,
)
from loracast.training.sft.evaluate import generate_answers
from loracast.training.sft.model import check_llm_source, is_gguf, load_llm, load_llm_tokenizer
from loracast.tuner.peft_model import PeftModel

PROBE_TEXTS = [
    "My parcel has not arrived after ten days.",
    "I was charged twice for the same order.",
    "The app crashes when I open my account settings.",
    "How do I change the email address on my profile?",
]
LABELS_NAME = "labels.json"  # written beside an adapter by `loracast train`
SFT_NAME = "sft.json"  # written beside an SFT adapter by `loracast train`: its system prompt
PROBE_NEW_TOKENS = 24


@dataclass
class MergeReport:
    """What `merge_to_folder` wrote and how close the merged model is to the unmerged one."""

    out: Path
    dtype: torch.dtype
    inputs: int
    output_name: str  # which model output was compared ("logits", "last_hidden_state", ...)
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_output: float
    notes: list[str] = field(default_factory=list)  # precision differences found when loading the adapter
    generations: int = 0  # causal LMs: greedy generations compared
    generations_equal: int = 0  # of which the merged model's equal the unmerged one's, token for token


def _head_labels(adapter: Path, config: LoraConfig) -> dict[str, Any]:
    """num_labels / id2label for a classification adapter: from labels.json, else the head's shape."""
    labels_file = adapter / LABELS_NAME
    if labels_file.is_file():
        try:
            names = json.loads(labels_file.read_text(encoding="utf-8"))["labels"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterLoadError(f"{labels_file} is not a labels file written by loracast train ({exc}); "
                                   "remove it to size the head from the adapter's weights") from exc
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}
    tensors, _ = read_adapter_weights(str(adapter))
    for head in config.modules_to_save or []:
        for key, tensor in tensors.items():
            if key.endswith(f"{head}.weight") and tensor.dim() == 2:
                return {"num_labels": tensor.shape[0]}
    return {}


def _chat_prompts(tokenizer: Any, adapter: Path) -> tuple[list[str], list[bool]]:
    """The probe texts as the adapter's training would have framed them (system prompt, chat template)."""
    system = None
    if (adapter / SFT_NAME).is_file():
        try:
            system = json.loads((adapter / SFT_NAME).read_text(encoding="utf-8")).get("system")
        except (OSError, ValueError, AttributeError):
            system = None  # the probe still works without the training's system prompt
    if not getattr(tokenizer, "chat_template", None):
        return list(PROBE_TEXTS), [True] * len(PROBE_TEXTS)
    prefix = [{"role": "system", "content": system}] if system else []
    prompts = [tokenizer.apply_chat_template(prefix + [{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) for text in PROBE_TEXTS]
    return prompts, [False] * len(prompts)


def _load_tokenizer(base: Path) -> Any:
    return load_llm_tokenizer(base) if is_gguf(base) else load_tokenizer(base)


def _probe_inputs(base: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    try:
        tokenizer = _load_tokenizer(base)
    except ValueError:  # no tokenizer: random token ids from the model's vocabulary
        vocab = int(getattr(model.config, "vocab_size", 100))
        generator = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(1, vocab, (len(PROBE_TEXTS), 12), generator=generator)}
    return dict(tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))


@torch.no_grad()
def _main_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    output = model(**inputs)
    for name in ("logits", "last_hidden_state", "start_logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return name, value.float()
    raise ValueError(f"cannot compare outputs of {type(model).__name__}: it returns no logits or hidden states")


def merge_to_folder(base: str | Path, adapter: str | Path, out: str | Path,
                    dtype: torch.dtype | None = None) -> MergeReport:
    """Load `base` (a transformers model folder) with the adapter in `adapter`, merge it (rounding
    once into `dtype`, default the base's stored dtype), write the plain model to `out`
    (safetensors, plus the base's tokenizer), and compare outputs with the unmerged model.

    Raises:
        ModelFolderError: `base` is not a loadable model folder.
        FileNotFoundError / AdapterLoadError / ConfigError: `adapter` is missing or does not fit.
        ValueError: `out` is a file.
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    base = check_llm_source(base) if is_gguf(base) else check_model_folder(base, "base model")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; pass a folder path")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise ValueError(f"output folder {str(out)!r} is an input folder; write the merged model somewhere else")
    config = LoraConfig.from_pretrained(adapter)
    cls = auto_class(config.task_type)
    extra = _head_labels(adapter, config) if config.task_type in ("SEQ_CLS", "TOKEN_CLS") else {}
    if is_gguf(base) and config.task_type != "CAUSAL_LM":
        raise AdapterLoadError(f"{adapter} is a {config.task_type} adapter, but {base.name} is a GGUF causal LM; "
                               "merge it into the model folder it was trained on")
    if is_gguf(base):
        model = load_llm(base, dtype, False, torch.device("cpu"))
    else:
        with quiet_transformers():
            model = load_model(cls, base, dtype, ignore_mismatched_sizes=bool(extra), **extra)
    model.eval()
    inputs = _probe_inputs(base, model)
    with warnings.catch_warnings(record=True) as caught:
        # a fingerprint difference is expected when merging into another dtype; it is reported, not raised
        warnings.simplefilter("always", PrecisionWarning)
        peft_model = PeftModel.from_pretrained(model, adapter)
    notes = [str(w.message) for w in caught if issubclass(w.category, PrecisionWarning)]
    for other in (w for w in caught if not issubclass(w.category, PrecisionWarning)):
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    peft_model.eval()
    output_name, reference = _main_output(peft_model, inputs)
    tokenizer, prompts, plain, before = None, [], [], []
    if config.task_type == "CAUSAL_LM":
        tokenizer = _load_tokenizer(base)
        prompts, plain = _chat_prompts(tokenizer, adapter)
        before = generate_answers(peft_model, tokenizer, prompts, plain, PROBE_NEW_TOKENS, len(prompts),
                                  torch.device("cpu"))
    merged = peft_model.merge_and_unload()
    merged_dtype = next(p.dtype for p in merged.parameters() if p.is_floating_point())
    drop_dequantized_gguf_record(merged)  # the folder written is a plain model: it loads without the GGUF file
    with quiet_transformers():
        merged.save_pretrained(str(out), safe_serialization=True)
        try:
            (tokenizer or _load_tokenizer(base)).save_pretrained(str(out))  # the chat template goes with it
        except ValueError:
            pass  # the base has no tokenizer to pass on
    del merged, peft_model, model
    with quiet_transformers():
        reloaded = load_model(cls, out, merged_dtype).eval()
    _, result = _main_output(reloaded, inputs)
    after = (generate_answers(reloaded, tokenizer, prompts, plain, PROBE_NEW_TOKENS, len(prompts), torch.device("cpu"))
             if tokenizer is not None else [])
    diff = (result - reference).abs()
    return MergeReport(out=out, dtype=merged_dtype, inputs=int(reference.shape[0]), output_name=output_name,
                       max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                       max_abs_output=float(reference.abs().max()), notes=notes, generations=len(after),
                       generations_equal=sum(a == b for a, b in zip(before, after)))
