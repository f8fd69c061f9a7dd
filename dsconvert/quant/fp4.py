"""FP4 (e2m1) weights with NVFP4 and MXFP4 scales, exactly as compressed-tensors computes and packs them.

Rules (docs/int-formats.md §12). Weights are ``[M, N]`` (M = out_features, N = in_features); a group is
``g`` consecutive input channels of one row (``g = 16`` for NVFP4, ``32`` for MXFP4).

* **e2m1 grid:** codes 0..7 are ``0, 0.5, 1, 1.5, 2, 3, 4, 6``; bit 3 is the sign. Encoding clamps to
  ``[-6, 6]`` and rounds to the nearest grid value, ties to the even code (``0.25 -> 0``, ``0.75 -> 1``,
  ``1.25 -> 1``, ``1.75 -> 2``, ``2.5 -> 2``, ``3.5 -> 4``, ``5 -> 4``). The sign bit is set for every
  strictly negative input, including those that round to zero; ``-0.0`` gets code 0.
* **packing:** two codes per ``uint8``, the even column in the low nibble, the odd one in the high nibble:
  ``packed[i, j] = code[i, 2j] | code[i, 2j + 1] << 4``, shape ``[M, N/2]``.
* **NVFP4** (``nvfp4-pack-quantized``): a float32 global scale per tensor
  ``gs = float32(dtype(448 * 6 / amax))`` where ``amax`` is the absmax of the tensor (of its whole fused
  group: ``q_a_proj`` + ``kv_a_proj_with_mqa``, ``gate_proj`` + ``up_proj``) and the division is done in the
  weight dtype; per group ``s = e4m3(float32(gs) * dtype(absmax_group / 6))`` (0 becomes 0.125);
  ``q = e2m1(float32(w) / (s / gs))``; the loader computes ``w' = dtype(e2m1(q) * (s / gs))``.
* **MXFP4** (``mxfp4-pack-quantized``, OCP MX v1.0 with compressed-tensors' rounding of the exponent): per
  group an e8m0 exponent byte ``e = clamp(127 + floor(log2(p)) - 2, 0, 255)`` where ``p`` is the group absmax
  rounded to a power of two (``1.75 * 2**k`` and above go to ``2**(k+1)``, below that to ``2**k``: the
  group max then lands on e2m1's top binade [4, 6], or at 7 and above clamps to 6);
  ``q = e2m1(w / 2**(e - 127))``; the loader computes ``w' = dtype(e2m1(q) * 2**(e - 127))``.

"dtype" is the dtype of the weight handed in (bfloat16 for DeepSeek, which is what llm-compressor observes
when it loads the BF16 checkpoint); every intermediate rounding happens where the library rounds, so the
bytes are identical. Sources: compressed-tensors 0.20.1 ``quantization/utils/helpers.py``
(``calculate_qparams``, ``generate_gparam``), ``quantization/utils/{fp4,mxfp}_utils.py``,
``quantization/lifecycle/forward_helpers.py``, ``compressors/{nvfp4,mxfp4}/``; llm-compressor
``observers/{base,min_max,helpers}.py`` (group min/max, fused global scale). Verified byte for byte against
the installed library in tests/quant/test_fp4.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dsconvert.errors import ShapeError

__all__ = [
    "E2M1_VALUES",
    "FP8_E4M3_MAX",
    "E2M1_MAX",
    "NVFP4_GROUP",
    "MXFP4_GROUP",
    "e2m1_encode",
    "e2m1_decode",
    "pack_fp4",
    "unpack_fp4",
    "FP4Tensor",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "nvfp4_dequantize",
    "mxfp4_exponents",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "group_absmax",
]

#: e2m1 magnitudes by code (bit 3 = sign). Source: OCP Microscaling Formats v1.0 §5.3.3.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
_MX_ELEM_OFFSET = 2  # floor(log2(6)): maps the group max into e2m1's top binade
# Round-half-even boundaries: below these a tie goes down (to the even code below) ...
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
# ... and at these a tie goes up (the code above is even).
_TIE_UP = (0.75, 1.75, 3.5)
_NVFP4_ZERO_SCALE = 0.125  # compressed-tensors' replacement for a zero e4m3 scale (its "eps" of e4m3)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Codes (``uint8`` 0..15) of ``x`` rounded to e2m1: clamp to ``[-6, 6]``, nearest, ties to even code.

    Args:
        x: any shape, floating dtype. Compared in its own dtype (every boundary is exact in bf16/fp16/fp32).

    Returns:
        ``uint8`` codes, same shape; bit 3 is set where ``x < 0`` (so ``-0.1 -> 8``, ``-0.0 -> 0``).
        NaN has no e2m1 code; what it maps to is unspecified (the scheme layer refuses non-finite weights).
    """
    a = x.abs()
    lo = torch.tensor(_TIE_DOWN, dtype=a.dtype, device=a.device)
    hi = torch.tensor(_TIE_UP, dtype=a.dtype, device=a.device)
    # count of boundaries strictly below a (ties down) + count of boundaries <= a (ties up) = code 0..7
    code = torch.bucketize(a, lo, out_int32=True, right=False)
    code += torch.bucketize(a, hi, out_int32=True, right=True)
    code = code.to(torch.uint8)
    code |= (x < 0).to(torch.uint8) << 3
    return code


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of e2m1 ``codes`` (``uint8`` 0..15, bit 3 = sign; code 8 is ``-0.0``), as ``dtype``."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=codes.device)
    return table[(codes & 0xF).long()].to(dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``[M, N]`` codes -> ``[M, N/2]`` ``uint8``: column 2j in the low nibble, 2j+1 in the high nibble.

    Source: compressed-tensors ``compressors/nvfp4/helpers.py::pack_fp4_to_uint8``.

    Raises:
        ShapeError: ``codes`` is not 2-D or N is odd.
    """
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ShapeError(f"FP4 packing needs a 2-D tensor with an even number of columns, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: ``[M, N/2]`` ``uint8`` -> ``[M, N]`` codes."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ShapeError(f"FP4 unpacking needs a 2-D uint8 tensor, got {tuple(packed.shape)} {packed.dtype}")
    m, h = packed.shape
    out = torch.empty((m, 2 * h), dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out


class FP4Tensor(NamedTuple):
    """A quantized FP4 weight as it is stored.

    Attributes:
        packed: ``uint8 [M, N/2]`` (:func:`pack_fp4`).
        scale: NVFP4: ``float8_e4m3fn [M, N/16]``; MXFP4: ``uint8 [M, N/32]`` e8m0 exponents (bias 127).
        global_scale: NVFP4: ``float32 [1]``; MXFP4: None.
        dtype: the weight dtype the scales were computed in and the loader dequantizes to.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.packed.shape[0]), int(self.packed.shape[1]) * 2


def _groups(w: torch.Tensor, g: int, name: str | None) -> torch.Tensor:
    if w.dim() != 2:
        raise ShapeError(f"tensor {name or '?'!r}: FP4 quantization needs a 2-D [out, in] weight, got {tuple(w.shape)}")
    m, n = w.shape
    if n % g:
        raise ShapeError(f"tensor {name or '?'!r}: in_features N={n} is not a multiple of the FP4 group size {g}",
                         remedy="keep-module")
    return w.unflatten(-1, (n // g, g))  # (M, N/g, g)


def group_absmax(w: torch.Tensor, group_size: int, name: str | None = None) -> torch.Tensor:
    """``max(|min(group, 0)|, max(group, 0))`` per group of ``w`` ``[M, N]``, ``[M, N/g]`` in ``w``'s dtype.

    The observer's statistic (llm-compressor ``observers/min_max.py``: amin/amax per group, then
    compressed-tensors extends the range to include 0).

    Raises:
        ShapeError: not 2-D, or ``group_size`` does not divide N.
    """
    grp = _groups(w, group_size, name)
    mn = torch.amin(grp, dim=-1).clamp(max=0)
    mx = torch.amax(grp, dim=-1).clamp(min=0)
    return torch.maximum(mn.abs(), mx)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``float32 [1]`` global scale ``448 * 6 / amax``, divided in ``amax``'s dtype as compressed-tensors does.

    Args:
        amax: 0-dim or ``[1]`` absmax of the tensor (or of its fused group), in the weight dtype.

    Returns:
        ``float32 [1]``; 1.0 where the quotient is not finite (an all-zero tensor).
        Source: compressed-tensors ``generate_gparam``.
    """
    a = amax.reshape(1)
    a = torch.clamp(a, min=torch.finfo(a.dtype).tiny)
    gs = FP8_E4M3_MAX * E2M1_MAX / a
    gs = torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)
    return gs.to(torch.float32)


def nvfp4_quantize(w: torch.Tensor, global_amax: torch.Tensor | None = None,
                   name: str | None = None) -> FP4Tensor:
    """NVFP4-quantize ``w`` ``[M, N]``: e4m3 scale per 16 inputs, float32 global scale, e2m1 codes.

    Args:
        w: ``[M, N]`` weight, N % 16 == 0; bfloat16 for DeepSeek (its dtype is the computation dtype).
        global_amax: absmax over the fused group this tensor belongs to (same dtype as ``w``); None = this
            tensor's own absmax. vLLM loads fused groups with one global scale, so llm-compressor shares it.
        name: tensor name for error messages.

    Returns:
        :class:`FP4Tensor` with ``packed uint8 [M, N/2]``, ``scale float8_e4m3fn [M, N/16]``,
        ``global_scale float32 [1]``.

    Raises:
        ShapeError: not 2-D or N % 16 != 0.
    """
    amax_g = group_absmax(w, NVFP4_GROUP, name)  # (M, N/16), w.dtype
    if global_amax is None:
        global_amax = amax_g.max() if amax_g.numel() else torch.zeros((), dtype=w.dtype)
    gs = nvfp4_global_scale(global_amax.to(w.dtype))
    six = torch.tensor(E2M1_MAX, dtype=w.dtype)
    s = gs * (amax_g / six)  # float32 (M, N/16): float32 [1] * w.dtype group scale
    s = torch.clamp(s, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    s = torch.where(s == 0, torch.tensor(_NVFP4_ZERO_SCALE), s)
    eff = s / gs  # float32 (M, N/16): the multiplier the loader applies
    scaled = _groups(w, NVFP4_GROUP, name) / eff.unsqueeze(-1)  # float32 (M, N/16, 16)
    scaled = torch.clamp(scaled, -E2M1_MAX, E2M1_MAX)
    codes = e2m1_encode(scaled).flatten(-2)  # (M, N)
    return FP4Tensor(pack_fp4(codes), s.to(torch.float8_e4m3fn), gs, w.dtype)


def nvfp4_dequantize(t: FP4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dtype(e2m1(q) * float32(scale / global_scale))`` ``[M, N]``, as compressed-tensors decompresses."""
    dtype = dtype or t.dtype
    vals = e2m1_decode(unpack_fp4(t.packed))  # (M, N) float32, exact
    eff = t.scale.to(torch.float32) / t.global_scale.to(torch.float32)  # (M, N/16)
    out = vals.unflatten(-1, (-1, NVFP4_GROUP)) * eff.unsqueeze(-1)
    return out.flatten(-2).to(dtype)


def _round_to_power_2(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to a power of two: add a quarter of the mantissa range, drop the mantissa (1.75 rounds up).

    Source: compressed-tensors ``quantization/utils/mxfp_utils.py::round_to_power_2`` (elem_mantissa = 1).
    """
    info = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
            torch.float32: (torch.int32, 23, 8)}
    if x.dtype not in info:
        raise TypeError(f"MXFP4 scales need a bf16/fp16/fp32 weight, got {x.dtype}")
    ity, mant, expo = info[x.dtype]
    bits = x.view(ity).to(torch.int32) if ity == torch.int16 else x.view(torch.int32)
    if ity == torch.int16:
        bits = bits & 0xFFFF
    add = 1 << (mant - 1 - 1)
    mask = ((1 << expo) - 1) << mant  # the exponent field; the sign is 0 (amax >= 0)
    r = (bits + add) & mask
    return r.to(torch.int16).view(x.dtype) if ity == torch.int16 else r.view(x.dtype)


def mxfp4_exponents(amax: torch.Tensor) -> torch.Tensor:
    """e8m0 exponent bytes ``uint8`` for group absmaxes ``amax`` (any shape, the weight dtype).

    ``e = clamp(127 + floor(log2(round_to_power_2(amax))) - 2, 0, 255)``; an all-zero group gets 0.
    Source: compressed-tensors ``generate_mx_scales`` + ``calculate_qparams``.
    """
    p = _round_to_power_2(amax)
    e = 127 + torch.floor(torch.log2(p)) - _MX_ELEM_OFFSET  # amax's dtype; -inf for 0
    return torch.round(torch.clamp(e, 0, 255)).to(torch.uint8)


def _mx_multiplier(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # 2 ** (e - 127) in float32 (exact; 2**-127 is a float32 subnormal), then the weight dtype as the library stores it
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32) - 127).to(dtype)


def mxfp4_quantize(w: torch.Tensor, name: str | None = None) -> FP4Tensor:
    """MXFP4-quantize ``w`` ``[M, N]``: an e8m0 exponent per 32 inputs, e2m1 codes.

    Args:
        w: ``[M, N]`` weight, N % 32 == 0 (bf16 for DeepSeek).
        name: tensor name for error messages.

    Returns:
        :class:`FP4Tensor` with ``packed uint8 [M, N/2]``, ``scale uint8 [M, N/32]``, ``global_scale`` None.

    Raises:
        ShapeError: not 2-D or N % 32 != 0.
    """
    e = mxfp4_exponents(group_absmax(w, MXFP4_GROUP, name))  # (M, N/32)
    mult = _mx_multiplier(e, w.dtype)
    scaled = _groups(w, MXFP4_GROUP, name) / mult.unsqueeze(-1)  # w.dtype, exact (division by 2**k)
    scaled = torch.clamp(scaled, -E2M1_MAX, E2M1_MAX)
    codes = e2m1_encode(scaled).flatten(-2)
    return FP4Tensor(pack_fp4(codes), e, None, w.dtype)


def mxfp4_dequantize(t: FP4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dtype(e2m1(q) * 2**(e - 127))`` ``[M, N]``, as compressed-tensors decompresses (exact in bf16)."""
    dtype = dtype or t.dtype
    vals = e2m1_decode(unpack_fp4(t.packed))  # (M, N) float32
    mult = _mx_multiplier(t.scale, torch.float32)  # (M, N/32)
    out = vals.unflatten(-1, (-1, MXFP4_GROUP)) * mult.unsqueeze(-1)
    return out.flatten(-2).to(dtype)
