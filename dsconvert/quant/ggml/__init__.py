"""Vectorised torch GGML block quantizers, byte-compatible with llama.cpp's ``ggml-quants.c``.

Pure tensor functions (no file I/O), device-agnostic: the same code runs on CPU and CUDA.

API::

    quantize(x, qtype, imatrix=None) -> uint8 [..., row_bytes]
    dequantize(raw, qtype, shape=None) -> float32 [..., n_per_row]
    get_type(name) -> GGMLType subclass        # "q4_k", "Q4_K", "q4k", GGMLQuantizationType.Q4_K, 12
    registered_types() -> ["F32", "F16", "Q4_0", ...]

Types: F32, F16, BF16 (passthrough), Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (legacy, byte-identical),
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (K-quants; see :mod:`.kquants` for exactness notes), IQ4_NL and IQ4_XS
(:mod:`.iquants`), the lattice types IQ1_S, IQ1_M (:mod:`.iq1`), IQ2_XXS, IQ2_XS, IQ2_S (:mod:`.iq2`), IQ3_XXS and
IQ3_S (:mod:`.iq3`).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from . import iq1, iq2, iq3, iquants, kquants, legacy, plain  # noqa: F401  (registration)
from .base import MAX_CHUNK_BYTES, GGMLType, get_type, registered_types

__all__ = ["GGMLType", "MAX_CHUNK_BYTES", "dequantize", "get_type", "quantize", "registered_types"]


def quantize(x: torch.Tensor, qtype: str | int | GGMLQuantizationType, imatrix: torch.Tensor | None = None, *,
             max_chunk_bytes: int = MAX_CHUNK_BYTES) -> torch.Tensor:
    """Quantize ``x`` (``[..., n_per_row]``) to ``qtype``; see :meth:`GGMLType.quantize`."""
    return get_type(qtype).quantize(x, imatrix, max_chunk_bytes=max_chunk_bytes)


def dequantize(raw: torch.Tensor, qtype: str | int | GGMLQuantizationType,
               shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
    """Dequantize uint8 rows of ``qtype`` to float32 ``shape``; see :meth:`GGMLType.dequantize`."""
    return get_type(qtype).dequantize(raw, shape)
