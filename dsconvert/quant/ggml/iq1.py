"""IQ1_S (1.5625 bits per weight) and IQ1_M (1.75 bpw): ternary groups snapped to a 2048-point grid.

Each value is coded as ``scale * (q + delta)`` with ``q`` in {-1, 0, 1} and a block-wide shift ``delta = +-1/8``
(``IQ1S_DELTA``); 8 consecutive ternary values form a group coded by one of the 2048 grid points of
``iq1s_grid`` (11 bits). The quantizers are llama.cpp's ``quantize_row_iq1_s_impl`` and
``quantize_row_iq1_m_impl``, step by step in float32, vectorised over all blocks of a chunk:

1. element weights ``w = qw * sqrtf(sigma2 + x^2)`` with ``sigma2 = 2 * sum(x^2) / 256`` over the super-block
   (IQ1_M without an imatrix: ``w = x^2``);
2. the exact weighted least-squares partition search: the block's values sorted ascending (a stable sort, as
   glibc's merge-sort ``qsort`` is), prefix sums ``S_i = sum w*x`` and ``W_i = sum w`` in sorted order, and for
   every split ``0 <= i1 <= i2 <= n`` (values below ``i1`` get level -1, up to ``i2`` level 0, the rest +1) and
   every shift the least-squares ``sumqx``, ``sumq2`` in C's float32 expression order. IQ1_S: one shift per
   32-block, candidates in (i1, i2, +delta, -delta) order. IQ1_M: a shift per 8-half of each 16-block, the prefix
   sums kept per half, candidates in (i1, i2, {++, +-, -+, --}) order. The candidate kept is the last one that
   passes C's running test ``sumqx^2 > best * sumq2`` (``best = (sumqx/sumq2)*sumqx`` of the last kept one);
   :func:`_running_best` finds it without a loop over the candidates (see there);
3. a negative scale flips the levels and the shift(s); every 8-group not on the grid takes the listed neighbour
   minimising ``sum w*(scale*xx[q] - x)^2`` (``iq1_find_best_neighbour2``, first in list order wins ties), and
   then the scale is refitted on the snapped groups when positive;
4. IQ1_S: ``d = max_scale/15``, stored ``fp16(d*1.125)``, 3-bit block scales ``clamp(nearest_int((scale/d - 1)/2),
   0, 7)``. IQ1_M: the same 3-bit scales, then ``d`` refitted by least squares over the whole super-block at the
   chosen levels and block scales, stored ``fp16(d*1.1125)``, its 16 bits spread over the top nibbles of the four
   scale words.

The grid is gguf-py's ``IQ1_S.grid_hex`` (the same ``kgrid_1bit_2048`` llama.cpp uses); the neighbour lists are
rebuilt as ``iq2xs_init_impl`` builds them for these types (``nwant = 3``): for each 8-tuple of levels off the grid,
every grid point at the three smallest squared distances, in (distance, index) order. Only tuples of levels 0..2
are listed (llama.cpp also lists tuples with a level 3, which these quantizers never form).

Block layouts (``ggml-common.h``)::

    IQ1_S  d | qs[32] (low 8 bits of the grid indices) | qh[8] u16 per 32-block:
           3 x 3 high index bits, 3-bit scale << 12, shift sign << 15                                 50 B
    IQ1_M  qs[32] | qh[16] per 16-block: 3 high index bits + shift sign (0x08) per 8-group |
           scales[8]: four u16 of four 3-bit block scales, the fp16 super-block scale in the top nibbles  56 B

llama.cpp requires an importance matrix for IQ1_S (``ggml_quantize_requires_imatrix``) and so does
:meth:`IQ1_S.quantize_blocks`; IQ1_M's kernel runs without one (``llama-quantize`` still asks for one for most
tensors; that policy lives in :mod:`dsconvert.formats.gguf_types`).

Not reproduced: llama.cpp's whole-grid fallback of ``iq1_find_best_neighbour2``, reached only when every listed
neighbour's float32 distance overflows (|x| around 1e13 or NaN/inf input); it reads out of bounds there, so there
is no defined result to match. Here the first listed neighbour is taken in that case.

Source: llama.cpp ``ggml/src/ggml-quants.c`` (``iq2xs_init_impl``, ``iq1_find_best_neighbour2``,
``quantize_row_iq1_s_impl``, ``quantize_row_iq1_m_impl``, ``dequantize_row_iq1_s``, ``dequantize_row_iq1_m``);
docs/gguf-deepseek2.md §6.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ._ops import bytes_fp16, div, fp16_bytes, nearest_int, nearest_listed, seqsum, sqrtf
from .base import GGMLType

DELTA = np.float32(0.125)                                   # IQ1S_DELTA == IQ1M_DELTA
#: level values for a +delta and a -delta shift: x_p, x_m of the C code (exact in float32)
X_P = (np.float32(-1 + DELTA), DELTA, np.float32(1 + DELTA))
X_M = (np.float32(-1 - DELTA), -DELTA, np.float32(1 - DELTA))
EPS_IQ1_S = np.float32(1e-12)                                # GROUP_MAX_EPS_IQ1_S
EPS_IQ1_M = np.float32(1e-7)                                 # GROUP_MAX_EPS_IQ1_M
_FLT_MAX = float(np.finfo(np.float32).max)
_NWANT = 3


@functools.lru_cache(maxsize=None)
def _lattice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(levels (2048, 8) int64 in 0..2, kmap (6561,) grid index or -1, neighbours (6561, P) int64, -1 padded)``.

    Tuples are indexed in base 3 (``sum l_j 3^j``); the grid comes from gguf-py's ``IQ1_S.grid_hex``
    (little-endian u16 per grid point, 2 bits per element).
    """
    raw = bytes.fromhex(gq.IQ1_S.grid_hex.decode())
    kgrid = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    shifts = 2 * np.arange(8)
    levels = (kgrid[:, None] >> shifts) & 3                      # (2048, 8)
    if levels.max() > 2:
        raise ValueError("IQ1 grid has a level outside 0..2")
    pow3 = 3 ** np.arange(8)
    kmap = np.full(3 ** 8, -1, dtype=np.int64)
    kmap[levels @ pow3] = np.arange(kgrid.size)
    codes = np.arange(3 ** 8)
    tup = (codes[:, None] // pow3) % 3                            # (6561, 8)
    off = np.nonzero(kmap < 0)[0]
    # squared distances of the 2l+1 coordinates, exact in int64: |g|^2 + |p|^2 - 2 p.g
    g, p = 2 * levels + 1, 2 * tup[off] + 1
    d2 = (g * g).sum(1)[None, :] + (p * p).sum(1)[:, None] - 2 * p @ g.T
    order = np.argsort(d2, axis=1, kind="stable")                # (distance, index) order
    ds = np.take_along_axis(d2, order, axis=1)
    new = np.concatenate([np.ones((ds.shape[0], 1), bool), ds[:, 1:] != ds[:, :-1]], axis=1)
    keep = np.cumsum(new, axis=1) <= _NWANT                       # a prefix of each sorted row
    width = int(keep.sum(1).max())
    neigh = np.full((codes.size, width), -1, dtype=np.int64)
    neigh[off] = np.where(keep, order, -1)[:, :width]
    return levels, kmap, neigh


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`_lattice`'s tables on ``device`` and what :func:`_snap` needs besides: ``(levels (2048, 8) int64,
    kmap, neighbours, list lengths (6561,) int64, values (8, 4096) float32: xx[level] of each grid point for a
    +delta shift, then for a -delta shift)``."""
    levels, kmap, neigh = _lattice()
    vals = np.concatenate([np.array(X_P, np.float32)[levels], np.array(X_M, np.float32)[levels]]).T
    out = (levels, kmap, neigh, (neigh >= 0).sum(1), vals)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in out)


def _xx(minus: torch.Tensor) -> torch.Tensor:
    """``(...,)`` bool (shift is -delta) -> ``(..., 3)`` float32 level values (``x_m`` or ``x_p``)."""
    xp = torch.tensor(X_P, dtype=torch.float32, device=minus.device)
    xm = torch.tensor(X_M, dtype=torch.float32, device=minus.device)
    return torch.where(minus[..., None], xm, xp)


def _running_best(sumqx: torch.Tensor, sumq2: torch.Tensor) -> torch.Tensor:
    """Index of the candidate C keeps, per row of ``(M, K)`` float32 candidates taken in column order.

    C (float32): ``best = -FLT_MAX; for k: if (sumq2 > 0 && sumqx*sumqx > best*sumq2) { scale = sumqx/sumq2;
    best = scale*sumqx; keep k }``. Returns int64 ``(M,)``, -1 where no candidate has ``sumq2 > 0``.

    The running test compares ``sumqx^2/sumq2`` up to a few float32 roundings (relative 2^-21 at most), so
    only candidates whose score ``sumqx^2/sumq2`` (taken exactly from the float32 sums in float64) is within
    2^-16 of the row's best can be kept last: once the best candidate is passed, nothing that much lower can pass,
    and the state entering the near-best set cannot tell the start from ``-FLT_MAX`` apart for long (the first
    near-best candidate far enough above it is kept either way). The C loop therefore runs, in float32 and in
    order, over the near-best candidates alone, usually one or two per row. Rows whose sums leave the normal
    float32 range of the products (``2^-60 .. 2^60``), or whose best score is 0, run it over all their
    candidates.
    """
    valid = sumq2 > 0
    qx64, q264 = sumqx.double(), sumq2.double()
    score = torch.where(valid, qx64 * qx64 / torch.where(valid, q264, torch.ones_like(q264)),
                        torch.full_like(q264, -1.0))
    top = score.amax(1, keepdim=True)
    near = valid & (score >= top * (1 - 2.0 ** -16))
    lo, hi = 2.0 ** -60, 2.0 ** 60
    aq = qx64.abs()
    wild = near & ((aq < lo) | (aq > hi) | (q264 < lo) | (q264 > hi))
    tame = ~wild.any(1, keepdim=True) & (top >= lo) & (top <= hi)
    live = torch.where(tame, near, valid)
    cnt = live.sum(1)
    K = sumqx.shape[1]
    col = torch.arange(K, device=sumqx.device)
    # the last live column: the answer where only one candidate is live
    out = torch.where(live, col, torch.full_like(col, -1)).amax(1)
    multi = (cnt > 1).nonzero(as_tuple=True)[0]
    if multi.numel():
        lv = live[multi]
        width = int(cnt[multi].max())
        pos = torch.where(lv, col, torch.full_like(col, K)).sort(1).values[:, :width]   # live columns, in order
        ok = pos < K
        pc = pos.clamp(max=K - 1)
        sqx, sq2 = sumqx[multi].gather(1, pc), sumq2[multi].gather(1, pc)
        best = torch.full((multi.numel(),), -_FLT_MAX, dtype=torch.float32, device=sumqx.device)
        sel = torch.full((multi.numel(),), -1, dtype=torch.int64, device=sumqx.device)
        for k in range(width):
            a, b = sqx[:, k], sq2[:, k]
            upd = ok[:, k] & (b > 0) & (a * a > best * b)
            best = torch.where(upd, div(a, b) * a, best)
            sel = torch.where(upd, pc[:, k], sel)
        out[multi] = sel
    return out


def _split_levels(order: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """Levels 0/1/2 of each element from the sorted order and the chosen split: ``(M, n)`` int64."""
    n = order.shape[1]
    rank = torch.arange(n, device=order.device)
    lv_sorted = (rank >= i1[:, None]).to(torch.int64) + (rank >= i2[:, None]).to(torch.int64)
    return torch.empty_like(lv_sorted).scatter_(1, order, lv_sorted)


def _snap(L: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, minus: torch.Tensor,
          tabs) -> torch.Tensor:
    """Grid index of each 8-group: ``L`` ``(G, 8)`` int64 levels, ``x``/``w`` ``(G, 8)`` float32, ``scale``
    ``(G,)``, ``minus`` ``(G,)`` bool shift sign -> ``(G,)`` int64.

    Off-grid groups take ``iq1_find_best_neighbour2``'s choice: the listed neighbour with the smallest float32
    ``d2 = sum_i (w*diff)*diff``, ``diff = scale*xx[q_i] - x_i``, summed in element order; the first wins ties
    (:func:`._ops.nearest_listed`, on a value table holding the grid once per shift).
    """
    _, kmap, neigh, counts, qt = tabs
    u = (L * (3 ** torch.arange(8, device=L.device))).sum(1)
    gi = kmap[u]
    off = (gi < 0).nonzero(as_tuple=True)[0]
    if off.numel() == 0:
        return gi
    gi = gi.clone()
    gi[off] = nearest_listed(u[off], neigh, counts, x[off], w[off], scale[off], qt,
                             minus[off].to(torch.int64) * kmap.new_tensor(qt.shape[1] // 2))
    return gi


def _refit(gi: torch.Tensor, x: torch.Tensor, w: torch.Tensor, minus: torch.Tensor, tabs,
           n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sumqx``, ``sumq2`` of each block (``n`` elements, ``n/8`` groups) at the snapped grid points, summed
    in element order: ``gi``/``minus`` ``(M, n/8)``, ``x``/``w`` ``(M, n)`` -> two ``(M,)`` float32."""
    levels = tabs[0]
    q = _xx(minus).gather(2, levels[gi]).reshape(x.shape)         # (M, n)
    wq = w * q
    return seqsum((wq * x).t()), seqsum((wq * q).t())


def _weights(blocks: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """``qw * sqrtf(sigma2 + x^2)``, ``sigma2 = 2*sum(x^2)/256`` per super-block; ``x^2`` without ``qw``."""
    if qw is None:
        return blocks * blocks
    bt = blocks.t()
    sigma2 = div(2 * seqsum(bt * bt), 256.0)
    return qw * sqrtf(sigma2[:, None] + blocks * blocks)


def _sub_blocks(blocks: torch.Tensor, qw, size: int):
    """The common start of both searches for ``blocks (nb, 256)`` float32 split into sub-blocks of ``size``
    values: ``(device, tables, nb, NB, w, xb, amax, order)`` with ``NB = nb * 256 / size`` sub-blocks, their
    weights ``w`` and values ``xb`` ``(NB, size)``, largest magnitude ``amax (NB,)`` and :func:`_sorted_order`."""
    dev = blocks.device
    nb = blocks.shape[0]
    NB = nb * (256 // size)
    xb = blocks.reshape(NB, size)
    return (dev, _tables(dev), nb, NB, _weights(blocks, qw).reshape(NB, size), xb, xb.abs().amax(1),
            _sorted_order(xb))


def _sorted_order(xb: torch.Tensor) -> torch.Tensor:
    """``qsort`` of ``(x, index)`` pairs on ``x``: glibc's merge sort is stable, so equal values keep index order."""
    return torch.sort(xb, dim=1, stable=True).indices


def _pairs(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(i1, i2)`` with ``0 <= i1 <= i2 <= n`` in C loop order."""
    i1, i2 = torch.triu_indices(n + 1, n + 1, device=device)
    return i1, i2


def _prefix(t: torch.Tensor) -> torch.Tensor:
    """``(M, n)`` -> ``(M, n+1)``: ``s[0] = 0; s[j+1] = s[j] + t[j]`` in float32, in order."""
    out = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=torch.float32, device=t.device)
    for j in range(t.shape[1]):
        out[:, j + 1] = out[:, j] + t[:, j]
    return out


class IQ1_S(GGMLType, qtype=T.IQ1_S):
    """``quantize_iq1_s`` (importance weights required, as in llama.cpp)."""

    supports_imatrix = True
    chunk_elems = 1 << 16

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is None:
            raise ValueError("IQ1_S: quantization needs importance weights (an imatrix), as in llama.cpp")
        dev, tabs, nb, NB, w, xb, amax, order = _sub_blocks(blocks, qw, 32)
        sx = _prefix(w.gather(1, order) * xb.gather(1, order))
        sw = _prefix(w.gather(1, order))
        i1, i2 = _pairs(32, dev)
        a, b, c = sx[:, i1] - sx[:, :1], sx[:, i2] - sx[:, i1], sx[:, 32:] - sx[:, i2]
        aw, bw, cw = sw[:, i1] - sw[:, :1], sw[:, i2] - sw[:, i1], sw[:, 32:] - sw[:, i2]

        def cand(v):
            return (a * v[0] + b * v[1]) + c * v[2], ((aw * v[0]) * v[0] + (bw * v[1]) * v[1]) + (cw * v[2]) * v[2]

        qx_p, q2_p = cand(X_P)
        qx_m, q2_m = cand(X_M)
        sumqx = torch.stack([qx_p, qx_m], 2).reshape(NB, -1)    # (i1, i2, +delta, -delta) order
        sumq2 = torch.stack([q2_p, q2_m], 2).reshape(NB, -1)
        k = _running_best(sumqx, sumq2)
        skip = (amax < EPS_IQ1_S) | (k < 0)
        kc = k.clamp(min=0)
        bqx, bq2 = sumqx.gather(1, kc[:, None])[:, 0], sumq2.gather(1, kc[:, None])[:, 0]
        scale = div(bqx, bq2)
        minus = (kc % 2) == 1
        L = _split_levels(order, i1[kc // 2], i2[kc // 2])
        neg = scale < 0
        L = torch.where(neg[:, None], 2 - L, L)
        scale = torch.where(neg, -scale, scale)
        minus = minus ^ neg
        mg = minus[:, None].expand(NB, 4).reshape(-1)
        gi = _snap(L.view(NB * 4, 8), xb.reshape(-1, 8), w.reshape(-1, 8), scale[:, None].expand(NB, 4).reshape(-1),
                   mg, tabs).view(NB, 4)
        on_grid = (tabs[1][(L.view(NB, 4, 8) * (3 ** torch.arange(8, device=dev))).sum(2)] >= 0).all(1)
        rqx, rq2 = _refit(gi, xb, w, minus[:, None].expand(NB, 4), tabs, 32)
        scale = torch.where(~on_grid & (rqx > 0) & (rq2 > 0), div(rqx, rq2), scale)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
        minus = minus & ~skip
        h = ((gi >> 8) << torch.tensor([0, 3, 6, 9], device=dev)).sum(1)          # (NB,)
        sc = scale.view(nb, 8)
        max_scale = sc.amax(1)
        some = max_scale > 0
        d = div(torch.where(some, max_scale, torch.ones_like(max_scale)), 15.0)
        idd = div(1, d)
        l = nearest_int(np.float32(0.5) * (idd[:, None] * sc - 1)).clamp_(0, 7).to(torch.int64)
        l = (l | (minus.view(nb, 8).to(torch.int64) << 3)) << 12
        qh = torch.where(some[:, None], h.view(nb, 8) | l, h.view(nb, 8))
        dd = torch.where(some, d * np.float32(1.125), torch.zeros_like(d))
        qs = (gi & 255).to(torch.uint8).view(nb, 32)
        qhb = torch.stack([qh & 255, qh >> 8], 2).to(torch.uint8).view(nb, 16)
        return torch.cat([fp16_bytes(dd), qs, qhb], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        levels = _tables(blocks.device)[0]
        nb = blocks.shape[0]
        d = bytes_fp16(blocks[:, :2])
        qs = blocks[:, 2:34].to(torch.int64).view(nb, 8, 4)
        qh16 = blocks[:, 34:50].to(torch.int64).view(nb, 8, 2)
        qh = qh16[..., 0] | (qh16[..., 1] << 8)                                     # (nb, 8)
        idx = qs | (((qh[..., None] >> torch.tensor([0, 3, 6, 9], device=blocks.device)) & 7) << 8)
        dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
        delta = torch.where((qh & 0x8000) != 0, -DELTA, DELTA).to(torch.float32)
        g = (levels[idx] - 1).to(torch.float32)                                    # (nb, 8, 4, 8) in -1..1
        return (dl[..., None, None] * (g + delta[..., None, None])).reshape(nb, 256)


class IQ1_M(GGMLType, qtype=T.IQ1_M):
    """``quantize_iq1_m`` (importance weights optional in the kernel, as in llama.cpp)."""

    supports_imatrix = True
    chunk_elems = 1 << 16

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        dev, tabs, nb, NB, w, xb, amax, order = _sub_blocks(blocks, qw, 16)
        half = (order >= 8)                                                          # (NB, 16) in sorted order
        t = w.gather(1, order) * xb.gather(1, order)
        ws = w.gather(1, order)
        z = torch.zeros_like(t)
        px = [_prefix(torch.where(half, z, t)), _prefix(torch.where(half, t, z))]
        pw = [_prefix(torch.where(half, z, ws)), _prefix(torch.where(half, ws, z))]
        # the masked prefix sums equal C's: px[1-h][j+1] = px[1-h][j] copies (adding +0 keeps every value but -0,
        # and -0 cannot arise: a prefix starts at +0 and x + (-0) = x)
        p2, m2 = X_P[2], X_M[2]
        cp1 = np.float32(X_P[0] * X_P[0] - X_P[1] * X_P[1])
        cp2 = np.float32(X_P[1] * X_P[1] - X_P[2] * X_P[2])
        cm1 = np.float32(X_M[0] * X_M[0] - X_M[1] * X_M[1])
        cm2 = np.float32(X_M[1] * X_M[1] - X_M[2] * X_M[2])
        i1, i2 = _pairs(16, dev)
        qxp, qxm, q2p, q2m = [], [], [], []
        for h in range(2):
            tx, tw = px[h][:, 16:], pw[h][:, 16:]
            s = px[h][:, i1] + px[h][:, i2]
            qxp.append(tx * p2 - s)
            qxm.append(tx * m2 - s)
            q2p.append(((tw * p2) * p2 + pw[h][:, i1] * cp1) + pw[h][:, i2] * cp2)
            q2m.append(((tw * m2) * m2 + pw[h][:, i1] * cm1) + pw[h][:, i2] * cm2)
        sumqx = torch.stack([qxp[0] + qxp[1], qxp[0] + qxm[1], qxm[0] + qxp[1], qxm[0] + qxm[1]], 2).reshape(NB, -1)
        sumq2 = torch.stack([q2p[0] + q2p[1], q2p[0] + q2m[1], q2m[0] + q2p[1], q2m[0] + q2m[1]], 2).reshape(NB, -1)
        k = _running_best(sumqx, sumq2)
        skip = (amax < EPS_IQ1_M) | (k < 0)
        kc = k.clamp(min=0)
        bqx, bq2 = sumqx.gather(1, kc[:, None])[:, 0], sumq2.gather(1, kc[:, None])[:, 0]
        scale = div(bqx, bq2)
        best_k = kc % 4
        L = _split_levels(order, i1[kc // 4], i2[kc // 4])
        neg = scale < 0
        L = torch.where(neg[:, None], 2 - L, L)
        scale = torch.where(neg, -scale, scale)
        best_k = torch.where(neg, 3 - best_k, best_k)
        minus = torch.stack([best_k >= 2, best_k % 2 == 1], 1)                      # (NB, 2): shift of each half
        gi = _snap(L.view(NB * 2, 8), xb.reshape(-1, 8), w.reshape(-1, 8),
                   scale[:, None].expand(NB, 2).reshape(-1), minus.reshape(-1), tabs).view(NB, 2)
        on_grid = (tabs[1][(L.view(NB, 2, 8) * (3 ** torch.arange(8, device=dev))).sum(2)] >= 0).all(1)
        rqx, rq2 = _refit(gi, xb, w, minus, tabs, 16)
        scale = torch.where(~on_grid & (rqx > 0) & (rq2 > 0), div(rqx, rq2), scale)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
        minus = minus & ~skip[:, None]
        sc = scale.view(nb, 16)
        max_scale = sc.amax(1)
        some = max_scale > 0
        d = div(torch.where(some, max_scale, torch.ones_like(max_scale)), 15.0)
        idd = div(1, d)
        l = nearest_int(np.float32(0.5) * (idd[:, None] * sc - 1)).clamp_(0, 7)       # (nb, 16) float32
        # least-squares refit of d over the super-block at the 3-bit scales, in element order
        q = _xx(minus).gather(2, tabs[0][gi]).reshape(nb, 16, 16) * (2 * l + 1)[..., None]
        wv, xv = w.view(nb, 16, 16), xb.view(nb, 16, 16)
        wq = (wv * q).reshape(nb, 256)
        sqx, sq2 = seqsum((wq * xv.reshape(nb, 256)).t()), seqsum((wq * q.reshape(nb, 256)).t())
        d = torch.where(sq2 > 0, div(sqx, torch.where(sq2 > 0, sq2, torch.ones_like(sq2))), d)
        s16 = (d * np.float32(1.1125)).to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF   # (nb,)
        li = l.to(torch.int64).view(nb, 4, 4)
        words = (li << torch.tensor([0, 3, 6, 9], device=dev)).sum(2)               # (nb, 4)
        words = words | (((s16[:, None] >> torch.tensor([0, 4, 8, 12], device=dev)) & 0xF) << 12)
        words = torch.where(some[:, None], words, torch.zeros_like(words))
        masks = (minus[..., 0].to(torch.int64) << 3) | (minus[..., 1].to(torch.int64) << 7)
        hi = (gi >> 8)
        qh = (hi[:, 0] | (hi[:, 1] << 4)).view(nb, 16)
        qh = torch.where(some[:, None], qh | masks.view(nb, 16), qh)
        qs = (gi & 255).to(torch.uint8).view(nb, 32)
        scb = torch.stack([words & 255, words >> 8], 2).to(torch.uint8).view(nb, 8)
        return torch.cat([qs, qh.to(torch.uint8), scb], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        levels = _tables(blocks.device)[0]
        dev = blocks.device
        nb = blocks.shape[0]
        qs = blocks[:, :32].to(torch.int64).view(nb, 16, 2)
        qh = blocks[:, 32:48].to(torch.int64).view(nb, 16)
        sb = blocks[:, 48:56].to(torch.int64).view(nb, 4, 2)
        sc = sb[..., 0] | (sb[..., 1] << 8)                                          # (nb, 4) u16
        s16 = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
        d = torch.where(s16 >= 0x8000, s16 - 0x10000, s16).to(torch.int16).view(torch.float16).to(torch.float32)
        l = (sc[..., None] >> torch.tensor([0, 3, 6, 9], device=dev)) & 7           # (nb, 4, 4) -> 16 blocks
        dl = d[:, None] * (2 * l.reshape(nb, 16) + 1).to(torch.float32)
        sh = torch.tensor([8, 4], device=dev)
        idx = qs | ((qh[..., None] << sh) & 0x700)                                 # (nb, 16, 2)
        minus = (qh[..., None] & torch.tensor([0x08, 0x80], device=dev)) != 0
        delta = torch.where(minus, -DELTA, DELTA).to(torch.float32)
        g = (levels[idx] - 1).to(torch.float32)                                    # (nb, 16, 2, 8)
        return (dl[..., None, None] * (g + delta[..., None])).reshape(nb, 256)
