"""Placing `trainable_token_indices` adapters: which embeddings, and the heads tied to them.

As PEFT: a list of ids trains those rows of the model's input embedding; a dict maps embedding
names (matched like `modules_to_save`: the full name or a dotted suffix) to ids. When the model
ties its output head to the input embedding (``tie_word_embeddings``), the head follows the
embedding's rows, so the chosen tokens' logits use the trained rows too.
"""

from __future__ import annotations

import torch
from torch import nn

from loracast.config import LoraConfig
from loracast.errors import ConfigError
from loracast.layers.trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper
from loracast.precision.rules import declared_dtype, resolve_adapter_dtype
from loracast.tuner.walk import replace_child, walk


def _input_embedding_name(model: nn.Module) -> str:
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    if embedding is not None:
        for name, module in model.named_modules():
            if module is embedding:
                return name
    return "embed_tokens"


def token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """Embedding name (as the config gives it) -> token ids, for a config with trainable_token_indices."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    targets = dict(spec) if isinstance(spec, dict) else {_input_embedding_name(model): list(spec)}
    clash = [name for name in targets if name in (config.modules_to_save or [])]
    if clash:
        raise ConfigError("trainable_token_indices", spec,
                          f"no layer also in modules_to_save ({clash} is in both): train the whole layer "
                          "with modules_to_save or some of its rows with trainable_token_indices")
    return targets


def _tied_heads(model: nn.Module, weight: torch.Tensor) -> list[str]:
    """Names of the Linear modules that share `weight` (a head tied to the embedding)."""
    return [node.name for node in walk(model, stop=(TrainableTokensWrapper,))
            if isinstance(node.module, nn.Linear) and node.module.weight is weight]


def wrap_trainable_tokens(model: nn.Module, config: LoraConfig, adapter_name: str, *,
                          autocast_adapter_dtype: bool = True, adapter_dtype: torch.dtype | None = None,
                          initialize: bool = True) -> list[str]:
    """Give adapter `adapter_name` the trainable rows `config.trainable_token_indices` names;
    returns the names of the embeddings (and tied heads) wrapped.

    Raises:
        ConfigError: a named embedding matches no module, or is also in modules_to_save.
        ValueError: a matched module is not an nn.Embedding, or an id is out of range.
    """
    targets = token_targets(model, config)
    model_dtype = declared_dtype(model)
    wrapped: list[str] = []
    for wanted, ids in targets.items():
        nodes = [node for node in walk(model, stop=(TrainableTokensWrapper,))
                 if node.name and (node.name == wanted or node.name.endswith("." + wanted))
                 and (isinstance(node.module, (nn.Embedding, TrainableTokensWrapper)))]
        if not nodes:
            raise ConfigError("trainable_token_indices", {wanted: ids},
                              "keys naming nn.Embedding modules of the model (full name or last part)")
        for node in nodes:
            wrapper = node.module
            if not isinstance(wrapper, TrainableTokensWrapper):
                wrapper = TrainableTokensWrapper(node.module)
                replace_child(node.parent, node.attr, wrapper)
            layer = wrapper.token_adapter
            dtype = resolve_adapter_dtype(layer.base_layer, autocast_adapter_dtype, adapter_dtype, model_dtype)
            layer.add_tokens(adapter_name, ids, dtype=dtype, initialize=initialize)
            wrapped.append(node.name)
            wrapped += _tie_heads(model, layer, adapter_name, ids, dtype)
    return wrapped


def _tie_heads(model: nn.Module, layer: TrainableTokensLayer, adapter_name: str, ids: list[int],
               dtype: torch.dtype) -> list[str]:
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return []
    names = []
    for name in _tied_heads(model, layer.base_layer.weight):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replace_child(parent, attr, TrainableTokensWrapper(getattr(parent, attr), tied_to=layer))
        names.append(name)
    for node in walk(model, stop=(TrainableTokensLayer,)):
        head = node.module
        if isinstance(head, TrainableTokensLayer) and head._tied_to is layer and adapter_name not in head.r:
            head.add_tokens(adapter_name, ids, dtype=dtype)
    return names
