"""loracast: LoRA fine-tuning for PyTorch with exact, explainable control of numeric precision.

Switch from PEFT by changing one import::

    from loracast import LoraConfig, get_peft_model, PeftModel
"""

from loracast._version import __version__
from loracast.config import LoraConfig
from loracast.diagnostics import Finding, Report, doctor  # binds loracast.doctor to the function
from loracast.errors import (
    AdapterLoadError,
    ConfigError,
    LoracastError,
    PrecisionError,
    PrecisionWarning,
    UnsupportedArgumentError,
)
from loracast.layers import Conv, Embedding, Linear, LoraLayer
from loracast.layers.compute.modes import get_lora_compute, set_lora_compute
from loracast.layers.merge import NonFiniteMergeError
from loracast.layers.modules_to_save import ModulesToSaveWrapper
from loracast.precision.policies import POLICIES, PrecisionPlan
from loracast.precision.rules import resolve_adapter_dtype
from loracast.quant.kbit import prepare_model_for_kbit_training
from loracast.quant.merge import RequantizationWarning
from loracast.tuner.peft_model import LoraModel, PeftModel, get_peft_model

__all__ = [
    "POLICIES",
    "AdapterLoadError",
    "ConfigError",
    "Conv",
    "Embedding",
    "Finding",
    "Linear",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "LoracastError",
    "ModulesToSaveWrapper",
    "NonFiniteMergeError",
    "PeftModel",
    "PrecisionError",
    "PrecisionPlan",
    "PrecisionWarning",
    "Report",
    "RequantizationWarning",
    "UnsupportedArgumentError",
    "__version__",
    "doctor",
    "get_lora_compute",
    "get_peft_model",
    "prepare_model_for_kbit_training",
    "resolve_adapter_dtype",
    "set_lora_compute",
]
