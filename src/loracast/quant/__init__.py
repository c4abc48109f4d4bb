"""Quantized base layers behind a small backend object (see `base.QuantBackend`)."""

from loracast.quant.base import QuantBackend, find_backend, register_backend

__all__ = ["QuantBackend", "find_backend", "register_backend"]
