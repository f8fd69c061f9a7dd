"""Bit-exact float32 building blocks shared by the GGML block quantizers.

Every helper mirrors one C idiom of llama.cpp's ``ggml/src/ggml-quants.c`` so that the torch code
produces the same float32 values, operation by operation:

* :func:`div` -- C's ``/`` on float32, never rewritten as a multiplication by a reciprocal.
* :func:`seqsum` -- a C ``for`` loop accumulator (``s += a[i]``), summed strictly in index order.
  ``torch.sum`` uses vectorised / cascade orders that change the last bit, so it is not used for
  any sum that feeds a decision.
* :func:`nearest_int` -- ``nearest_int()`` (the ``fval + 12582912.f`` trick): round half to even
  for ``|x| < 2**22``, which is what ``torch.round`` does.
* :func:`roundf` -- C ``roundf`` (half away from zero), used by ``quantize_row_q8_0_ref``.
* :func:`fp16_round` -- ``GGML_FP32_TO_FP16`` then ``GGML_FP16_TO_FP32``: round to nearest even.
* :func:`sqrtf` -- C ``sqrtf`` (correctly rounded). ``torch.sqrt`` on float32 CPU tensors is not: in
  torch 2.13 on an AMD EPYC it is off by one ulp for ~17 % of inputs, with every ``ATEN_CPU_CAPABILITY``,
  which is what made Q4_K/Q5_K blocks differ from llama.cpp on some machines. The square root is taken
  in float64 and rounded once to float32; that is exact because 53 >= 2 * 24 + 2 (double rounding
  cannot occur for a square root).

Tensors are laid out "element-major": a sub-block of ``n`` values is a column of an ``(n, M)``
tensor, so a loop over the ``n`` elements works on contiguous ``(M,)`` rows, vectorised over all
``M`` sub-blocks at once.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml-quants.c GROUP_MAX_EPS (1e-15f)


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (what a C ``float`` literal/constant holds)."""
    return float(np.float32(v))


def div(a, b) -> torch.Tensor:
    """IEEE float32 ``a / b`` (C's ``/``), with either side a Python number.

    torch turns ``number / tensor`` into ``tensor.reciprocal() * number`` and, on CUDA,
    ``tensor / number`` into ``tensor * (1/number)``; both can change the last bit. Here numbers
    become full tensors on the other operand's device, so the division is a true division.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a, dtype=torch.float32)
    elif not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b, dtype=torch.float32)
    return torch.div(a, b)


def seqsum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sum ``t`` over ``dim`` strictly in index order: ``((t0 + t1) + t2) + ...``."""
    parts = t.unbind(dim)  # one call for all the views (a select per step costs as much as the add)
    if len(parts) == 1:
        return parts[0].clone()
    s = parts[0] + parts[1]
    for p in parts[2:]:
        s.add_(p)
    return s


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C ``sqrtf`` on float32: the correctly rounded square root, on every CPU (see the module notes)."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml ``nearest_int``: round half to even, result kept as float32 integers."""
    return torch.round(v)


def nearest_int_c(v: torch.Tensor) -> torch.Tensor:
    """:func:`nearest_int` that also follows C's float trick on non-finite input: ``+-inf`` and NaN give
    ``-4194304`` (the mantissa of ``inf + 12582912.f`` is 0), e.g. ``nearest_int(1/d * scale)`` with a subnormal
    ``d``. Float32 integers out."""
    return torch.where(torch.isfinite(v), torch.round(v), torch.full_like(v, -4194304.0))


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: round half away from zero (float32 in, float32 integers out)."""
    t = torch.trunc(v)
    # the fraction v - t is exact, and |2*frac| >= 1 iff |frac| >= 0.5, so trunc(2*frac) is the +-1 to add
    # (0 otherwise); for +-inf the fraction is NaN, made 0 so that inf stays inf
    return (v - t).nan_to_num_(0.0).mul_(2).trunc_().add_(t)


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 (RNE, like ``GGML_FP32_TO_FP16``) -> float32."""
    return v.to(torch.float16).to(torch.float32)


def fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """``(M,)`` float32 -> ``(M, 2)`` uint8, little-endian fp16 (RNE)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def bytes_fp16(b: torch.Tensor) -> torch.Tensor:
    """``(M, 2)`` uint8 -> ``(M,)`` float32 via fp16 (``GGML_FP16_TO_FP32``)."""
    return b.contiguous().view(torch.float16).view(-1).to(torch.float32)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over dim 0 of ``(n, M)``: (signed value with the largest ``|x|``, that ``|x|``).

    Mirrors ``float amax = 0, max = 0; if (ax > amax) { amax = ax; max = x[i]; }``: the first index
    wins ties (a loop over the n rows; torch's argmax over a strided dim is much slower).
    """
    ax = x.abs()
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        upd = ax[i] > amax
        amax = torch.where(upd, ax[i], amax)
        mx = torch.where(upd, x[i], mx)
    return mx, amax


def pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``lo | hi << 4`` as uint8 (inputs: small non-negative integer tensors of any dtype)."""
    return (lo.to(torch.uint8) & 0x0F) | ((hi.to(torch.uint8) & 0x0F) << 4)


def bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """``(..., 8*k)`` 0/1 tensor -> ``(..., k)`` uint8, bit ``i`` of the stream at bit ``i % 8`` of byte ``i // 8``."""
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return _or_reduce(b << shifts)


def _or_reduce(b: torch.Tensor) -> torch.Tensor:
    out = b[..., 0].clone()
    for i in range(1, b.shape[-1]):
        out |= b[..., i]
    return out


def bytes_to_bits(by: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of :func:`bits_to_bytes`: ``(..., k)`` uint8 -> ``(..., nbits)`` uint8 of 0/1."""
    shifts = torch.arange(8, device=by.device, dtype=torch.uint8)
    return ((by[..., None] >> shifts) & 1).reshape(*by.shape[:-1], -1)[..., :nbits]


_FLT_MAX = float(np.finfo(np.float32).max)
#: candidate pairs per step of :func:`nearest_listed` (bounds its temporaries)
_PAIRS_PER_STEP = 1 << 16


def nearest_listed(key: torch.Tensor, neigh: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                   s: torch.Tensor, qt: torch.Tensor, qoff: torch.Tensor | None = None) -> torch.Tensor:
    """The listed grid neighbour nearest to each of ``m`` groups of ``n`` values, as llama.cpp's
    ``iq2_find_best_neighbour`` / ``iq3_find_best_neighbour`` / ``iq1_find_best_neighbour2`` pick it: over the
    key's neighbour list, in list order, the first with the smallest float32
    ``d2 = 0; for i: { diff = scale*q[i] - x[i]; d2 += w[i]*diff*diff; }`` below ``FLT_MAX`` (the first listed
    one when none is).

    Args:
        key: ``(m,)`` int64 row of each group in ``neigh``.
        neigh: ``(K, P)`` int64 neighbour lists (grid indices in list order, ``-1`` padded); counts: ``(K,)``
            int64 their lengths.
        x, w: ``(m, n)`` float32 values and weights; s: ``(m,)`` float32 scales.
        qt: ``(n, V)`` float32 values ``q[i]`` of each grid point (columns), ``V`` a multiple of the grid size
            when ``qoff`` ``(m,)`` int64 selects a copy of the grid per group (IQ1's two shifts).

    Returns ``(m,)`` int64 grid indices (without ``qoff``).

    The groups are taken in order of list length, so each step works on a dense ``(groups, width)`` block
    padded to its longest list only, with the float32 arithmetic and the element order of the C loop.
    Source: llama.cpp ``ggml/src/ggml-quants.c``.
    """
    m, n = x.shape
    dev = x.device
    cnt = counts[key]
    order = torch.argsort(cnt)
    cs = cnt[order].tolist()
    out = torch.empty(m, dtype=torch.int64, device=dev)
    a = 0
    while a < m:
        # widths only grow along `order`: the width at the far end of a step of budget/width(a) bounds the step's
        far = cs[min(m, a + _PAIRS_PER_STEP // max(1, cs[a])) - 1]
        b = min(m, a + max(64, _PAIRS_PER_STEP // max(1, far)))
        width = max(1, cs[b - 1])
        g = order[a:b]
        cand = neigh[:, :width].index_select(0, key[g])                    # (mb, width)
        cc = cand.clamp(min=0)
        if qoff is not None:
            cc = cc + qoff[g, None]
        sg = s[g, None]
        xg, wg = x.index_select(0, g).t().contiguous(), w.index_select(0, g).t().contiguous()
        d2 = None
        for i in range(n):
            diff = sg * torch.take(qt[i], cc) - xg[i, :, None]
            t = wg[i, :, None] * diff * diff
            d2 = t if d2 is None else d2.add_(t)
        d2 = torch.where((cand >= 0) & (d2 < _FLT_MAX), d2, torch.full_like(d2, float("inf")))
        out[g] = cand.gather(1, d2.argmin(1, keepdim=True))[:, 0]       # argmin: the first smallest
        a = b
    return out
