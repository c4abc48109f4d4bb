"""LoRA layer wrappers, one module per base layer kind."""

from loracast.layers.base import LoraLayer
from loracast.layers.conv import Conv
from loracast.layers.embedding import Embedding
from loracast.layers.linear import Linear
from loracast.layers.mha import MultiheadAttention

__all__ = ["Conv", "Embedding", "Linear", "LoraLayer", "MultiheadAttention"]
