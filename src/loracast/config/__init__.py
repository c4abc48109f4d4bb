"""The LoRA configuration: PEFT's `LoraConfig`, each field declared once.

- `spec`: how a field is declared (`option`: default, check, supported/kept/refused, help).
- `normalise`: one stored form for the spellings PEFT accepts (run before checking).
- `values`: what each kind of field accepts (checks that raise, never change a value).
- `lora_config`: `LoraConfig` itself and its file format.
- `table`: the README's table of supported and refused fields, rendered from the declarations.
"""

from loracast.config.lora_config import (
    CONFIG_NAME,
    PEFT_VERSION_WRITTEN,
    LoraConfig,
    lora_scaling,
    register_check,
    unsupported_options,
)
from loracast.config.values import init_is_supported

__all__ = [
    "CONFIG_NAME",
    "PEFT_VERSION_WRITTEN",
    "LoraConfig",
    "init_is_supported",
    "lora_scaling",
    "register_check",
    "unsupported_options",
]
