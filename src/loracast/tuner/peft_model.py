"""`PeftModel` and `get_peft_model`: PEFT's LoRA API over loracast's layers.

The module tree is PEFT's: ``PeftModel.base_model`` is a `LoraModel` whose ``.model`` is the
user's model with LoRA layers injected in place, so parameter names
(``base_model.model.<path>.lora_A.default.weight``) and state dicts match PEFT's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import nn

from loracast.config import LoraConfig
from loracast.errors import AdapterStateError, LoracastError
from loracast.integrations import transformers as transformers_integration
from loracast.layers.compute import set_lora_compute
from loracast.layers.routing import per_sample_adapters
from loracast.precision.policies import PrecisionPlan, resolve_precision
from loracast.quant.merge import requantization_report
from loracast.tuner.inject import TASK_HEADS, inject_adapter, wrap_modules_to_save
from loracast.tuner.lora_model import LoraModel
from loracast.tuner.names import BASE_ONLY, check_adapter_name
from loracast.tuner.saving import AdapterFiles
from loracast.tuner.signature import ForwardWithWrappedSignature
from loracast.tuner.tokens import wrap_trainable_tokens

__all__ = ["BASE_ONLY", "LoraModel", "PeftModel", "check_adapter_name", "get_peft_model"]

_Self = TypeVar("_Self", bound="PeftModel")


def _freeze_all(model: nn.Module) -> bool:
    """Freeze every parameter of `model`; returns whether activation checkpointing is on.

    One walk for both. The flag is transformers' ``is_activation_checkpointing`` (some module's
    ``gradient_checkpointing`` is set), read from each module's dict rather than through
    nn.Module's slow attribute fallback.
    """
    checkpointing = False
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                param.requires_grad_(False)
        if not checkpointing:
            checkpointing = bool(module.__dict__.get("gradient_checkpointing",
                                                     getattr(type(module), "gradient_checkpointing", False)))
    return checkpointing


def _check_wrappable(model: nn.Module, peft_config: LoraConfig) -> None:
    if isinstance(model, PeftModel):
        raise LoracastError("the model already is a PeftModel; use add_adapter() to add another adapter")
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a loracast LoraConfig, got {type(peft_config).__name__}; "
                        "build it with loracast.LoraConfig(...) or LoraConfig.from_dict(peft_config.to_dict())")


class PeftModel(AdapterFiles, nn.Module):
    """A model with LoRA adapters, with PEFT's `PeftModel` API.

    Adapter dtypes follow `loracast.precision.rules` (explicit `adapter_dtype` > autocast flag > base dtype),
    or a named `precision` policy (`loracast.precision.policies`).
    """

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                 low_cpu_mem_usage: bool = False, *, precision: str | None = None) -> None:
        super().__init__()
        _check_wrappable(model, peft_config)
        plan = resolve_precision(model, precision, autocast_adapter_dtype, adapter_dtype)
        self._wrap(model, peft_config, adapter_name, plan, initialize=True)

    @classmethod
    def _for_loading(cls: type[_Self], model: nn.Module, peft_config: LoraConfig, adapter_name: str,
                     plan: PrecisionPlan) -> _Self:
        """A `PeftModel` whose first adapter is created with the dtypes of `plan` and left
        uninitialised, its values about to be loaded (`from_pretrained`)."""
        _check_wrappable(model, peft_config)
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model._wrap(model, peft_config, adapter_name, plan, initialize=False)
        return peft_model

    def _wrap(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str, plan: PrecisionPlan,
              initialize: bool) -> None:
        self._precision_plans: dict[str, PrecisionPlan] = {}  # adapter -> how its dtypes were chosen
        self._fingerprints: dict[str, dict] = {}  # adapter -> fingerprint of the file it was loaded from
        checkpointing = _freeze_all(model)  # the base is frozen; adapters decide their own requires_grad
        self.base_model = LoraModel(model)
        self._add(adapter_name, peft_config, plan, initialize)
        self.base_model.set_adapter(adapter_name)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            # reentrant checkpointing needs an input that requires grad, or no grad reaches the adapters
            model.enable_input_require_grads()
        transformers_integration.install(self)  # Trainer / save_pretrained see an adapter model

    # -- attribute forwarding, as PEFT: unknown attributes come from the wrapped model ------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name -> config."""
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters."""
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> str:
        """Name of the (first) active adapter."""
        active = self.base_model.active_adapters
        return active[0] if active else ""

    def get_base_model(self) -> nn.Module:
        """The adapted model itself (LoRA layers in place)."""
        return self.base_model.model

    @property
    def precision_plans(self) -> Mapping[str, PrecisionPlan]:
        """Adapter name -> the `PrecisionPlan` its dtypes and compute mode were chosen by (read-only)."""
        return MappingProxyType(self._precision_plans)

    @property
    def loaded_fingerprints(self) -> Mapping[str, dict]:
        """Adapter name -> the precision fingerprint of the file it was loaded from (read-only);
        adapters made in this process, or loaded from a file without one, are absent."""
        return MappingProxyType(self._fingerprints)

    # -- adapters -------------------------------------------------------------------------------

    def _add(self, adapter_name: str, config: LoraConfig, plan: PrecisionPlan, initialize: bool) -> None:
        check_adapter_name(adapter_name)
        if adapter_name in self.base_model.peft_config:
            raise LoracastError(f"adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        model = self.base_model.model
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        heads = TASK_HEADS.get(config.task_type or "", [])
        if heads:
            config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + heads))
        self.base_model.peft_config[adapter_name] = config
        self._precision_plans[adapter_name] = plan
        try:
            inject_adapter(model, config, adapter_name, autocast_adapter_dtype=plan.autocast_adapter_dtype,
                           adapter_dtype=plan.adapter_dtype, initialize=initialize)
            wrap_modules_to_save(model, config, adapter_name, autocast_adapter_dtype=plan.autocast_adapter_dtype,
                                 adapter_dtype=plan.adapter_dtype)
            wrap_trainable_tokens(model, config, adapter_name, autocast_adapter_dtype=plan.autocast_adapter_dtype,
                                  adapter_dtype=plan.adapter_dtype, initialize=initialize)
            if plan.lora_compute != "exact":
                set_lora_compute(model, plan.lora_compute, adapter_name)
            for path in plan.fast_layers:
                set_lora_compute(model.get_submodule(path), "fast")
        except BaseException:
            self._remove_everywhere(adapter_name)
            raise

    def _remove_everywhere(self, adapter_name: str) -> None:
        self.base_model.peft_config.pop(adapter_name, None)
        self._precision_plans.pop(adapter_name, None)
        self._fingerprints.pop(adapter_name, None)
        for _, module in list(self.base_model.lora_layers()) + list(self.base_model.wrappers()):
            if adapter_name in module.adapter_names:
                module.delete_adapter(adapter_name)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool | None = None, adapter_dtype: torch.dtype | str | None = None,
                    precision: str | None = None) -> None:
        """Add a new, inactive adapter (activate it with `set_adapter`); dtypes as in `get_peft_model`."""
        plan = resolve_precision(self.base_model.model, precision, autocast_adapter_dtype, adapter_dtype)
        self._add(adapter_name, peft_config, plan, True)
        self.base_model.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make `adapter_name` the active adapter; only it trains.

        Raises:
            ValueError: no such adapter.
        """
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active.

        Raises:
            ValueError: no such adapter.
        """
        if adapter_name not in self.peft_config:
            raise LoracastError(f"adapter {adapter_name!r} not found; this model has {sorted(self.peft_config)}")
        if any(adapter_name in layer.merged_adapters for _, layer in self.base_model.lora_layers()):
            raise AdapterStateError(f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() "
                                    "before deleting it")
        active = [n for n in self.active_adapters if n != adapter_name]
        self._remove_everywhere(adapter_name)
        if not active and self.peft_config:
            active = [next(iter(self.peft_config))]
        if active:
            self.base_model.set_adapter(active)
        else:
            self.base_model._active_adapters = []

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; merged adapters are unmerged exactly and merged back."""
        layers = [layer for _, layer in self.base_model.lora_layers()]
        wrappers = [wrapper for _, wrapper in self.base_model.wrappers()]
        merged = {id(layer): list(layer.merged_adapters) for layer in layers if layer.merged}
        try:
            for layer in layers:
                if layer.merged:
                    layer.unmerge()
                layer.enable_adapters(False)
            for wrapper in wrappers:
                wrapper.enable_adapters(False)
            yield
        finally:
            with requantization_report():
                for layer in layers:
                    layer.enable_adapters(True)
                    if id(layer) in merged:
                        layer.merge(merged[id(layer)])
            for wrapper in wrappers:
                wrapper.enable_adapters(True)

    # -- forward ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _per_sample_adapters(self, adapter_names: Sequence[str] | None, expansion: int = 1) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        known = set(self.peft_config) | {BASE_ONLY}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise LoracastError(f"adapter_names holds unknown adapter(s) {unknown}; known: {sorted(known)}")
        if any(layer.merged for _, layer in self.base_model.lora_layers()):
            raise LoracastError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        with per_sample_adapters(adapter_names, expansion):
            yield

    def _forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; `adapter_names` picks an adapter per sample ('__base__': none)."""
        with self._per_sample_adapters(adapter_names):
            return self.base_model.model(*args, **kwargs)

    # shown with the wrapped model's parameters, so that Trainer keeps the dataset's columns
    forward = ForwardWithWrappedSignature(_forward, lambda self: self.base_model.model)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's `generate`, with the active adapters (or per-sample `adapter_names`,
        one per input sample; with beam search or `num_return_sequences` each name covers every
        row made from its sample, as in PEFT)."""
        with self._per_sample_adapters(adapter_names, self._generate_expansion(kwargs)):
            return self.base_model.model.generate(*args, **kwargs)

    def _generate_expansion(self, kwargs: dict[str, Any]) -> int:
        """How many rows transformers' `generate` makes of each input sample:
        ``max(num_beams, num_return_sequences)``, from the call or the generation config."""
        config = kwargs.get("generation_config") or getattr(self.base_model.model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
        sequences = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
        return max(int(beams), int(sequences))

    # -- merge -----------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: active) into the base weights, rounding once; idempotent."""
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Restore the base weights bit for bit."""
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge adapters into the base and return the plain model."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging and return the plain model."""
        return self.base_model.unload()

    def merge_restore_nbytes(self) -> int:
        """Bytes held so that unmerge can restore the base exactly."""
        return sum(layer.merge_restore_nbytes for _, layer in self.base_model.lora_layers())

    # -- counting --------------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool | None = None, revision: str | None = None,
                   low_cpu_mem_usage: bool = False, adapter_dtype: torch.dtype | str | None = None,
                   precision: str | None = None) -> PeftModel:
    """Add a LoRA adapter to `model` and return it wrapped in a `PeftModel`.

    Adapter dtype, in order of precedence: `adapter_dtype` if given; else float32 when
    `autocast_adapter_dtype` is True (the default) and the base is fp16/bf16; else the base
    layer's dtype (a quantized layer's compute dtype). Or name a policy with `precision`
    ("stable", "mixed", "fast", "fsdp"; see `loracast.precision.policies`), which sets all of these at once; a knob
    passed with it must agree with it. Base parameters are frozen.

    `model` is adapted in place: its targeted modules are replaced by LoRA layers that wrap them.
    On a transformers `PreTrainedModel`, loracast also sets transformers' PEFT-integration
    attributes on that model instance (never on its class), so that transformers treats it as an
    adapter model without the peft package: ``_hf_peft_config_loaded``, ``peft_config`` (the
    returned model's dict) and the methods ``active_adapters``, ``active_adapter``,
    ``get_adapter_state_dict``, ``set_adapter``, ``enable_adapters``, ``disable_adapters``,
    ``add_adapter``, ``load_adapter`` and ``delete_adapter``, each acting on the returned
    `PeftModel`. With them `Trainer(model=peft_model.get_base_model())` trains the adapter (on a
    quantized base too) and its ``save_pretrained`` / ``trainer.save_model`` write only the adapter,
    in PEFT's format. `merge_and_unload()` and `unload()` remove them again
    (`loracast.integrations.transformers`).

    Raises:
        ValueError: target_modules matches nothing (the message lists module names), or a matched
            module cannot carry LoRA.
        PrecisionError: the precision arguments conflict, or the base cannot satisfy the policy.
    """
    if mixed:
        raise LoracastError("mixed=True (PeftMixedModel) is not supported; loracast models hold several LoRA "
                            "adapters without it (add_adapter / set_adapter)")
    if revision is not None:
        peft_config.revision = revision
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                     adapter_dtype=adapter_dtype, precision=precision)
