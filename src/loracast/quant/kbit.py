"""`prepare_model_for_kbit_training`: PEFT's preparation of a quantized model, with a choice of
what is upcast.

By default it does what PEFT's function does: freeze every parameter, upcast every fp16/bf16
parameter that is not a packed 4-bit weight to float32 (norms, embeddings, the output head,
biases, layers left unquantized), and, for a quantized model, turn on gradient checkpointing with
a hook that makes the embeddings' output require grad (reentrant checkpointing passes no gradient
to the adapters otherwise, since every base parameter is frozen).

The upcast is the part that costs memory: a 150k-token vocabulary's embedding and output head in
fp32 can outweigh the 4-bit transformer layers. ``upcast=`` picks the groups to upcast:
``"norms"`` keeps the stability benefit (normalization statistics in fp32) at a negligible cost.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loracast.quant import find_backend
from loracast.quant.base import foreign_tensor

UPCAST_GROUPS: tuple[str, ...] = ("norms", "embeddings", "lm_head", "other")

# Quantization methods whose parameters PEFT never upcasts (their float tensors are part of the format).
_NO_UPCAST_METHODS = {"gptq", "aqlm", "eetq", "hqq", "torchao"}
_KBIT_METHODS = _NO_UPCAST_METHODS | {"bitsandbytes"}


def _parse_upcast(upcast: str | Iterable[str]) -> frozenset[str]:
    if isinstance(upcast, str):
        if upcast == "all":
            return frozenset(UPCAST_GROUPS)
        if upcast == "none":
            return frozenset()
        upcast = [upcast]
    groups = frozenset(upcast)
    unknown = sorted(groups - set(UPCAST_GROUPS))
    if unknown:
        raise ValueError(f"upcast={sorted(groups)!r} names unknown group(s) {unknown}; use 'all', 'none' or any of "
                         f"{list(UPCAST_GROUPS)}, e.g. upcast=('norms',) or upcast=('norms', 'embeddings', 'lm_head')")
    return groups


def _quantization_method(model: nn.Module) -> str | None:
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    return str(method) if method is not None else None


def _takes_only_its_compute_dtype(model: nn.Module) -> bool:
    """True when a quantized layer of `model` cannot take activations in another float dtype than
    its compute dtype (its backend's ``upcast_safe`` is False: HQQ, quanto); fp32 norms before it
    would break the forward."""
    return any(getattr(find_backend(module), "upcast_safe", True) is False for module in model.modules())


def is_quantized(model: nn.Module) -> bool:
    """True for a model loaded in 4 or 8 bits by transformers, or holding layers a quantization
    backend claims (built by hand)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if _quantization_method(model) in _KBIT_METHODS:
        return True
    return any(find_backend(module) is not None for module in model.modules())


def _module_group(module: nn.Module, inputs: nn.Module | None, head: nn.Module | None) -> str:
    if head is not None and module is head:
        return "lm_head"
    if isinstance(module, nn.Embedding) or (inputs is not None and module is inputs):
        return "embeddings"
    if "norm" in type(module).__name__.lower():  # LayerNorm, GroupNorm, LlamaRMSNorm, T5LayerNorm, ...
        return "norms"
    return "other"


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    getter = getattr(model, method, None)
    if not callable(getter):
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None


def upcast_parameters(model: nn.Module, upcast: str | Iterable[str] = "all") -> list[str]:
    """Upcast the fp16/bf16 parameters of the chosen groups to float32, in place; returns their names.

    Packed 4-bit weights (bitsandbytes `Params4bit`, whatever their storage dtype), quantized
    tensor subclasses (torchao's, which report their float dtype) and integer tensors are never
    touched. A parameter shared by several modules (tied embedding and output
    head) is upcast when any of its modules' groups is chosen, since it can have only one dtype.

    Raises:
        ValueError: `upcast` names an unknown group.
    """
    groups = _parse_upcast(upcast)
    inputs, head = _call_or_none(model, "get_input_embeddings"), _call_or_none(model, "get_output_embeddings")
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    packed: set[int] = set()  # quantized layers' weights: packed values, whatever their carrier dtype
    for module_name, module in model.named_modules():
        group = _module_group(module, inputs, head)
        quantized = find_backend(module) is not None
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if (quantized and name == "weight") or foreign_tensor(param):  # packed codes, whatever .dtype says
                packed.add(id(param))
            if group in groups and id(param) not in chosen:
                chosen[id(param)] = (full, param)
    changed = []
    for full, param in chosen.values():
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in packed:
            param.data = param.data.to(torch.float32)  # .data keeps the Parameter (and any tying) intact
            changed.append(full)
    return changed


def _enable_input_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    embeddings = _call_or_none(model, "get_input_embeddings")
    if embeddings is None:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(), so loracast cannot make its "
                         "input require grad for reentrant checkpointing; pass gradient_checkpointing_kwargs="
                         "{'use_reentrant': False}")
    embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_(True))


def _checkpointing_enabler(model: nn.Module):
    """The model's own switch for gradient checkpointing, taking the checkpoint kwargs."""
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5 name
        return lambda kwargs: model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if callable(getattr(model, "gradient_checkpointing_enable", None)):
        return lambda kwargs: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(); pass "
                     "use_gradient_checkpointing=False (and checkpoint its blocks yourself if needed)")


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
    upcast: str | Iterable[str] = "all",
) -> nn.Module:
    """Prepare a quantized model for LoRA training; returns the same model, changed in place.

    1. Freezes every parameter.
    2. Upcasts fp16/bf16 parameters to float32 (`upcast_parameters`), except for GPTQ, AQLM, EETQ,
       HQQ and torchao models, and models holding HQQ or quanto layers however they were built
       (those layers refuse activations in another dtype than their compute dtype). `upcast`
       chooses which: ``"all"`` (default, PEFT's behaviour), ``"none"``, or any of ``"norms"``,
       ``"embeddings"``, ``"lm_head"``, ``"other"`` (biases and layers left unquantized). Note
       that fp32 norms hand fp32 activations to the next layer: a bitsandbytes 8-bit layer outside
       training on a GPU then casts them to fp16.
    3. For a quantized model with `use_gradient_checkpointing`: unless
       ``gradient_checkpointing_kwargs`` sets ``use_reentrant=False``, makes the input embeddings'
       output require grad, then enables gradient checkpointing. ``use_reentrant`` defaults to True,
       which is what PEFT's call ends up using (torch's default), said explicitly.
    4. With `auto_clear_cache`, empties the CUDA/XPU allocator cache after the upcast.

    Raises:
        ValueError: `upcast` names an unknown group, or checkpointing is asked of a model that
            cannot do it.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    # bad arguments are rejected before anything is changed
    _parse_upcast(upcast)
    checkpointing = use_gradient_checkpointing and is_quantized(model)
    enable_checkpointing = _checkpointing_enabler(model) if checkpointing else None
    for param in model.parameters():
        param.requires_grad_(False)
    if _quantization_method(model) not in _NO_UPCAST_METHODS and not _takes_only_its_compute_dtype(model):
        upcast_parameters(model, upcast)
        if auto_clear_cache:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if hasattr(torch, "xpu") and torch.xpu.is_available():
                torch.xpu.empty_cache()
    if enable_checkpointing is not None:
        kwargs.setdefault("use_reentrant", True)
        if kwargs["use_reentrant"]:
            _enable_input_grads(model)
        enable_checkpointing(kwargs)
    return model
