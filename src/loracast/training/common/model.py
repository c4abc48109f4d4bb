"""What building either job's model shares: the LoRA adapter under a precision policy, the 4-bit
(bitsandbytes) loading configuration, and the name of the frozen base's dtype."""

from __future__ import annotations

from typing import Any

import torch

from loracast.config import LoraConfig
from loracast.dtypes import dtype_name
from loracast.integrations.hf_loading import quiet_transformers
from loracast.training.common.errors import SetupError
from loracast.training.common.policy import peft_model_kwargs
from loracast.tuner.peft_model import PeftModel, get_peft_model

HEAD_NAMES = ["classifier", "score"]  # classification heads: never quantized, trained in full


def quantization_config(dtype: torch.dtype | None, storage_as_compute: bool = False,
                        skip_modules: tuple[str, ...] | None = HEAD_NAMES) -> Any:
    """transformers' BitsAndBytesConfig for NF4 with compute `dtype` (bf16 by default), the
    `skip_modules` left unquantized (the classification heads by default; None: transformers' own
    choice, which keeps a causal LM's output head in float); with `storage_as_compute`, the packed
    weights are stored in that dtype too (``bnb_4bit_quant_storage``), which FSDP needs to shard them
    beside the other parameters."""
    try:
        with quiet_transformers():  # bitsandbytes' note about its optional 'kernels' package is not needed
            import bitsandbytes  # noqa: F401  (transformers needs it for 4-bit loading)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise SetupError("--load-in-4bit needs bitsandbytes: pip install 'loracast[bnb]'") from exc
    compute = dtype or torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute if storage_as_compute else torch.uint8,
                              llm_int8_skip_modules=list(skip_modules) if skip_modules is not None else None)


def add_lora(model: Any, config: LoraConfig, policy: str) -> PeftModel:
    """`model` with a new LoRA adapter from `config` under precision `policy`.

    Raises:
        SetupError: the config does not fit the model (e.g. target modules it lacks).
    """
    try:
        return get_peft_model(model, config, **peft_model_kwargs(policy))
    except ValueError as exc:
        raise SetupError(str(exc).splitlines()[0]) from exc


def base_dtype_name(peft_model: PeftModel) -> str:
    """The frozen base's dtype as people name it ('bfloat16', or '4-bit nf4 (compute bfloat16)')."""
    config = getattr(peft_model.get_base_model(), "config", None)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if quant.get("load_in_4bit"):
            return f"4-bit {quant.get('bnb_4bit_quant_type')} (compute {quant.get('bnb_4bit_compute_dtype')!s})"
    dtypes = {dtype_name(p.dtype) for p in peft_model.parameters()
              if not p.requires_grad and p.is_floating_point()}
    return "/".join(sorted(dtypes)) or "unknown"
