"""K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each class follows llama.cpp's ``ggml-quants.c`` reference quantizer step by step, in float32,
vectorised over every sub-block of a chunk at once; loops only run over the fixed search steps
and (for sums) over the 16/32 elements of a sub-block, in C order:

=====  ==========================  =====================================================
type   C reference                 sub-block fit
=====  ==========================  =====================================================
Q2_K   ``quantize_row_q2_K_ref``   ``make_qkx2_quants(16, 3, w=|x|, -0.5, 0.1, 15, mad)``
Q3_K   ``quantize_row_q3_K_ref``   ``make_q3_quants(16, 4, do_rmse=true)``
Q4_K   ``quantize_row_q4_K_ref``   ``make_qkx2_quants(32, 15, w=av_x+|x|, -1, 0.1, 20)``
Q5_K   ``quantize_row_q5_K_ref``   ``make_qkx2_quants(32, 31, w=av_x+|x|, -0.5, 0.1, 15)``
Q6_K   ``quantize_row_q6_K_ref``   ``make_qx_quants(16, 32, rmse_type=1, NULL)``
=====  ==========================  =====================================================

Exactness: every float32 operation is the C one in the C order (products ``w*l*x`` as
``(w*l)*x``, sums accumulated sequentially, true division where C divides, ``nearest_int`` =
round half to even, fp16 conversions RNE), so on CPU the bytes are expected to equal
``ggml_quantize_chunk(..., imatrix=NULL)``; the tests measure the share of differing blocks.

Block layouts (``ggml-common.h``; d/dmin are fp16)::

    Q2_K  scales[16] (lo: scale, hi: min) | qs[64] | d | dmin                       84 B
    Q3_K  hmask[32] | qs[64] | scales[12] (16 x 6-bit, -32 offset) | d              110 B
    Q4_K  d | dmin | scales[12] (8 scales + 8 mins, 6-bit) | qs[128]               144 B
    Q5_K  d | dmin | scales[12] | qh[32] | qs[128]                                  176 B
    Q6_K  ql[128] | qh[64] | scales[16] int8 | d                                    210 B
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ._ops import GROUP_MAX_EPS, bytes_fp16, div, first_absmax, fp16_bytes, fp16_round, nearest_int, seqsum, sqrtf
from .base import GGMLType

QK_K = 256


def _c(v: float) -> float:
    return float(np.float32(v))


def _sub_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``(nb, 256)`` -> element-major ``(n, nb*256/n)``: column ``m = b*(256/n) + j`` is sub-block j of block b."""
    return blocks.reshape(-1, n).t().contiguous()


def _from_sub_blocks(t: torch.Tensor, nb: int) -> torch.Tensor:
    """Inverse of :func:`_sub_blocks`."""
    return t.t().reshape(nb, QK_K)


# ---- sub-block fits (ggml-quants.c static helpers) ----------------------------------------------

def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``: asymmetric (scale, min) fit of each column of ``x`` (``(n, M)`` float32).

    ``w`` are the per-element weights, same shape. Returns ``(scale (M,), the_min (M,), L (n, M))``,
    where ``x ~ scale*L - the_min`` and ``L`` holds integers in ``[0, nmax]`` (float32).

    As in C, ``min`` is updated inside the search whenever a step improves the error, and later
    steps use the updated ``min`` both in ``iscale*(x - min)`` and in ``(max - min)``; the search is
    therefore sequential over its ``nstep + 1`` steps (vectorised over the columns).
    """
    n, M = x.shape

    def err_(d: torch.Tensor) -> torch.Tensor:  # sum of w*|d| or w*d*d; consumes d
        (d.abs_() if use_mad else d.mul_(d)).mul_(w)
        return seqsum(d)

    mn = x.amin(0)
    is0 = x == 0
    if bool(is0.any()):  # C's ``if (x[i] < min)`` scan keeps the sign of the first zero it meets
        first0 = x.gather(0, is0.to(torch.uint8).argmax(0, keepdim=True))[0]
        mn = torch.where(mn == 0, first0, mn)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    mx = x.amax(0)
    flat = mx == mn
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    # Preallocated work buffers: fresh (n, M) allocations per step cost more than the arithmetic.
    la = torch.empty_like(x)
    dbuf = torch.empty_like(x)
    buf = torch.empty((3, n, M), dtype=x.dtype, device=x.device)

    def levels(iscale, mn_used):  # nearest_int(iscale*(x[i] - min)) clamped to [0, nmax], into la
        return torch.sub(x, mn_used, out=la).mul_(iscale).round_().clamp_(0, nmax)

    iscale = div(nmax, mx - mn)
    scale = div(1, iscale)
    levels(iscale, mn)
    best = err_(torch.mul(la, scale, out=dbuf).add_(mn).sub_(x))
    # L is not copied at every improvement: the (iscale, min) that produced the best levels are
    # kept and the levels recomputed once at the end (same float ops, same result). The search state
    # (best iscale, the min it used, best error, scale, min) is one (5, M) tensor: one where per step.
    state = torch.stack([iscale, mn, best, scale, mn])
    live = ~flat
    for step in range(nstep + 1):
        mn = state[4]
        num = _c(_c(_c(rmin) + _c(_c(rdelta) * step)) + nmax)
        iscale = div(num, mx - mn)
        levels(iscale, mn)
        torch.mul(w, la, out=buf[0])          # w*l
        torch.mul(buf[0], la, out=buf[1])     # w*l*l
        torch.mul(buf[0], x, out=buf[2])      # w*l*x
        sum_l, sum_l2, sum_xl = seqsum(buf, 1)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min.masked_fill_(pos, 0.0)
        this_scale = torch.where(pos, div(sum_xl, sum_l2), this_scale)
        cur = err_(torch.mul(la, this_scale, out=dbuf).add_(this_min).sub_(x))
        upd = (D > 0).logical_and_(cur < state[2]).logical_and_(live)
        state = torch.where(upd, torch.stack([iscale, mn, cur, this_scale, this_min]), state)
    best_iscale, best_mn_used, _, scale, mn = state.unbind(0)
    L = levels(best_iscale, best_mn_used)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale fit of each column of ``x``.

    ``w`` is ``x*x`` (``qw == NULL``) or the importance weights. Returns ``(scale (M,), L (n, M))``
    with ``L`` in ``[0, 2*nmax - 1]`` (``l + nmax``); all-zero columns (``amax < 1e-15``) give 0, 0.
    The 18 trial scales ``-(nmax + 0.1*is)/max`` are tried in C order; a trial is kept when
    ``sumlx^2 > best*suml2``, and the levels of the kept trial are recomputed once at the end.
    """
    n, M = x.shape
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    wx = w * x
    lbuf = torch.empty_like(x)
    buf = torch.empty((2, n, M), dtype=x.dtype, device=x.device)

    def fit(num):
        iscale = div(num, mx)
        torch.mul(x, iscale, out=lbuf).round_().clamp_(-nmax, nmax - 1)  # nearest_int(iscale*x[i])
        torch.mul(wx, lbuf, out=buf[0])                                   # w*x[i]*l
        torch.mul(w, lbuf, out=buf[1]).mul_(lbuf)                         # w*l*l
        sumlx, suml2 = seqsum(buf, 1)
        return iscale, sumlx, suml2

    best_iscale, sumlx, suml2 = fit(-nmax)
    scale = torch.where(suml2 != 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale, slx, sl2 = fit(-_c(nmax + _c(_c(0.1) * step)))
        upd = (sl2 > 0) & (slx * slx > best * sl2)
        best_iscale = torch.where(upd, iscale, best_iscale)
        scale = torch.where(upd, div(slx, sl2), scale)
        best = torch.where(upd, scale * slx, best)
    L = torch.mul(x, best_iscale, out=lbuf).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on each column of ``x`` (``(n, M)``).

    Weighted (``w = x*x``) least squares with 5 rounds of per-element coordinate descent, each
    element in C order. Returns ``(scale (M,), L (n, M))`` with ``L`` in ``[0, 2*nmax - 1]``.
    """
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = div(-nmax, mx)
    L = nearest_int(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seqsum(wx * L)
    suml2 = seqsum(w * L * L)
    # A round that changes nothing leaves the state unchanged, so running all 5 rounds for every
    # column is the same as C's early ``break``.
    for _ in range(5):
        for i in range(x.shape[0]):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            new_l = nearest_int(div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1)
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + w[i] * new_l * new_l
            upd = (slx > 0) & (new_l != Li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(upd, new_l, Li)
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: weighted fit of (mostly) non-negative values to
    ``scale * L`` with ``L`` in ``[0, nmax]``.

    ``x`` and ``w`` are ``(n, M)`` float32 (a column is one fit: the sub-block scales or mins of a K-quant
    super-block, the magnitudes of an IQ2 32-block). Returns ``(scale (M,), L (n, M))``, ``L`` as the float32 values
    of C's ``uint8_t`` array. Steps, in C order: ``iscale = nmax/max``; the 8 trial scales
    ``(0.1*is + nmax)/max`` kept on a lower weighted MSE; then 5 rounds of per-element coordinate descent
    (sequential over the ``n`` elements); columns with ``max < 1e-15`` give 0, 0.

    C stores the levels in ``uint8_t``: a negative level (a negative input, as IQ2's sign trick produces) wraps
    modulo 256 wherever it is read back from ``L`` (the first error sum, the descent), while the sums over local
    ``int`` levels do not wrap; this function does the same.
    Source: ggml-quants.c ``make_qp_quants`` (used by the imatrix paths of Q2_K, Q4_K, Q5_K and by IQ2/IQ1).
    """
    n, M = x.shape
    mx = x.amax(0)
    mx = torch.where(mx > 0, mx, torch.zeros_like(mx))
    zero = mx < GROUP_MAX_EPS

    def wrap(l):  # int -> uint8_t -> int
        return torch.remainder(l, 256)

    def sq_err(l, scale):
        diff = x - scale * l
        return seqsum(w * diff * diff)

    iscale = div(nmax, mx)
    best = sq_err(wrap(nearest_int(x * iscale)), div(1, iscale))
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = div(_c(_c(_c(0.1) * step) + nmax), mx)
        cur = sq_err(nearest_int(x * isc).clamp_(max=nmax), div(1, isc))
        upd = cur < best
        best = torch.where(upd, cur, best)
        iscale = torch.where(upd, isc, iscale)
    lv = nearest_int(x * iscale).clamp_(max=nmax)
    wx = w * x
    sumlx = seqsum(wx * lv)
    suml2 = seqsum(w * lv * lv)
    L = wrap(lv)
    for _ in range(5):  # a round that changes nothing leaves the state as it is (C's early break)
        for i in range(n):
            Li = L[i]
            slx = sumlx - wx[i] * Li
            sl2 = suml2 - w[i] * Li * Li
            new_l = nearest_int(div(x[i] * sl2, slx)).clamp_(max=nmax)
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + w[i] * new_l * new_l
            upd = (slx > 0) & (sl2 > 0) & (new_l != Li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(upd, wrap(new_l), Li)
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    scale = torch.where(suml2 > 0, div(sumlx, suml2), torch.zeros_like(sumlx))
    L = torch.where(zero, torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _imatrix_weights(blocks: torch.Tensor, qw: torch.Tensor, n: int,
                     sigma_factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K-quant ``_impl`` element weights ``qw * sqrtf(sigma2 + x*x)`` in sub-block layout ``(n, M)``,
    with ``sigma2 = sigma_factor * sum(x^2) / 256`` of each super-block (summed in C order).

    Returns ``(x (n, M), weights (n, M), sw (nb, 256/n))``: the sub-block values, their weights and the
    weight sum of each sub-block."""
    nb = blocks.shape[0]
    bt = blocks.t()
    sigma2 = div(seqsum(bt * bt) * sigma_factor, QK_K)            # (nb,)
    xt = _sub_blocks(blocks, n)
    sig = sigma2.repeat_interleave(QK_K // n).view(1, -1)
    wt = _sub_blocks(qw, n) * sqrtf(sig + xt * xt)
    return xt, wt, seqsum(wt).view(nb, QK_K // n)


# ---- packing helpers ---------------------------------------------------------------------------

def _max0(t: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (j) if (t[j] > m) m = t[j];`` over dim 1 (a +0.0 start, never -0.0)."""
    m = t.amax(1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _u8(t: torch.Tensor) -> torch.Tensor:
    """Float32 integers -> uint8 with C's modulo-256 conversion."""
    return (t.to(torch.int32) & 0xFF).to(torch.uint8)


def _or_shifted(parts: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """OR together ``parts.select(dim, k) << (bits*k)`` (uint8)."""
    out = torch.zeros_like(parts.select(dim, 0))
    for k in range(parts.shape[dim]):
        out |= parts.select(dim, k) << (bits * k)
    return out


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K ``qs``: ``qs[j/4 + l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6`` for j in {0, 128}."""
    nb = L.shape[0]
    return _or_shifted(L.to(torch.uint8).view(nb, 2, 4, 32), 2, 2).view(nb, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    nb = qs.shape[0]
    sh = torch.arange(0, 8, 2, device=qs.device, dtype=torch.uint8).view(1, 1, 4, 1)
    return ((qs.view(nb, 2, 1, 32) >> sh) & 3).view(nb, QK_K)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K ``scales[12]`` from 8 six-bit scales and 8 six-bit mins (uint8 ``(nb, 8)`` each)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _unpack_k4_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7: ``(nb, 12)`` uint8 -> (scales, mins) ``(nb, 8)`` uint8."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    s = torch.cat([d & 63, (md & 0xF) | ((d >> 6) << 4)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return s, mn


def _requant_asym(blocks: torch.Tensor, L0: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor,
                  sc: torch.Tensor, mn: torch.Tensor, n: int, nmax: int) -> torch.Tensor:
    """Final pass of Q2_K/Q4_K/Q5_K: ``l = clamp(nearest_int((x + dm)/d), 0, nmax)`` where
    ``d = fp16(d)*sc != 0``; sub-blocks with ``d == 0`` keep the fit's ``L0`` (C's ``continue``)."""
    nb = blocks.shape[0]
    dj = (d[:, None] * sc.to(torch.float32)).unsqueeze(-1)
    dm = (dmin[:, None] * mn.to(torch.float32)).unsqueeze(-1)
    xb = blocks.view(nb, -1, n)
    l = nearest_int(div(xb + dm, dj)).clamp_(0, nmax)
    return torch.where(dj != 0, l, L0.view(nb, -1, n)).view(nb, QK_K)


# ---- types -------------------------------------------------------------------------------------

class _KQuant(GGMLType):
    chunk_elems = 1 << 18


class Q2_K(_KQuant, qtype=T.Q2_K):
    """``quantize_row_q2_K_ref``: 16 sub-blocks of 16, 2-bit quants, 4-bit scales and mins."""

    supports_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        nb = blocks.shape[0]
        if qw is not None:
            return cls._quantize_imatrix(blocks, qw)
        xt = _sub_blocks(blocks, 16)
        scales, mins, L = make_qkx2_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        L = _from_sub_blocks(L, nb)
        max_scale = _max0(scales)
        max_min = _max0(mins)
        q4 = _c(15.0)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = torch.where(has_s[:, None], nearest_int(div(q4, max_scale)[:, None] * scales), torch.zeros_like(scales))
        lm = torch.where(has_m[:, None], nearest_int(div(q4, max_min)[:, None] * mins), torch.zeros_like(mins))
        sc = _u8(ls) | _u8(lm * 16)
        d = fp16_round(torch.where(has_s, div(max_scale, q4), torch.zeros_like(max_scale)))
        dmin = fp16_round(torch.where(has_m, div(max_min, q4), torch.zeros_like(max_min)))
        L = _requant_asym(blocks, L, d, dmin, sc & 0xF, sc >> 4, 16, 3)
        return torch.cat([sc, _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], dim=1)

    @classmethod
    def _quantize_imatrix(cls, blocks, qw):
        """``quantize_row_q2_K_impl``: ``make_qkx3_quants(16, 3, w=qw*sqrt(sigma2 + x^2), -0.9, 0.05, 36)``
        per sub-block (``sigma2 = sum(x^2)/256``), then ``make_qp_quants(16, 15, ., sw)`` for scales and mins."""
        nb = blocks.shape[0]
        xt, wt, sw = _imatrix_weights(blocks, qw, 16, 1)
        scales, mins, L = make_qkx2_quants(xt, wt, 3, -0.9, 0.05, 36, False)
        swt = sw.t().contiguous()
        dm, ls = make_qp_quants(scales.view(nb, 16).t().contiguous(), 15, swt)
        mm, lm = make_qp_quants(mins.view(nb, 16).t().contiguous(), 15, swt)
        sc = (_u8(ls.t()) | _u8(lm.t() * 16)).contiguous()
        d, dmin = fp16_round(dm), fp16_round(mm)
        L = _requant_asym(blocks, _from_sub_blocks(L, nb), d, dmin, sc & 0xF, sc >> 4, 16, 3)
        return torch.cat([sc, _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        nb = blocks.shape[0]
        sc = blocks[:, :16]
        q = _unpack_2bit(blocks[:, 16:80]).view(nb, 16, 16).to(torch.float32)
        d = bytes_fp16(blocks[:, 80:82])
        dmin = bytes_fp16(blocks[:, 82:84])
        dl = (d[:, None] * (sc & 0xF).to(torch.float32)).unsqueeze(-1)
        ml = (dmin[:, None] * (sc >> 4).to(torch.float32)).unsqueeze(-1)
        return (dl * q - ml).view(nb, QK_K)


class Q3_K(_KQuant, qtype=T.Q3_K):
    """``quantize_row_q3_K_ref``: 16 sub-blocks of 16, 3-bit quants (2 low bits + hmask), 6-bit signed scales."""

    chunk_elems = 1 << 20  # the fit is a long loop of small (M,) ops: larger chunks amortise dispatch
    supports_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        nb = blocks.shape[0]
        if qw is not None:
            # quantize_row_q3_K_impl: make_qx_quants(16, 4, w = qw*sqrt(sigma2 + x^2)) per sub-block
            # (sigma2 = 2*sum(x^2)/256), then make_qx_quants(16, 32, scales, w = sw) for the 6-bit scales.
            xt, wt, sw = _imatrix_weights(blocks, qw, 16, 2)
            scales, L = make_qx_quants(xt, 4, wt)
            dblk, ls = make_qx_quants(scales.view(nb, 16).t().contiguous(), 32, sw.t().contiguous())
            ls = ls.t().contiguous()
            d = fp16_round(dblk)
        else:
            xt = _sub_blocks(blocks, 16)
            scales, L = make_q3_quants(xt, 4)
            scales = scales.view(nb, 16)
            max_scale, _ = first_absmax(scales.t())
            has = max_scale != 0
            iscale = div(-32, max_scale)
            ls = torch.where(has[:, None], nearest_int(iscale[:, None] * scales).clamp_(-32, 31) + 32,
                             torch.zeros_like(scales))
            d = fp16_round(torch.where(has, div(1, iscale), torch.zeros_like(iscale)))
        L = _from_sub_blocks(L, nb)
        l8 = ls.to(torch.uint8)
        sc = torch.cat([(l8[:, :8] & 0xF) | ((l8[:, 8:] & 0xF) << 4),
                        _or_shifted((l8 >> 4).view(nb, 4, 4), 1, 2)], dim=1)
        dj = (d[:, None] * (ls - 32)).unsqueeze(-1)
        xb = blocks.view(nb, 16, 16)
        lq = nearest_int(div(xb, dj)).clamp_(-4, 3) + 4
        L = torch.where(dj != 0, lq, L.view(nb, 16, 16)).view(nb, QK_K).to(torch.uint8)
        hmask = _or_shifted(((L >> 2) & 1).view(nb, 8, 32), 1, 1)
        return torch.cat([hmask, _pack_2bit(L & 3), sc, fp16_bytes(d)], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        nb = blocks.shape[0]
        hmask = blocks[:, :32]
        ql = _unpack_2bit(blocks[:, 32:96])
        sc = blocks[:, 96:108]
        d = bytes_fp16(blocks[:, 108:110])
        low = torch.cat([sc[:, :8] & 0xF, sc[:, :8] >> 4], dim=1)
        sh = torch.arange(0, 8, 2, device=blocks.device, dtype=torch.uint8).view(1, 4, 1)
        high = ((sc[:, 8:12].view(nb, 1, 4) >> sh) & 3).view(nb, 16)
        s = (low | (high << 4)).to(torch.int32) - 32
        shb = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
        hb = ((hmask.view(nb, 1, 32) >> shb) & 1).view(nb, QK_K)
        q = ql.to(torch.int32) - torch.where(hb.bool(), 0, 4)
        dl = (d[:, None] * s.to(torch.float32)).unsqueeze(-1)
        return (dl * q.view(nb, 16, 16).to(torch.float32)).view(nb, QK_K)


class _Q45K(_KQuant):
    nmax: int
    rmin: float
    nstep: int

    @classmethod
    def _fit(cls, blocks, qw=None):
        nb = blocks.shape[0]
        if qw is not None:
            return cls._fit_imatrix(blocks, qw)
        xt = _sub_blocks(blocks, 32)
        av_x = sqrtf(div(seqsum(xt * xt), 32))
        scales, mins, L = make_qkx2_quants(xt, av_x + xt.abs(), cls.nmax, cls.rmin, 0.1, cls.nstep, False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale = _max0(scales)
        max_min = _max0(mins)
        c63 = _c(63.0)
        inv_s = torch.where(max_scale > 0, div(c63, max_scale), torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, div(c63, max_min), torch.zeros_like(max_min))
        ls = _u8(nearest_int(inv_s[:, None] * scales)).clamp_(max=63)
        lm = _u8(nearest_int(inv_m[:, None] * mins)).clamp_(max=63)
        d = fp16_round(div(max_scale, c63))
        dmin = fp16_round(div(max_min, c63))
        L = _requant_asym(blocks, _from_sub_blocks(L, nb), d, dmin, ls, lm, 32, cls.nmax)
        return torch.cat([fp16_bytes(d), fp16_bytes(dmin), _pack_k4_scales(ls, lm)], dim=1), \
            L.to(torch.uint8).view(nb, 4, 2, 32)

    @classmethod
    def _fit_imatrix(cls, blocks, qw):
        """``quantize_row_q4_K_impl`` / ``q5_K_impl``: ``make_qkx3_quants(32, nmax, w = qw*sqrt(sigma2 + x^2),
        -0.9, 0.05, 36)`` per sub-block (``sigma2 = 2*sum(x^2)/256``), ``make_qp_quants(8, 63, ., sw)`` for
        the scales and the mins; the requantization reads the packed 6-bit values back (``get_scale_min_k4``)."""
        nb = blocks.shape[0]
        xt, wt, sw = _imatrix_weights(blocks, qw, 32, 2)
        scales, mins, L = make_qkx2_quants(xt, wt, cls.nmax, -0.9, 0.05, 36, False)
        swt = sw.t().contiguous()
        dblk, ls = make_qp_quants(scales.view(nb, 8).t().contiguous(), 63, swt)
        mblk, lm = make_qp_quants(mins.view(nb, 8).t().contiguous(), 63, swt)
        ls, lm = _u8(ls.t()), _u8(lm.t())
        if cls.clamp_imatrix_levels:
            ls, lm = ls.clamp_(max=63), lm.clamp_(max=63)
        packed = _pack_k4_scales(ls, lm)
        d, dmin = fp16_round(dblk), fp16_round(mblk)
        sc, mn = _unpack_k4_scales(packed)
        L = _requant_asym(blocks, _from_sub_blocks(L, nb), d, dmin, sc, mn, 32, cls.nmax)
        return torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed], dim=1), L.to(torch.uint8).view(nb, 4, 2, 32)

    @classmethod
    def _dq(cls, blocks, q):
        nb = blocks.shape[0]
        d = bytes_fp16(blocks[:, 0:2])
        dmin = bytes_fp16(blocks[:, 2:4])
        s, m = _unpack_k4_scales(blocks[:, 4:16])
        d1 = (d[:, None] * s.to(torch.float32)).unsqueeze(-1)
        m1 = (dmin[:, None] * m.to(torch.float32)).unsqueeze(-1)
        return (d1 * q.view(nb, 8, 32).to(torch.float32) - m1).view(nb, QK_K)


class Q4_K(_Q45K, qtype=T.Q4_K):
    """``quantize_row_q4_K_ref``: 8 sub-blocks of 32, 4-bit quants, 6-bit scales and mins."""

    nmax, rmin, nstep = 15, -1.0, 20
    clamp_imatrix_levels = False  # quantize_row_q4_K_impl stores Ls/Lm unclamped; q5_K_impl clamps to 63
    supports_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        head, L = cls._fit(blocks, qw)
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).view(-1, 128)
        return torch.cat([head, qs], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        nb = blocks.shape[0]
        qs = blocks[:, 16:].view(nb, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2)
        return cls._dq(blocks, q)


class Q5_K(_Q45K, qtype=T.Q5_K):
    """``quantize_row_q5_K_ref``: 8 sub-blocks of 32, 5-bit quants (4 low bits + qh), 6-bit scales and mins."""

    nmax, rmin, nstep = 31, -0.5, 15
    clamp_imatrix_levels = True
    supports_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        nb = blocks.shape[0]
        head, L = cls._fit(blocks, qw)
        qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).view(nb, 128)
        hb = ((L >> 4) & 1).view(nb, 8, 32)  # bit 2k+h of qh[j] <- L[64k + 32h + j] > 15
        qh = _or_shifted(hb, 1, 1)
        return torch.cat([head, qh, qs], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        nb = blocks.shape[0]
        qh = blocks[:, 16:48]
        qs = blocks[:, 48:].view(nb, 4, 1, 32)
        ql = torch.cat([qs & 0xF, qs >> 4], dim=2).view(nb, 8, 32)
        sh = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
        q = ql | (((qh.view(nb, 1, 32) >> sh) & 1) << 4)
        return cls._dq(blocks, q)


class Q6_K(_KQuant, qtype=T.Q6_K):
    """``quantize_row_q6_K_ref``: 16 sub-blocks of 16, 6-bit quants (ql + qh), int8 scales, ``d`` last."""

    supports_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        nb = blocks.shape[0]
        xt = _sub_blocks(blocks, 16)
        # quantize_row_q6_K_impl passes the importance weights straight to make_qx_quants (the ref: x*x)
        scales, L = make_qx_quants(xt, 32, xt * xt if qw is None else _sub_blocks(qw, 16))
        scales = scales.view(nb, 16)
        L = _from_sub_blocks(L, nb)
        max_scale, max_abs = first_absmax(scales.t())
        empty = max_abs < GROUP_MAX_EPS
        iscale = div(-128, max_scale)
        d = fp16_round(div(1, iscale))
        ls = nearest_int(iscale[:, None] * scales).clamp_(max=127)
        dj = (d[:, None] * ls).unsqueeze(-1)
        lq = nearest_int(div(blocks.view(nb, 16, 16), dj)).clamp_(-32, 31) + 32
        L = torch.where(dj != 0, lq, L.view(nb, 16, 16)).view(nb, 2, 4, 32).to(torch.uint8)
        ql = ((L[:, :, 0:2] & 0xF) | ((L[:, :, 2:4] & 0xF) << 4)).reshape(nb, 128)
        qh = _or_shifted(L >> 4, 2, 2).reshape(nb, 64)
        out = torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), fp16_bytes(d)], dim=1)
        return torch.where(empty[:, None], torch.zeros_like(out), out)

    @classmethod
    def dequantize_blocks(cls, blocks):
        nb = blocks.shape[0]
        ql = blocks[:, :128].view(nb, 2, 1, 64)
        qh = blocks[:, 128:192].view(nb, 2, 1, 32)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = bytes_fp16(blocks[:, 208:210])
        lo = torch.cat([ql & 0xF, ql >> 4], dim=2).view(nb, 2, 4, 32)
        sh = torch.arange(0, 8, 2, device=blocks.device, dtype=torch.uint8).view(1, 1, 4, 1)
        hi = (qh >> sh) & 3
        q = (lo | (hi << 4)).to(torch.int32) - 32
        dl = (d[:, None] * sc).unsqueeze(-1)
        return (dl * q.view(nb, 16, 16).to(torch.float32)).view(nb, QK_K)
