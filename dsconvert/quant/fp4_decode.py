"""DeepSeek-V4's micro-scaled formats: e8m0 power-of-two scales, FP4 e2m1 experts, FP8 e4m3 with e8m0 blocks.

Layouts (docs/checkpoint-layout.md §13):

* e8m0 (``float8_e8m0fnu``, ue8m0): one byte ``b`` is ``2**(b - 127)``; ``b = 255`` is NaN; no sign, no zero.
* FP4 e2m1: a 4-bit code, bit 3 the sign, magnitudes ``[0, 0.5, 1, 1.5, 2, 3, 4, 6]``. Stored two per byte
  (safetensors ``I8``, shape ``[M, N/2]``): element ``2j`` in the **low** nibble, ``2j+1`` in the high nibble.
  One e8m0 scale per row per 32 consecutive elements along N: scale shape ``[M, N/32]``. This is OCP MXFP4.
* FP8 dense weights: e4m3fn ``[M, N]`` with one e8m0 scale per 128x128 block (``[ceil(M/128), ceil(N/128)]``).

Dequantization rule (both): ``out = out_dtype_rne(float32(code_value) * float32(2**(b - 127)))``: one float32
multiply, one round-to-nearest-even cast. A decoded value has at most 2 (e2m1) or 4 (e4m3) significant bits and
the scale is a power of two, so whenever the product is a normal number (magnitude in ``[2**-126, 2**128)``) the
float32 product and its BF16 cast are both exact: V4 -> BF16 loses nothing for every scale a release uses. Outside
that range the multiply rounds by IEEE gradual underflow and the cast rounds to nearest even (an overflowing product
is ``inf``); tests check the rule bit for bit there too.

All functions are pure tensor kernels (no file I/O).
"""

from __future__ import annotations

import torch

from dsconvert.quant.fp4 import E2M1_VALUES as _MAGNITUDES, MXFP4_GROUP, e2m1_encode, pack_fp4

__all__ = ["E2M1_VALUES", "e8m0_to_float32", "dequant_fp4", "quantize_fp4", "quantize_fp8_e8m0",
           "e8m0_grid_to_float32", "FP4_GROUP"]

FP4_GROUP = MXFP4_GROUP
#: value of each e2m1 code 0..15 (bit 3 = sign), from :data:`dsconvert.quant.fp4.E2M1_VALUES`
E2M1_VALUES = _MAGNITUDES + tuple(-v for v in _MAGNITUDES)
_E2M1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)
# byte -> (value of the low nibble, value of the high nibble): one gather decodes a packed byte
_E2M1_PAIRS = torch.stack([_E2M1[torch.arange(256) & 0xF], _E2M1[torch.arange(256) >> 4]], dim=-1)  # [256, 2]
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bf16_bits(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF


# BF16 fast path: byte -> the two BF16 bit patterns of its codes at scale 2**0 packed in one int32 (element 2j, the
# low nibble, in the low half: little-endian memory order), and a mask of the halves whose magnitude is non-zero.
_PAIR_BITS = _bf16_bits(_E2M1_PAIRS[:, 0]) | (_bf16_bits(_E2M1_PAIRS[:, 1]) << 16)
_PAIR_NZ = (((_E2M1_PAIRS[:, 0] != 0).to(torch.int32) * 0xFFFF)
            | ((_E2M1_PAIRS[:, 1] != 0).to(torch.int32) * 0xFFFF << 16))
# Scale bytes for which every product is a normal BF16 number (exponent field 1..254): e2m1 exponents span 2**-1..2**2
_FAST_LO, _FAST_HI = 2, 250


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.uint8, torch.int8) or t.element_size() == 1:
        return t.contiguous().view(torch.uint8)
    raise ValueError(f"expected a 1-byte tensor (float8_e8m0fnu / uint8 / int8), got {t.dtype}")


def e8m0_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """Decode e8m0 bytes to float32 exactly: ``2**(b - 127)``; ``b = 0`` gives the subnormal ``2**-127``,
    ``b = 255`` gives NaN.

    Args:
        scale: any shape, ``torch.float8_e8m0fnu`` or its raw ``uint8`` bytes.
    Returns:
        float32 tensor of the same shape.
    """
    b = _as_bytes(scale).to(torch.int32)
    bits = b << 23  # the float32 exponent field: exact for 1 <= b <= 254
    bits = torch.where(b == 0, torch.full_like(bits, 0x00400000), bits)  # 2**-127 (subnormal)
    bits = torch.where(b == 255, torch.full_like(bits, 0x7FC00000), bits)  # NaN
    return bits.view(torch.float32)


def e8m0_grid_to_float32(scale: torch.Tensor) -> torch.Tensor:
    """A scale grid as float32 multipliers: e8m0/uint8 decoded by :func:`e8m0_to_float32`, float grids (the
    F32 scales of V4-Flash-Base experts, V3's ``weight_scale_inv``) converted with ``.float()``."""
    if scale.dtype.is_floating_point and scale.element_size() > 1:
        return scale.to(torch.float32)
    return e8m0_to_float32(scale)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize FP4 e2m1 weights with per-32 e8m0 scales (DeepSeek-V4 routed experts, MXFP4).

    Args:
        packed: ``[M, N/2]`` int8/uint8, two codes per byte, element ``2j`` in the low nibble.
        scale: ``[M, N/32]`` ``float8_e8m0fnu`` or uint8 (or float32 multipliers).
        out_dtype: bfloat16 (default), float16 or float32; one float32 multiply, one round-to-nearest-even cast.
        out: optional preallocated ``[M, N]`` output of ``out_dtype``.
    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    Raises:
        ValueError: not 2-D, wrong dtypes, or a scale shape other than ``[M, N/32]``.
    """
    if packed.dim() != 2 or packed.element_size() != 1 or packed.dtype.is_floating_point:
        raise ValueError(f"FP4 weights must be a 2-D int8/uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    m, half = packed.shape
    n = 2 * half
    if n % FP4_GROUP or tuple(scale.shape) != (m, n // FP4_GROUP):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match weight [{m}, {n}] "
                         f"(expected [{m}, {n // FP4_GROUP}])")
    u8 = packed.contiguous().view(torch.uint8)
    if out_dtype == torch.bfloat16 and scale.element_size() == 1 and m * n:
        sb = _as_bytes(scale)
        if int(sb.min()) >= _FAST_LO and int(sb.max()) <= _FAST_HI:
            return _dequant_fp4_bf16_bits(u8, sb, out)
    vals = _E2M1_PAIRS.to(packed.device)[u8.long()].reshape(m, n)  # [M, N/2, 2] -> [M, N] float32, 2j low nibble
    s = e8m0_grid_to_float32(scale).to(packed.device)
    vals.view(m, n // FP4_GROUP, FP4_GROUP).mul_(s.unsqueeze(-1))  # in place: one float32 multiply per element
    if out is None:
        return vals.to(out_dtype)
    out.copy_(vals)
    return out


def _dequant_fp4_bf16_bits(u8: torch.Tensor, sb: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """BF16 result built from bits, for scale bytes in [2, 250] where the rule's result is exact: the BF16 pattern
    of the code (a table) with ``b - 127`` added to its exponent field (non-zero magnitudes only; each resulting
    exponent field stays within 1..254, so no lane overflows). Bit-identical to the float32 multiply + RNE cast
    there (tests/formats/test_deepseek_v4.py checks both paths against numpy)."""
    m, half = u8.shape
    n = 2 * half
    dev = u8.device
    idx = u8.reshape(-1).to(torch.int32)
    bits = torch.index_select(_PAIR_BITS.to(dev), 0, idx).view(torch.int16).view(m, n // FP4_GROUP, FP4_GROUP)
    nz = torch.index_select(_PAIR_NZ.to(dev), 0, idx).view(torch.int16).view(m, n // FP4_GROUP, FP4_GROUP)
    off = ((sb.to(torch.int16) - 127) << 7).unsqueeze(-1)  # [M, N/32, 1]: the exponent shift of each group
    bits += nz & off
    res = bits.view(torch.bfloat16).view(m, n)
    if out is None:
        return res
    out.copy_(res)
    return out


def _e8m0_for(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest power-of-two exponent ``e`` with ``amax / 2**e <= qmax`` (0 for all-zero blocks), as the
    e8m0 byte ``e + 127`` (uint8), clamped to [1, 254]."""
    e = torch.ceil(torch.log2(amax.double() / qmax))
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    # log2 may land a hair low on exact powers of two: bump where the quotient still exceeds qmax
    e = torch.where(amax.double() / torch.exp2(e) > qmax, e + 1, e)
    return (e + 127).clamp(1, 254).to(torch.uint8)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[M, N]`` float weights (N a multiple of 32) to FP4 e2m1 + per-32 e8m0 scales.

    Scale: per row per 32 inputs, the smallest power of two with ``amax / scale <= 6`` (so nothing clips, unlike
    OCP MX's ``2**(floor(log2 amax) - 2)`` in :func:`dsconvert.quant.fp4.mxfp4_quantize`); each value is rounded
    to the nearest e2m1 level, ties to the even code (:func:`~dsconvert.quant.fp4.e2m1_encode`).

    Returns:
        ``(packed int8 [M, N/2], scale float8_e8m0fnu [M, N/32])`` in DeepSeek-V4's release layout.
    """
    m, n = w.shape
    if n % FP4_GROUP:
        raise ValueError(f"FP4 needs N divisible by {FP4_GROUP}, got {n}")
    x = w.float().view(m, n // FP4_GROUP, FP4_GROUP)
    sb = _e8m0_for(x.abs().amax(-1), 6.0)  # [M, N/32]
    y = (x / e8m0_to_float32(sb).unsqueeze(-1)).view(m, n)
    return pack_fp4(e2m1_encode(y)).view(torch.int8), sb.view(torch.float8_e8m0fnu)


def quantize_fp8_e8m0(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[M, N]`` float weights to e4m3fn with one power-of-two (e8m0) scale per zero-padded block.

    Scale: the smallest power of two with ``amax / scale <= 448``; payload ``e4m3(w / scale)`` (torch's RNE cast,
    exact division by a power of two).

    Returns:
        ``(weight float8_e4m3fn [M, N], scale float8_e8m0fnu [ceil(M/bm), ceil(N/bn)])``.
    """
    m, n = w.shape
    bm, bn = block
    gm, gn = -(-m // bm), -(-n // bn)
    pad = torch.zeros(gm * bm, gn * bn, dtype=torch.float32)
    pad[:m, :n] = w.float()
    amax = pad.view(gm, bm, gn, bn).abs().amax(dim=(1, 3))
    sb = _e8m0_for(amax, 448.0)
    s = e8m0_to_float32(sb).repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:m, :n]
    q = (w.float() / s).to(torch.float8_e4m3fn)
    return q, sb.view(torch.float8_e8m0fnu)
