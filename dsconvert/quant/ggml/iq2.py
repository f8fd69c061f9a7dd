"""IQ2_XXS, IQ2_XS and IQ2_S: 2-bit lattice quantizers (2.0625, 2.3125 and 2.5625 bits per weight).

IQ2_XS and IQ2_S (512- and 1024-point grids, 16-blocks) share :class:`_Lattice16`'s search
(``quantize_row_iq2_xs_impl``, ``quantize_row_iq2_s_impl``) and the lattice/neighbour tables below; the rest of this
note describes IQ2_XXS.

IQ2_XXS: 8-value groups snapped to a 256-point lattice (the "E8-like" grid).

Every group of 8 magnitudes is coded by one of 256 grid points (levels ``2l+1``, ``l`` in 0..2, per element),
its 8 signs by 7 bits (the 8th is the parity: an odd number of negatives flips the least important element),
and each 32-block by a 4-bit scale under an fp16 super-block scale. The quantizer is llama.cpp's
``quantize_row_iq2_xxs_impl`` step by step in float32, vectorised over all 32-blocks of a chunk:

1. element weights ``w = qw * sqrtf(sigma2 + x^2)`` (``sigma2 = sum(x^2)/256`` of the super-block), ``waux =
   sqrtf(w)``; magnitudes ``xval = |x|`` with the sign trick above;
2. a start scale from ``make_qp_quants(32, 4, xval, w)``, then 13 trial scales ``(5 + 0.1*is)/(3*scale)``: levels
   ``clamp(nearest_int((id*xval - 1)/2), 0, 2)``, a group not on the grid replaced by its nearest listed grid
   neighbour (weighted by ``waux``), kept on a better ``sumqx^2/sumq2``; a final pass at the chosen scale and
   its least-squares refit;
3. ``d = max_scale/31`` (fp16), block scale ``clamp(nearest_int((scale/d - 1)/2), 0, 15)``.

The grid points are gguf-py's table for the type (the same ``kgrid_2bit_256`` llama.cpp uses); the neighbour lists
are rebuilt exactly as ``iq2xs_init_impl`` builds them: for each 8-tuple of levels 0..3 not on the grid, every
grid point at the two smallest squared distances, in (distance, index) order.

Block layout (``ggml-common.h``)::

    IQ2_XXS  d | qs: per 32-block two u32: 4 grid indices (bytes) | 4 x 7 sign bits, scale in the top 4 bits   66 B

llama.cpp refuses this type without an importance matrix, and so does :meth:`IQ2_XXS.quantize_blocks`.
Source: llama.cpp ``ggml/src/ggml-quants.c`` (``iq2xs_init_impl``, ``iq2_find_best_neighbour``,
``quantize_row_iq2_xxs_impl``, ``quantize_row_iq2_xs_impl``, ``quantize_row_iq2_s_impl``, ``dequantize_row_iq2_xxs``,
``dequantize_row_iq2_xs``, ``dequantize_row_iq2_s``); docs/gguf-deepseek2.md §6.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ._ops import (GROUP_MAX_EPS, bytes_fp16, div, fp16_bytes, nearest_int, nearest_int_c, nearest_listed, seqsum,
                   sqrtf)
from .base import GGMLType
from .kquants import make_qp_quants

@functools.lru_cache(maxsize=None)
def _lattice(gguf_cls_name: str, nwant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(grid (G, n) int levels 2l+1, kmap (K,) int64 grid index or -1, neighbours (K, P) int64, -1 padded)`` for a
    grid of ``n``-tuples (gguf-py class ``gguf_cls_name``), built like ``iq2xs_init_impl`` / ``iq3xs_init_impl``.

    gguf-py's ``grid_hex`` holds one little-endian u16 per grid point, ``16/n`` bits per element (2 for the 8-tuples
    of IQ2, 4 for the 4-tuples of IQ3). The kmap key packs the levels ``l`` with ``b`` bits each (``b = 2`` for 3
    levels, 3 for 8 levels; :func:`_key_bits`), as llama.cpp's ``kgrid`` does; ``K`` is one more than the largest key
    of levels in range. Each key not on the grid lists every grid point at the ``nwant`` smallest squared distances,
    in (distance, index) order.
    """
    cls = getattr(gq, gguf_cls_name)
    n = cls.grid_shape[1]
    hb = 16 // n
    raw = bytes.fromhex(cls.grid_hex.decode())
    packed = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    levels = (packed[:, None] >> (hb * np.arange(n))) & ((1 << hb) - 1)          # (G, n)
    nlev = len(cls.grid_map)
    b = _key_bits(gguf_cls_name)
    shifts = b * np.arange(n)
    kgrid = (levels << shifts).sum(1)
    size = int(((nlev - 1) << shifts).sum()) + 1
    grid = 2 * levels + 1
    kmap = np.full(size, -1, dtype=np.int64)
    kmap[kgrid] = np.arange(kgrid.size)
    idx = np.arange(size)
    pos = 2 * ((idx[:, None] >> shifts) & ((1 << b) - 1)) + 1                # (K, n)
    off = np.nonzero(kmap < 0)[0]
    # squared distances between small integer vectors, exact in float64: |g|^2 + |p|^2 - 2 p.g
    g64, p64 = grid.astype(np.float64), pos[off].astype(np.float64)
    d2 = ((g64 * g64).sum(1)[None, :] + (p64 * p64).sum(1)[:, None] - 2 * p64 @ g64.T).round().astype(np.int64)
    order = np.argsort(d2, axis=1, kind="stable")                 # (distance, index) order
    ds = np.take_along_axis(d2, order, axis=1)
    # keep every entry whose distance is among the first `nwant` distinct distances of the row
    new = np.concatenate([np.ones((ds.shape[0], 1), bool), ds[:, 1:] != ds[:, :-1]], axis=1)
    rank = np.cumsum(new, axis=1)
    keep = rank <= nwant
    width = int(keep.sum(1).max())
    neigh = np.full((size, width), -1, dtype=np.int64)
    cols = np.where(keep, order, -1)
    # keep is a prefix of each row (distances are sorted), so the first `width` columns hold every kept entry
    neigh[off] = cols[:, :width]
    return grid, kmap, neigh


def _key_bits(gguf_cls_name: str) -> int:
    """Bits per level in a kmap key: enough for the type's number of levels (2 for IQ2's 3, 3 for IQ3's 8)."""
    return max(1, (len(getattr(gq, gguf_cls_name).grid_map) - 1).bit_length())


def _snap(L: torch.Tensor, xval: torch.Tensor, waux: torch.Tensor, scale: torch.Tensor, tabs,
          bits: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid index of each n-group of levels ``L`` ``(B, g, n)`` (float32, keys of ``bits`` bits per level), off-grid
    groups replaced by the neighbour minimising ``sum waux*(scale*q - xval)^2`` (``iq2_find_best_neighbour`` /
    ``iq3_find_best_neighbour``; first in list order wins ties; :func:`._ops.nearest_listed`). Returns ``(grid
    index (B, g) int64, levels (B, g, n) float32)``."""
    grid, kmap, neigh, counts, qt = tabs
    n = L.shape[-1]
    u = _key(L, bits)                                              # (B, g)
    gi = kmap[u]
    off = (gi < 0).view(-1).nonzero(as_tuple=True)[0]
    if off.numel():
        s = scale[:, None].expand_as(u).reshape(-1)[off]
        gi = gi.clone()
        gi.view(-1)[off] = nearest_listed(u.view(-1)[off], neigh, counts, xval.reshape(-1, n)[off],
                                          waux.reshape(-1, n)[off], s, qt)
    levels = (grid[gi].to(torch.float32) - 1) / 2
    return gi, levels


def _signs(xg: torch.Tensor, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes and 7 sign bits of 8-groups ``xg`` ``(..., 8)`` float32 with element weights ``wg``: an odd
    number of negatives flips the element with the smallest ``w*x*x`` (first wins ties), so the 8th sign is the
    parity. Returns ``(xval (..., 8) float32, signs (...) int64 in 0..127)``."""
    neg = ~(xg >= 0)
    xval = torch.where(neg, -xg, xg)
    bitw = (1 << torch.arange(8, device=xg.device))
    s = (neg.to(torch.int64) * bitw).sum(-1)
    odd = (neg.sum(-1) % 2) == 1
    ax = wg * xg * xg
    imin = torch.zeros(ax.shape[:-1], dtype=torch.int64, device=xg.device)
    mn = ax[..., 0].clone()
    for i in range(1, 8):
        lt = ax[..., i] < mn
        mn = torch.where(lt, ax[..., i], mn)
        imin = torch.where(lt, torch.full_like(imin, i), imin)
    flip = odd[..., None] & (torch.arange(8, device=xg.device) == imin[..., None])
    xval = torch.where(flip, -xval, xval)
    s = torch.where(odd, s ^ (1 << imin), s)
    return xval, s & 127


def _key(L: torch.Tensor, bits: int) -> torch.Tensor:
    """kmap key of each group of levels ``L`` ``(..., n)`` (float32 integers): ``sum l_i << bits*i``, int64."""
    return (L.to(torch.int64) << torch.arange(0, bits * L.shape[-1], bits, device=L.device)).sum(-1)


def _on_grid(L: torch.Tensor, kmap: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Whether each group of levels ``L`` ``(..., n)`` is a grid point: ``(...)`` bool."""
    return kmap[_key(L, bits)] >= 0


@functools.lru_cache(maxsize=None)
def _device_tables(gguf_cls_name: str, nwant: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`_lattice`'s tables on ``device`` (built once per type and device) and what :func:`_snap` needs
    besides: ``(grid (G, n) int64, kmap (K,) int64, neighbours (K, P) int64, list lengths (K,) int64, grid values
    (n, G) float32)``."""
    grid, kmap, neigh = _lattice(gguf_cls_name, nwant)
    out = (grid, kmap, neigh, (neigh >= 0).sum(1), grid.T.astype(np.float32))
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in out)


class _Lattice2:
    """Grid tables of a 2-bit lattice type: ``grid_name`` (gguf-py class holding ``grid_hex``) and ``nwant`` (how
    many distinct neighbour distances ``iq2xs_init_impl`` / ``iq3xs_init_impl`` keep: 2, 1 for IQ2_S, 3 for IQ3_S)."""

    grid_name: str
    nwant: int

    @classmethod
    def _tables(cls, device):
        """:func:`_device_tables` of the type on ``device``."""
        return _device_tables(cls.grid_name, cls.nwant, torch.device(device))


class IQ2_XXS(_Lattice2, GGMLType, qtype=T.IQ2_XXS):
    """``quantize_iq2_xxs`` (importance weights required, as in llama.cpp)."""

    supports_imatrix = True
    chunk_elems = 1 << 17
    kmax = 3
    grid_name, nwant = "IQ2_XXS", 2

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is None:
            raise ValueError("IQ2_XXS: quantization needs importance weights (an imatrix), as in llama.cpp")
        tabs = cls._tables(blocks.device)
        nb = blocks.shape[0]
        NB = nb * 8
        bt = blocks.t()
        sig = div(seqsum(bt * bt), 256)                              # (nb,)
        xb = blocks.reshape(NB, 32)
        w = (qw.reshape(NB, 32) * sqrtf(sig.repeat_interleave(8)[:, None] + xb * xb))
        waux = sqrtf(w)
        xval, signs = _signs(xb.view(NB, 4, 8), w.view(NB, 4, 8))
        xv = xval.reshape(NB, 32)
        mx = xv[:, 0].clone()
        for i in range(1, 32):
            mx = torch.where(mx > xv[:, i], mx, xv[:, i])
        skip = mx < GROUP_MAX_EPS
        scale, _ = make_qp_quants(xv.t().contiguous(), cls.kmax + 1, w.t().contiguous())
        eff = scale * cls.kmax
        skip = skip | ~(eff > 0)
        safe_eff = torch.where(skip, torch.ones_like(eff), eff)
        waux_g = waux.view(NB, 4, 8)

        def sums(Lg):
            q = 2 * Lg.reshape(NB, 32) + 1
            wq = w * xv
            return seqsum((wq * q).t()), seqsum((w * q * q).t())

        best = torch.zeros_like(scale)
        L = torch.zeros(NB, 4, 8, dtype=torch.float32, device=blocks.device)
        for step in range(-6, 7):
            idv = div(np.float32(2 * cls.kmax - 1) + np.float32(step) * np.float32(0.1), safe_eff)
            this_scale = div(1, idv)
            Laux = nearest_int(np.float32(0.5) * (idv[:, None, None] * xval - 1)).clamp_(0, cls.kmax - 1)
            _, Laux = _snap(Laux, xval, waux_g, this_scale, tabs)
            sqx, sq2 = sums(Laux)
            upd = (sq2 > 0) & (sqx * sqx > best * sq2)
            scale = torch.where(upd, div(sqx, sq2), scale)
            best = torch.where(upd, scale * sqx, best)
            L = torch.where(upd[:, None, None], Laux, L)
        pos = scale > 0
        idv = torch.where(pos, div(1, torch.where(pos, scale, torch.ones_like(scale))), torch.zeros_like(scale))
        Lf = nearest_int(np.float32(0.5) * (idv[:, None, None] * xval - 1)).clamp_(0, cls.kmax - 1)
        _, Lf = _snap(Lf, xval, waux_g, scale, tabs)
        sqx, sq2 = sums(Lf)
        L = torch.where(pos[:, None, None], Lf, L)
        scale = torch.where(pos & (sq2 > 0), div(sqx, sq2), scale)
        negs = scale < 0
        scale = torch.where(negs, -scale, scale)
        signs = torch.where(negs[:, None], (~signs) & 127, signs)
        gi, _ = _snap(L, xval, waux_g, scale, tabs)                 # L is on the grid here: a plain lookup
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
        signs = torch.where(skip[:, None], torch.zeros_like(signs), signs)
        sc = scale.view(nb, 8)
        max_scale = sc.amax(1).clamp(min=0)
        empty = max_scale == 0
        d = div(torch.where(empty, torch.ones_like(max_scale), max_scale), 31.0)
        idd = div(1, d)
        ls = nearest_int(np.float32(0.5) * (idd[:, None] * sc - 1)).clamp_(0, 15).to(torch.int64)
        q0 = (gi.view(nb, 8, 4) << torch.tensor([0, 8, 16, 24], device=blocks.device)).sum(-1)
        q1 = (signs.view(nb, 8, 4) << torch.tensor([0, 7, 14, 21], device=blocks.device)).sum(-1) | (ls << 28)
        q = torch.stack([q0, q1], dim=-1).view(nb, 16)
        q = torch.where(empty[:, None], torch.zeros_like(q), q)
        qb = q.to(torch.int64).unsqueeze(-1) >> torch.tensor([0, 8, 16, 24], device=blocks.device)
        qs = (qb & 0xFF).to(torch.uint8).view(nb, 64)
        dd = torch.where(empty, torch.zeros_like(d), d)
        return torch.cat([fp16_bytes(dd), qs], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        grid = cls._tables(blocks.device)[0]
        nb = blocks.shape[0]
        d = bytes_fp16(blocks[:, :2])
        qb = blocks[:, 2:].to(torch.int64).view(nb, 8, 2, 4)
        u32 = (qb << torch.tensor([0, 8, 16, 24], device=blocks.device)).sum(-1)   # (nb, 8, 2)
        gi = (u32[..., 0:1] >> torch.tensor([0, 8, 16, 24], device=blocks.device)) & 0xFF  # (nb, 8, 4)
        s7 = (u32[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=blocks.device)) & 127
        bits = (s7.unsqueeze(-1) >> torch.arange(7, device=blocks.device)) & 1       # (nb, 8, 4, 7)
        parity = bits.sum(-1, keepdim=True) & 1
        sgn = torch.cat([bits, parity], dim=-1)
        vals = torch.tensor(gq.IQ2_XXS.grid_map, dtype=torch.float32, device=blocks.device)[(grid[gi] - 1) // 2]
        ls = (u32[..., 1] >> 28).to(torch.float32)
        db = (d[:, None] * (0.5 + ls)) * 0.25
        y = db[..., None, None] * vals * torch.where(sgn.bool(), -1.0, 1.0)
        return y.reshape(nb, 256)


class _Lattice16(_Lattice2):
    """The block search shared by IQ2_XS, IQ2_S (16-blocks of two 8-groups, ``quantize_row_iq2_xs_impl`` /
    ``quantize_row_iq2_s_impl``) and IQ3_XXS, IQ3_S (32-blocks of eight 4-groups, ``quantize_row_iq3_xxs_impl`` /
    ``quantize_row_iq3_s_impl``, see :mod:`.iq3`).

    Per block: element weights, signs, start scale ``max/(2*kmax-1)``, ``2*ntrial+1`` trial scales ``id = (2*kmax-1
    + tstep*is)/max`` (``is`` in -ntrial..ntrial), each group snapped to the grid (off-grid groups to their best
    listed neighbour), kept on a better ``sumqx^2/sumq2``; then the groups that were off the grid (all groups when
    ``redo_all``, IQ3_S, whose on-grid flags also start false) are requantized at the chosen scale, followed by a
    least-squares refit; a negative scale flips the signs. The types differ further in ``sigma2``
    (``sum(x^2)/256`` times ``sigma_mul``), the sign trick (``parity``: 7 bits + parity, or all 8 bits), ``eps``
    (skip a block whose largest magnitude is below it) and the weights without an imatrix (``plain_sigma``:
    ``sigma2/4 + x^2``, else ``x^2``).
    """

    kmax = 3
    bsize = 16
    ntrial, tstep = 9, 0.1
    redo_all = False
    plain_sigma = True
    sigma_mul: int
    parity: bool
    eps: float

    @classmethod
    def _search(cls, blocks, qw):
        """``(grid index (nb*nblk, g) int64, signs (nb*nblk, bsize/8) int64, scale (nb, nblk) float32 >= 0, 0 on
        skipped blocks, skip (nb, nblk) bool)`` for ``blocks`` ``(nb, 256)`` float32 and importance weights ``qw``
        (same shape) or ``None``; ``nblk = 256/bsize``, ``g = bsize/n`` groups of ``n`` elements a block."""
        tabs = cls._tables(blocks.device)
        bits = _key_bits(cls.grid_name)
        n = tabs[0].shape[1]
        dev = blocks.device
        nb = blocks.shape[0]
        bs = cls.bsize
        nblk = 256 // bs
        NB = nb * nblk
        ng, n8 = bs // n, bs // 8
        bt = blocks.t()
        sig = div(cls.sigma_mul * seqsum(bt * bt), 256).repeat_interleave(nblk)[:, None]
        xb = blocks.reshape(NB, bs)
        if qw is not None:
            w = qw.reshape(NB, bs) * sqrtf(sig + xb * xb)
        elif cls.plain_sigma:
            w = np.float32(0.25) * sig + xb * xb
        else:
            w = xb * xb
        waux_g = sqrtf(w).view(NB, ng, n)
        xg = xb.view(NB, n8, 8)
        if cls.parity:
            xval, signs = _signs(xg, w.view(NB, n8, 8))
        else:
            neg = ~(xg >= 0)
            xval = torch.where(neg, -xg, xg)
            signs = (neg.to(torch.int64) << torch.arange(8, device=dev)).sum(-1)
        mask = 127 if cls.parity else 255
        xv = xval.reshape(NB, bs)
        xval = xval.reshape(NB, ng, n)
        mx = xv[:, 0].clone()
        for i in range(1, bs):
            mx = torch.where(mx > xv[:, i], mx, xv[:, i])
        skip = mx < np.float32(cls.eps)
        mxs = torch.where(skip, torch.ones_like(mx), mx)
        wx = w * xv
        top = cls.kmax - 1

        def levels(idv):
            # a subnormal max makes id infinite: C's nearest_int gives -4194304 there, level 0
            return nearest_int_c(np.float32(0.5) * (idv[:, None, None] * xval - 1)).clamp_(0, top)

        def sums(Lg):
            q = 2 * Lg.reshape(NB, bs) + 1
            return seqsum((wx * q).t()), seqsum((w * q * q).t())

        best = torch.zeros_like(mx)
        scale = div(mxs, 2 * cls.kmax - 1)
        L = torch.zeros(NB, ng, n, dtype=torch.float32, device=dev)
        ongrid = torch.full((NB, ng), not cls.redo_all, dtype=torch.bool, device=dev)
        for step in range(-cls.ntrial, cls.ntrial + 1):
            idv = div(np.float32(2 * cls.kmax - 1) + np.float32(step) * np.float32(cls.tstep), mxs)
            this_scale = div(1, idv)
            Laux = levels(idv)
            og = _on_grid(Laux, tabs[1], bits)
            _, Laux = _snap(Laux, xval, waux_g, this_scale, tabs, bits)
            sqx, sq2 = sums(Laux)
            upd = (sq2 > 0) & (sqx * sqx > best * sq2)
            scale = torch.where(upd, div(sqx, sq2), scale)
            best = torch.where(upd, scale * sqx, best)
            L = torch.where(upd[:, None, None], Laux, L)
            ongrid = torch.where(upd[:, None], og, ongrid)
        redo = (~ongrid).any(1) & (scale > 0)
        rs = torch.where(redo, scale, torch.ones_like(scale))
        Lf = levels(div(1, rs))
        _, Lf = _snap(Lf, xval, waux_g, rs, tabs, bits)
        which = ~ongrid | cls.redo_all
        L = torch.where((redo[:, None] & which)[..., None], Lf, L)
        sqx, sq2 = sums(L)
        scale = torch.where(redo & (sq2 > 0), div(sqx, sq2), scale)
        negs = scale < 0
        scale = torch.where(negs, -scale, scale)
        signs = torch.where(negs[:, None], (~signs) & mask, signs)
        gi, _ = _snap(L, xval, waux_g, scale, tabs, bits)           # L is on the grid here: a plain lookup
        gi = torch.where(skip[:, None], torch.zeros_like(gi), gi)
        signs = torch.where(skip[:, None], torch.zeros_like(signs), signs)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
        return gi, signs, scale.view(nb, nblk), skip.view(nb, nblk)

    @staticmethod
    def _scales(sc, dmul=None):
        """``(d fp16 bytes (nb, 2), block scales (nb, nblk) int64 in 0..15, empty (nb,) bool)``: ``d = max_scale/31``
        (stored times ``dmul`` when given), block scale ``clamp(nearest_int((scale/d - 1)/2), 0, 15)``; an all-zero
        super-block stores ``d = 0`` and zero scales."""
        max_scale = sc.amax(1).clamp(min=0)
        empty = max_scale == 0
        d = div(torch.where(empty, torch.ones_like(max_scale), max_scale), 31.0)
        idd = div(1, d)
        ls = nearest_int_c(np.float32(0.5) * (idd[:, None] * sc - 1)).clamp_(0, 15).to(torch.int64)
        ls = torch.where(empty[:, None], torch.zeros_like(ls), ls)
        dst = d if dmul is None else d * np.float32(dmul)
        dd = torch.where(empty, torch.zeros_like(d), dst)
        return fp16_bytes(dd), ls, empty

    @staticmethod
    def _nibbles(ls):
        """Block scales ``(nb, nblk)`` packed two a byte, low nibble first: ``(nb, nblk/2)`` uint8."""
        ls = ls.view(ls.shape[0], -1, 2)
        return (ls[..., 0] | (ls[..., 1] << 4)).to(torch.uint8)


class IQ2_XS(_Lattice16, GGMLType, qtype=T.IQ2_XS):
    """``quantize_iq2_xs``: 2.3125 bpw, 16-blocks of two 8-groups on the 512-point grid, signs with the IQ2_XXS
    parity trick (importance weights required, as in llama.cpp). The search is :class:`_Lattice16`'s.

    Block layout (``ggml-common.h``)::

        IQ2_XS  d | qs: 32 x u16 (9-bit grid index | 7 sign bits << 9) | scales: 16 x 4 bits   74 B
    """

    supports_imatrix = True
    chunk_elems = 1 << 17
    grid_name, nwant = "IQ2_XS", 2
    sigma_mul, parity, eps = 1, True, GROUP_MAX_EPS

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is None:
            raise ValueError("IQ2_XS: quantization needs importance weights (an imatrix), as in llama.cpp")
        nb = blocks.shape[0]
        gi, signs, sc, _ = cls._search(blocks, qw)
        dd, ls, empty = cls._scales(sc)
        scb = cls._nibbles(ls)
        q2 = (gi | (signs << 9)).view(nb, 32)
        qs = torch.stack([q2 & 0xFF, q2 >> 8], dim=-1).view(nb, 64)
        qs = torch.where(empty[:, None], torch.zeros_like(qs), qs).to(torch.uint8)
        return torch.cat([dd, qs, scb], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        grid = cls._tables(blocks.device)[0]
        nb = blocks.shape[0]
        d = bytes_fp16(blocks[:, :2])
        qb = blocks[:, 2:66].to(torch.int64).view(nb, 32, 2)
        q2 = (qb[..., 0] | (qb[..., 1] << 8)).view(nb, 16, 2)
        gi = q2 & 511
        s7 = q2 >> 9
        bits = (s7.unsqueeze(-1) >> torch.arange(7, device=blocks.device)) & 1       # (nb, 16, 2, 7)
        sgn = torch.cat([bits, bits.sum(-1, keepdim=True) & 1], dim=-1)
        vals = torch.tensor(gq.IQ2_XS.grid_map, dtype=torch.float32, device=blocks.device)[(grid[gi] - 1) // 2]
        scb = blocks[:, 66:74].to(torch.int64)
        ls = torch.stack([scb & 15, scb >> 4], dim=-1).view(nb, 16).to(torch.float32)
        db = (d[:, None] * (0.5 + ls)) * 0.25
        y = db[..., None, None] * vals * torch.where(sgn.bool(), -1.0, 1.0)
        return y.reshape(nb, 256)


class IQ2_S(_Lattice16, GGMLType, qtype=T.IQ2_S):
    """``quantize_iq2_s``: 2.5625 bpw, 16-blocks of two 8-groups on the 1024-point grid, all 8 signs stored
    (no parity trick), ``sigma2 = 2*sum(x^2)/256``, neighbour lists of the single nearest distance, skip below
    ``1e-8``, ``d`` stored times 0.9875. Without importance weights ``w = sigma2/4 + x^2``, as in llama.cpp.

    Block layout (``ggml-common.h``)::

        IQ2_S  d | qs: 32 low bytes of grid indices, 32 sign bytes | qh: 2 high index bits per group | scales  82 B
    """

    supports_imatrix = True
    chunk_elems = 1 << 17
    grid_name, nwant = "IQ2_S", 1
    sigma_mul, parity, eps = 2, False, 1e-8

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        nb = blocks.shape[0]
        gi, signs, sc, _ = cls._search(blocks, qw)
        dd, ls, empty = cls._scales(sc, dmul=0.9875)
        scb = cls._nibbles(ls)
        gi = gi.view(nb, 32)
        qh = ((gi >> 8).view(nb, 8, 4) << torch.tensor([0, 2, 4, 6], device=blocks.device)).sum(-1)
        body = torch.cat([gi & 0xFF, signs.view(nb, 32), qh], dim=1).to(torch.uint8)
        return torch.cat([dd, body, scb], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        grid = cls._tables(blocks.device)[0]
        nb = blocks.shape[0]
        dev = blocks.device
        d = bytes_fp16(blocks[:, :2])
        b = blocks.to(torch.int64)
        qh = b[:, 66:74]
        hi = ((qh[..., None] >> torch.tensor([0, 2, 4, 6], device=dev)) & 3).view(nb, 32)
        gi = (b[:, 2:34] | (hi << 8)).view(nb, 16, 2)
        sgn = (b[:, 34:66].view(nb, 16, 2, 1) >> torch.arange(8, device=dev)) & 1
        vals = torch.tensor(gq.IQ2_S.grid_map, dtype=torch.float32, device=dev)[(grid[gi] - 1) // 2]
        scb = b[:, 74:82]
        ls = torch.stack([scb & 15, scb >> 4], dim=-1).view(nb, 16).to(torch.float32)
        db = (d[:, None] * (0.5 + ls)) * 0.25
        y = db[..., None, None] * vals * torch.where(sgn.bool(), -1.0, 1.0)
        return y.reshape(nb, 256)
