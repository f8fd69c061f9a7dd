"""One quantized module's output for the quantize pipeline, and the weight reads both quantize paths share
(RTN in :mod:`dsconvert.convert.quantize`, calibrated in :mod:`dsconvert.convert.calibrated`).

Kept apart from both so that neither imports the other's internals (``quantize`` drives ``calibrated``;
``calibrated`` needs only these).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.checkpoint import Checkpoint
from ..quant.fp8_block import dequant_fp8_block
from ..quant.rtn import QTensor, dequantize

__all__ = ["ModuleResult", "read_weight", "read_float", "rel_error"]


@dataclass
class ModuleResult:
    """The tensors one quantized module writes (``{HF name: tensor}``, e.g. ``….weight_packed``,
    ``….weight_scale``) and its relative RMS weight error (:func:`rel_error`)."""

    tensors: dict[str, torch.Tensor]
    rel_error: float


def read_weight(ck: Checkpoint, name: str) -> torch.Tensor:
    """``(M, N)`` of a weight in its float form: FP8 (and DeepSeek-V4 FP4 e2m1 experts, ``N`` = twice the stored
    bytes per row) dequantized to BF16 exactly as fp8-to-bf16, else as stored.

    Raises:
        BadInputError: the tensor or its scale cannot be read (see :meth:`Checkpoint.read`).
    """
    if ck.v4 is not None and (ck.is_fp8_weight(name) or ck.is_fp4_weight(name)):
        # DeepSeek-V4 FP8 (E8M0/F32 ``.scale``) and FP4 e2m1 experts: the very producer fp8-to-bf16 writes with
        from .pipeline import dequant_producer

        (w,) = dequant_producer(ck, name, torch.bfloat16, torch.device("cpu"), 2**62)()  # one chunk: no copy
        return w
    t = ck.read(name)
    if t.dtype == torch.float8_e4m3fn:
        t = dequant_fp8_block(t, ck.read(ck.scale_of(name)), ck.fp8.block)
    return t


def read_float(ck: Checkpoint, name: str) -> torch.Tensor:
    """float32 ``(M, N)`` of a weight: :func:`read_weight`, then widened."""
    return read_weight(ck, name).to(torch.float32)


def rel_error(w: torch.Tensor, qt: QTensor) -> float:
    """Relative RMS error ``||w - deq(q)|| / ||w||`` (float64 norms; 0 for an all-zero ``w``)."""
    d = dequantize(qt).to(w.device, torch.float64)
    w64 = w.to(torch.float64)
    n = float(torch.linalg.vector_norm(w64))
    return float(torch.linalg.vector_norm(w64 - d)) / n if n > 0 else 0.0
