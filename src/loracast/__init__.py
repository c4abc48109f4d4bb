"""loracast: LoRA fine-tuning for PyTorch with exact, explainable control of numeric precision.

Switch from PEFT by changing one import::

    from loracast import LoraConfig, get_peft_model, PeftModel
"""

from .compute import get_lora_compute, set_lora_compute
from .config import LoraConfig
from .errors import AdapterLoadError, ConfigError, PrecisionError, PrecisionWarning
from .kbit import prepare_model_for_kbit_training
from .layers import Conv, Embedding, Linear, LoraLayer
from .merge import NonFiniteMergeError
from .model import LoraModel, PeftModel, get_peft_model
from .modules_to_save import ModulesToSaveWrapper
from .precision import resolve_adapter_dtype
from .quant.merge import RequantizationWarning
from .policies import POLICIES, PrecisionPlan
from .doctor import Finding, Report, doctor  # noqa: E402  (binds loracast.doctor to the function)

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "Conv",
    "Embedding",
    "Linear",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
    "ModulesToSaveWrapper",
    "NonFiniteMergeError",
    "PeftModel",
    "POLICIES",
    "PrecisionError",
    "PrecisionPlan",
    "PrecisionWarning",
    "RequantizationWarning",
    "Finding",
    "Report",
    "doctor",
    "get_lora_compute",
    "get_peft_model",
    "prepare_model_for_kbit_training",
    "resolve_adapter_dtype",
    "set_lora_compute",
    "__version__",
]
