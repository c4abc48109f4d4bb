"""LoRA layer wrappers, one module per base layer kind."""

from loracast.layers.base import LoraLayer
from loracast.layers.conv import Conv
from loracast.layers.embedding import Embedding
from loracast.layers.linear import Linear

__all__ = ["Conv", "Embedding", "Linear", "LoraLayer"]
