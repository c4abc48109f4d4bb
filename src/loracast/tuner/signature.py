"""`PeftModel.forward` as callers see it: the wrapped model's parameters, plus ``adapter_names``.

transformers' `Trainer` keeps only the dataset columns named in ``inspect.signature(model.forward)``
(and decides from a ``**kwargs`` parameter whether to pass ``num_items_in_batch``); it looks
through a wrapper only when the wrapper is a ``peft.PeftModel``. So the wrapper's forward must
show the wrapped model's signature itself. A bound method's signature is its function's, which
is shared by every instance; this descriptor hands each instance a copy of the function whose
``__signature__`` is built from that instance's wrapped model. The code, and so the behaviour,
is the one function's; only what `inspect` reports differs. An instance attribute ``forward``
(as accelerate sets for autocast) still takes precedence, as for a plain method.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_ADAPTER_NAMES = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)


def merged_signature(wrapper_forward: Callable[..., Any], wrapped: Callable[..., Any]) -> inspect.Signature:
    """``self`` + `wrapped`'s parameters + keyword-only ``adapter_names`` (before any ``**kwargs``)."""
    try:
        params = list(inspect.signature(wrapped).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable with no signature: show the wrapper's own
        return inspect.signature(wrapper_forward)
    self_param = next(iter(inspect.signature(wrapper_forward).parameters.values()))
    if any(p.name == "adapter_names" for p in params):
        return inspect.Signature([self_param, *params])
    head = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    tail = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    return inspect.Signature([self_param, *head, _ADAPTER_NAMES, *tail])


class ForwardWithWrappedSignature:
    """Use as ``forward = ForwardWithWrappedSignature(_forward, lambda self: self.wrapped_model)``."""

    def __init__(self, function: types.FunctionType, wrapped_model: Callable[[Any], nn.Module]) -> None:
        self.function = function
        self.wrapped_model = wrapped_model
        self.__doc__ = function.__doc__
        # instance -> (the wrapped forward's function it was built for, the copy); weak, so that no
        # instance state is added (pickling and deep copies are unaffected)
        self._copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.function
        if torch.compiler.is_compiling():
            # inspect never runs inside a compiled graph, and the cache must not be traced: dynamo would
            # guard on the position of this instance among the weak keys, which shifts (IndexError
            # while building guards) when another instance is collected during compilation
            return types.MethodType(self.function, instance)
        return types.MethodType(self._function_for(instance), instance)

    def _function_for(self, instance: Any) -> types.FunctionType:
        wrapped = self.wrapped_model(instance).forward
        key = getattr(wrapped, "__func__", wrapped)
        cached = self._copies.get(instance)
        if cached is not None and cached[0] is key:
            return cached[1]
        source = self.function
        copy = types.FunctionType(source.__code__, source.__globals__, source.__name__, source.__defaults__,
                                  source.__closure__)
        copy.__kwdefaults__ = source.__kwdefaults__
        copy.__qualname__ = source.__qualname__
        copy.__doc__ = source.__doc__
        copy.__module__ = source.__module__
        copy.__signature__ = merged_signature(source, wrapped)
        self._copies[instance] = (key, copy)
        return copy
