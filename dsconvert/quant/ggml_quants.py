"""Compatibility entry point: the GGML block quantizers live in :mod:`dsconvert.quant.ggml`."""

from __future__ import annotations

from .ggml import MAX_CHUNK_BYTES, GGMLType, dequantize, get_type, quantize, registered_types

__all__ = ["GGMLType", "MAX_CHUNK_BYTES", "dequantize", "get_type", "quantize", "registered_types"]
