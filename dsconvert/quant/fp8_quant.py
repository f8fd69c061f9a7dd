"""Block-wise FP8 (float8_e4m3fn) weight quantization: DeepSeek's rule, and its power-of-two (ue8m0) variant.

Weights are ``[M, N]`` (M = out_features, N = in_features). The weight is zero-padded to whole
``(bm, bn)`` blocks (128 x 128 for DeepSeek-V3/R1), and per block::

    scale   = amax(|w_block|) / 448                      (float32 division)
    scale   = 2 ** ceil(log2(scale))                     (only with pow2=True, the "ue8m0" scale format)
    scale   = round(scale, scale_dtype)                  (float32 for DeepSeek's layout, bf16 for compressed-tensors)
    q       = e4m3_rne(clamp(w / scale, -448, 448))      (float32 division, one round-to-nearest-even cast)

and the loader's inverse is ``w' = round(float32(q) * scale, out_dtype)`` (:func:`dsconvert.quant.fp8_block.
dequant_fp8_block`, DeepSeek's ``weight_dequant``). The padding is cropped after quantizing, so an edge block's
scale comes from its real elements only. A block whose scale would be 0 (all zeros, or an underflow in
``scale_dtype``) gets the storage dtype's ``eps`` instead, as compressed-tensors does; its payload is then 0.

**The payload is always quantized with the scale as stored** (rounded to power of two and to ``scale_dtype``
first), never under a scale that was rounded afterwards: rounding a scale under an already quantized payload
changes every weight of the block (docs/known-failures.md).

Round trip: for a weight that is already BF16 (a fine-tuned model, or a BF16 copy of a release that was itself
quantized from BF16 weights), ``quantize -> dequantize to BF16 -> quantize`` returns the same payload *and* the same
float32 scales bit for bit: the block's largest element becomes exactly 448, ``bf16(448 * scale)`` gives back the
BF16 amax, and every other element is within 2^-8 relative of its e4m3 value, far inside e4m3's half step.

Sources: DeepSeek-V3 ``README_WEIGHTS.md`` (128 x 128 blocks, zero padding, ``weight_scale_inv`` a multiplier),
``inference/kernel.py::act_quant`` (``s = amax / 448``, ``y = x / s``) and its ``scale_fmt == "ue8m0"`` branch
(``2 ** ceil(log2(s))``); compressed-tensors 0.20.1 ``quantization/lifecycle/forward_helpers.py::_process_block``
(padding, ``x / scale``, clamp, cast) and ``quantization/utils/helpers.py::calculate_qparams`` (eps for zero
scales). Layout: docs/checkpoint-layout.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsconvert.errors import ShapeError
from dsconvert.quant.fp8_block import dequant_fp8_block, scale_grid

__all__ = ["FP8_E4M3_MAX", "FP8BlockSpec", "FP8BlockTensor", "quantize_fp8_block", "dequantize_fp8_block",
           "pow2_ceil"]

FP8_E4M3_MAX = 448.0
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FP8BlockSpec:
    """What to quantize to: float8_e4m3fn weights with one scale per ``block`` = (rows, cols) tile.

    Attributes:
        block: ``(bm, bn)`` in (out_features, in_features) order; DeepSeek's ``weight_block_size``.
        pow2: round every scale up to a power of two (DeepSeek-V3.1's ``scale_fmt: ue8m0``) before
            quantizing the payload.
    """

    block: tuple[int, int] = (128, 128)
    pow2: bool = False

    def __post_init__(self):
        if len(self.block) != 2 or not all(isinstance(b, int) and b > 0 for b in self.block):
            raise ValueError(f"FP8 block must be two positive ints, got {self.block!r}")

    @property
    def bits(self) -> int:
        return 8

    def grid(self, shape: tuple[int, int], name: str | None = None) -> tuple[int, int]:
        """Scale grid ``(ceil(M/bm), ceil(N/bn))`` of a ``[M, N]`` weight.

        Raises:
            ShapeError: ``shape`` is not 2-D.
        """
        if len(shape) != 2:
            raise ShapeError(f"tensor {name or '?'!r}: FP8 block quantization needs a 2-D [out, in] weight, "
                             f"got {tuple(shape)}")
        return scale_grid((int(shape[0]), int(shape[1])), self.block)


@dataclass
class FP8BlockTensor:
    """A quantized weight: ``q`` ``[M, N]`` float8_e4m3fn, ``scale`` ``[ceil(M/bm), ceil(N/bn)]`` multipliers
    in their storage dtype, and the spec they were made with."""

    q: torch.Tensor
    scale: torch.Tensor
    spec: FP8BlockSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """``2 ** ceil(log2(s))`` for positive finite float32 ``s``, exactly (via frexp, no log rounding).

    ``s = m * 2**e`` with ``m`` in [0.5, 1): the result is ``s`` itself when ``m == 0.5`` (already a power of
    two), else ``2**e``.
    """
    m, e = torch.frexp(s)
    return torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))


def quantize_fp8_block(w: torch.Tensor, spec: FP8BlockSpec = FP8BlockSpec(),
                       scale_dtype: torch.dtype = torch.float32, name: str | None = None) -> FP8BlockTensor:
    """Quantize ``w`` ``[M, N]`` (any float dtype; computed in float32) to block-scaled e4m3 (module docstring).

    Args:
        w: ``[M, N]`` weight, M = out_features, N = in_features.
        spec: block shape and the power-of-two option.
        scale_dtype: storage dtype of the scales (float32: DeepSeek's ``weight_scale_inv``; bfloat16/float16:
            compressed-tensors' ``weight_scale`` in the model dtype).
        name: module name for error messages.

    Returns:
        :class:`FP8BlockTensor` on ``w``'s device.

    Raises:
        ShapeError: ``w`` is not 2-D.
        ValueError: ``scale_dtype`` is not float32/bfloat16/float16; ``w`` holds NaN or Inf.
    """
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"FP8 scale dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
    gm, gn = spec.grid(tuple(w.shape), name)
    m, n = w.shape
    bm, bn = spec.block
    x = w.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"tensor {name or '?'!r}: NaN or Inf in the weight; FP8 quantization needs finite values")
    pad = torch.zeros((gm * bm, gn * bn), dtype=torch.float32, device=x.device)
    pad[:m, :n] = x
    tiles = pad.view(gm, bm, gn, bn)
    scale = tiles.abs().amax(dim=(1, 3)) / FP8_E4M3_MAX  # [gm, gn] float32
    eps = torch.finfo(scale_dtype).eps
    scale = torch.where(scale > 0, scale, torch.full_like(scale, eps))
    if spec.pow2:
        scale = pow2_ceil(scale)
    stored = scale.to(scale_dtype)
    stored = torch.where(stored > 0, stored, torch.full_like(stored, eps))  # an underflow in bf16/fp16
    s32 = stored.to(torch.float32)
    q = (tiles / s32[:, None, :, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.view(gm * bm, gn * bn)[:m, :n].to(torch.float8_e4m3fn).contiguous()
    return FP8BlockTensor(q=q, scale=stored.contiguous(), spec=spec)


def dequantize_fp8_block(t: FP8BlockTensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The loader's inverse: ``round(float32(q) * scale, out_dtype)``, ``[M, N]``.

    For float32 scales this is DeepSeek's ``weight_dequant``; for bf16 scales it equals compressed-tensors'
    ``q.to(bf16) * scale`` (the product of a 4-bit and an 8-bit significand is exact in float32, so one
    rounding either way).
    """
    return dequant_fp8_block(t.q, t.scale.to(torch.float32), t.spec.block, out_dtype=out_dtype)
