"""LoRA layer wrappers, one module per base layer kind."""

from .base import LoraLayer
from .conv import Conv
from .embedding import Embedding
from .linear import Linear

__all__ = ["LoraLayer", "Linear", "Embedding", "Conv"]
