"""Finding the modules a config targets and wrapping them in LoRA layers.

Which names match is decided by `loracast.tuner.match` (PEFT's rules); this module resolves
`None` and ``"all-linear"`` targets for a model, walks it once, and wraps what matches. All
patterns are compiled once per call, and adapters are created directly on their base weight's
device in their final dtype, so injection costs little more than a walk over the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from loracast.config import LoraConfig
from loracast.errors import ConfigError, LoracastError
from loracast.layers import Conv, Embedding, Linear, LoraLayer, MultiheadAttention
from loracast.layers.init.from_base import is_weight_init
from loracast.layers.modules_to_save import ModulesToSaveWrapper
from loracast.layers.variant_registry import add_variant
from loracast.precision.rules import adapter_device, apply_adapter_rule, declared_dtype, resolve_adapter_dtype
from loracast.quant import find_backend
from loracast.quant.base import check_adaptable
from loracast.tuner.match import TargetMatcher, pattern_value
from loracast.tuner.params import inject_parameters
from loracast.tuner.walk import Node, replace_child, walk

# Default targets by transformers model_type when target_modules is None (PEFT's choice).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
}

# Classification heads PEFT adds to modules_to_save for these task types.
TASK_HEADS: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"],
}


@functools.cache
def _conv1d_type() -> type | None:
    try:  # transformers is optional; GPT-2 style Conv1D only exists with it
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    """True for modules 'all-linear' targets: nn.Linear (quantized ones too) and GPT-2's Conv1D."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)) \
        or find_backend(module) is not None


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> None:
    """Fill in `config.target_modules` for None (model-type default) and 'all-linear' (expanded),
    as PEFT does, so the saved config names the modules actually adapted."""
    if config.target_modules is None and config.target_parameters:
        return  # parameters only, as PEFT: no default modules
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise LoracastError(
                f"target_modules is None and loracast has no default for model type {model_type!r}; "
                "set target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
        config.target_modules = list(DEFAULT_TARGETS[model_type])
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        heads = {id(head) for head in _output_heads(model, config)}
        config.target_modules = [
            name for name, module, _, _ in _outside_wrappers(model)
            if name and id(module) not in heads and (is_linear_like(module) or isinstance(module, Linear))
        ]


def _output_heads(model: nn.Module, config: LoraConfig) -> list[nn.Module]:
    """The modules 'all-linear' leaves out: the output embedding (or, for SEQ_CLS, the classifier)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        return [output]
    if config.task_type == "SEQ_CLS":
        for attr in ("classifier", "score"):
            if isinstance(getattr(model, attr, None), nn.Module):
                return [getattr(model, attr)]
    return []


def _outside_wrappers(model: nn.Module) -> list[Node]:
    return walk(model, stop=(LoraLayer, ModulesToSaveWrapper))


# Dispatch: the first entry whose predicate accepts the base layer builds the LoRA wrapper.
LayerFactory = Callable[[nn.Module, LoraConfig], LoraLayer]


def _make_linear(base: nn.Module, config: LoraConfig) -> LoraLayer:
    conv1d = _conv1d_type()
    is_conv1d = conv1d is not None and isinstance(base, conv1d)
    if is_conv1d and not config.fan_in_fan_out:
        import warnings
        warnings.warn("fan_in_fan_out is False but the target is a Conv1D (weight stored as (in, out)); "
                      "setting fan_in_fan_out=True", UserWarning, stacklevel=4)
        config.fan_in_fan_out = True
    elif isinstance(base, nn.Linear) and config.fan_in_fan_out and find_backend(base) is None:
        import warnings
        warnings.warn("fan_in_fan_out is True but the target is an nn.Linear; setting fan_in_fan_out=False",
                      UserWarning, stacklevel=4)
        config.fan_in_fan_out = False
    return Linear(base, fan_in_fan_out=is_conv1d)


DISPATCH: list[tuple[str, Callable[[nn.Module], bool], LayerFactory]] = [
    ("quantized linear", lambda m: find_backend(m) is not None, _make_linear),
    ("nn.Embedding", lambda m: isinstance(m, nn.Embedding), lambda m, c: Embedding(m)),
    ("nn.Conv1d/2d/3d", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), lambda m, c: Conv(m)),
    ("nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention), lambda m, c: MultiheadAttention(m)),
    ("nn.Linear", lambda m: isinstance(m, nn.Linear), _make_linear),
    ("transformers Conv1D", lambda m: (_conv1d_type() is not None and isinstance(m, _conv1d_type())),
     _make_linear),
]


def _freeze(module: nn.Module) -> None:
    if module._modules:
        module.requires_grad_(False)
        return
    for param in module._parameters.values():  # a leaf layer: no walk needed
        if param is not None:
            param.requires_grad_(False)


def make_lora_layer(base: nn.Module, config: LoraConfig, name: str) -> LoraLayer:
    """Wrap `base` in the LoRA layer its type calls for.

    Raises:
        ValueError: the module type cannot carry a LoRA adapter.
    """
    for _, accepts, factory in DISPATCH:
        if accepts(base):
            return factory(base, config)
    supported = ", ".join(label for label, _, _ in DISPATCH)
    raise LoracastError(f"target module {name!r} is a {type(base).__name__}, which LoRA cannot adapt; "
                        f"supported: {supported}. Narrow target_modules so it does not match this module")


def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    *,
    autocast_adapter_dtype: bool = True,
    adapter_dtype: torch.dtype | None = None,
    initialize: bool = True,
) -> list[str]:
    """Add adapter `adapter_name` to every module `config` targets; returns their names.

    `initialize=False` leaves the adapter values uninitialised (they are loaded next).

    Raises:
        ValueError: nothing matches (the message lists the patterns and some module names),
            or a matched module cannot carry an adapter.
    """
    resolve_target_modules(model, config)
    matcher = TargetMatcher(config)
    init = config.init_lora_weights if initialize else None
    from_base = config.init_lora_weights if is_weight_init(config.init_lora_weights) else None
    if initialize and config.init_lora_weights == "orthogonal":
        from_base = "orthogonal"
    model_dtype = declared_dtype(model)  # for bases with no float dtype of their own (8-bit)
    targeted: list[str] = []
    candidates: list[str] = []
    matched: list[Node] = []
    for node in _outside_wrappers(model):
        name = node.name
        if not name:
            continue
        if len(candidates) < 400:
            candidates.append(name)
        if not matcher.inactive and matcher.matches(name):
            matched.append(node)
    # unknown quantized weights are refused before any module is wrapped
    check_adaptable((name, module) for name, module, _, _ in matched if not isinstance(module, LoraLayer))
    for name, module, parent, attr in matched:
        if isinstance(module, LoraLayer):
            layer = module
        else:  # frozen before any adapter exists (an MHA wrapper holds adapter parts inside its base)
            layer = make_lora_layer(module, config, name)
            _freeze(layer.get_base_layer())
        base = layer.adapter_reference()
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        dtype = resolve_adapter_dtype(base, autocast_adapter_dtype, adapter_dtype, model_dtype)
        device = adapter_device(base)
        layer.update_layer(
            adapter_name, r, alpha, lora_dropout=config.lora_dropout, init_lora_weights=init,
            use_rslora=config.use_rslora, lora_bias=config.lora_bias, dtype=dtype, device=device)
        if from_base:  # also when loading: the saved factors belong to the residual base (as PEFT)
            _init_from_base(layer, adapter_name, from_base, config, name)
        # a variant's own tensors (DoRA's magnitude) follow the adapter dtype rule, like the factors
        add_variant(layer, adapter_name, config, name, dtype=dtype, device=device, initialize=init is not None)
        if layer is not module:
            replace_child(parent, attr, layer)
        targeted.append(name)
    if not targeted and not config.target_parameters:
        raise LoracastError(_no_match_message(config, candidates))
    targeted += inject_parameters(
        model, config, adapter_name,
        lambda key: (pattern_value(config.rank_pattern, key, config.r),
                     pattern_value(config.alpha_pattern, key, config.lora_alpha)),
        autocast_adapter_dtype=autocast_adapter_dtype, adapter_dtype=adapter_dtype, initialize=initialize)
    return targeted


def _init_from_base(layer: LoraLayer, adapter_name: str, init: str, config: LoraConfig, name: str) -> None:
    if not isinstance(layer, Linear):
        raise ConfigError("init_lora_weights", init,
                          f"True, False or 'gaussian' for {name!r} (a {type(layer.get_base_layer()).__name__}): "
                          "PiSSA, OLoRA, LoftQ and orthogonal starts apply to linear layers only; narrow "
                          "target_modules to linear layers")
    layer.init_from_base(adapter_name, init, config.loftq_config)


def _no_match_message(config: LoraConfig, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
    shown = ", ".join(leaves[:25]) + (" ..." if len(leaves) > 25 else "")
    extra = ""
    if config.layers_to_transform is not None:
        extra = f" with layers_to_transform={config.layers_to_transform!r} and layers_pattern={config.layers_pattern!r}"
    if config.exclude_modules:
        extra += f" after exclude_modules={config.exclude_modules!r}"
    return (f"target_modules={config.target_modules!r}{extra} matched no module of the model. "
            f"Module names that exist (last part): {shown}. Use names from this list, a regex over full "
            f"names, or 'all-linear'")


def wrap_modules_to_save(model: nn.Module, config: LoraConfig, adapter_name: str, *,
                         autocast_adapter_dtype: bool = True,
                         adapter_dtype: torch.dtype | None = None) -> list[str]:
    """Give every module named in `config.modules_to_save` a trainable copy for `adapter_name`.

    Raises:
        ValueError: a name in modules_to_save matches no module.
    """
    wanted = config.modules_to_save or []
    if not wanted:
        return []
    wrapped: list[str] = []
    found: set[str] = set()
    for name, module, parent, attr in _outside_wrappers(model):
        leaf_match = [w for w in wanted if name == w or name.endswith("." + w)]
        if not name or not leaf_match:
            continue
        found.update(leaf_match)
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        original = wrapper.original_module
        float_params = [p for p in original.parameters() if p.is_floating_point()]
        dtype = None
        if float_params:  # the copy follows the adapter dtype rule, from the module's own dtype
            dtype = apply_adapter_rule(float_params[0].dtype, autocast_adapter_dtype, adapter_dtype)
        wrapper.add_copy(adapter_name, dtype)
        if wrapper is not module:
            replace_child(parent, attr, wrapper)
        wrapped.append(name)
    task_heads = set(TASK_HEADS.get(config.task_type or "", []))
    missing = [w for w in wanted if w not in found and w not in task_heads]
    if missing:
        raise LoracastError(f"modules_to_save names {missing} match no module of the model; "
                            "give module names (or dotted suffixes) that exist")
    return wrapped


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer in `model`, nested parameter wrappers included (outer first)."""
    for node in walk(model, stop=(LoraLayer,)):
        name, layer = node.name, node.module
        while isinstance(layer, LoraLayer):
            yield name, layer
            name, layer = name + ".base_layer", layer.base_layer


def iter_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """(name, wrapper) for every modules_to_save wrapper in `model`."""
    for node in walk(model, stop=(LoraLayer, ModulesToSaveWrapper)):
        if isinstance(node.module, ModulesToSaveWrapper):
            yield node.name, node.module


def iter_adapter_modules(model: nn.Module) -> list[LoraLayer | ModulesToSaveWrapper]:
    """Every LoRA layer and modules_to_save wrapper in `model`, in one walk."""
    kinds = (LoraLayer, ModulesToSaveWrapper)
    found: list[LoraLayer | ModulesToSaveWrapper] = []
    for node in walk(model, stop=kinds):
        module = node.module
        while isinstance(module, kinds):
            found.append(module)
            module = module.base_layer if isinstance(module, LoraLayer) else None
    return found
