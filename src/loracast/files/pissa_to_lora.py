"""PiSSA / OLoRA / LoftQ adapters converted to plain LoRA adapters: PEFT's weight conversion.

An adapter that started from the base weight (``W = W_res + s * B0 @ A0``) and trained to
``B @ A`` changed the model by ``s * (B @ A - B0 @ A0)``. That is a rank-2r LoRA adapter on the
untouched base: ``A' = [A; A0]``, ``B' = [B, -B0]``, with r and lora_alpha doubled so the
scaling stays the same (alpha times sqrt(2) under rsLoRA). PEFT writes this when
`save_pretrained` is given `path_initial_model_for_weight_conversion` (the folder the adapter
was saved to before training); loracast writes the same keys, shapes and config. The
factors are only concatenated, so the conversion adds no rounding.
"""

from __future__ import annotations

import copy
import os

import torch

from loracast.config import LoraConfig
from loracast.errors import AdapterLoadError, ConfigError
from loracast.files.format import read_adapter_weights


def converted_config(config: LoraConfig) -> LoraConfig:
    """The config of the rank-2r plain LoRA adapter equivalent to a trained PiSSA/OLoRA one.

    Raises:
        ConfigError: use_rslora together with rank_pattern or alpha_pattern (as PEFT).
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("path_initial_model_for_weight_conversion", "use_rslora with rank/alpha patterns",
                          "use_rslora=False, or no rank_pattern/alpha_pattern, to convert (PEFT refuses it too)")
    out = copy.deepcopy(config)
    out.init_lora_weights = True
    out.r = config.r * 2
    out.lora_alpha = config.lora_alpha * (2 ** 0.5 if config.use_rslora else 2)
    out.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    out.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}
    return out


def subtract_initial(tensors: dict[str, torch.Tensor], initial_folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The file tensors of the plain LoRA adapter: `tensors` (the trained adapter, file keys)
    joined with the initial adapter saved in `initial_folder`.

    Raises:
        AdapterLoadError: the initial folder lacks a factor of `tensors`, or its shape differs.
        ConfigError: the initial adapter's config still names a base-rewriting initialisation.
    """
    folder = os.fspath(initial_folder)
    initial_config = LoraConfig.from_pretrained(folder)
    if initial_config.init_lora_weights is not True:
        raise ConfigError("init_lora_weights", initial_config.init_lora_weights,
                          f"True in {folder}'s adapter_config.json: save the initial adapter after setting "
                          "model.peft_config[name].init_lora_weights = True, as PEFT requires")
    initial, _ = read_adapter_weights(folder)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if ".lora_A." not in f".{key}" and ".lora_B." not in f".{key}":
            continue  # PEFT's converted file holds the factors only
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            found = None if start is None else tuple(start.shape)
            raise AdapterLoadError(f"{folder}: the initial adapter has {found} for {key!r}, the trained one "
                                   f"{tuple(tensor.shape)}; pass the folder saved from this adapter before training")
        start = start.to(tensor.dtype)
        out[key] = torch.cat([tensor, start], dim=0) if ".lora_A." in f".{key}" else torch.cat([tensor, -start], dim=1)
    return out
