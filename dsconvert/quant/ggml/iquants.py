"""Non-linear 4-bit types IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks).

Both map each value to the nearest of 16 fixed levels ``kvalues_iq4nl`` (int8, ``ggml-common.h``) times a block
scale; the scale is fitted by weighted least squares over 15 trial scales. ``ggml_quantize_chunk`` always runs
``quantize_row_iq4_nl_impl`` with ``ntry = 7`` for these types (with or without an imatrix; without one the
element weights are ``x*x``), and so does this module, operation by operation in float32:

* ``sigma2 = 2 * sum(x^2) / super_block_size`` (summed in C order); weights ``qw * sqrtf(sigma2 + x^2)`` with an
  imatrix, ``x^2`` without;
* per 32-block: ``d = -max/values[0]`` (``max`` the signed value of largest magnitude, first wins), levels by
  ``best_index_int8`` (the midpoint binary search: the level index is the number of midpoints
  ``values[k-1] + values[k] <= 2*x``), then the trial scales ``(itry + values[0]) / max`` for ``itry`` in
  ``-7..7``, kept when ``sumqx^2 > best * sumq2``; blocks with ``amax < 1e-15`` get scale 0;
* IQ4_NL: ``d`` stored as fp16, levels recomputed with ``1/d`` (the float32 scale, not the fp16 one);
* IQ4_XS: a super-block scale ``d = -max_scale/32`` (fp16), 6-bit sub-block scales
  ``l = clamp(nearest_int(scale/d), -32, 31) + 32`` (low nibbles in ``scales_l``, high 2 bits in ``scales_h``),
  levels recomputed with ``1/(d*(l-32))`` (float32 ``d``).

Block layouts (``ggml-common.h``)::

    IQ4_NL  d | qs[16]  (low nibble element j, high nibble j+16)                     18 B
    IQ4_XS  d | scales_h u16 | scales_l[4] | qs[128]  (qs as IQ4_NL per 32)        136 B

Source: llama.cpp ``ggml/src/ggml-quants.c`` (``quantize_row_iq4_nl_impl``, ``quantize_iq4_nl``,
``quantize_iq4_xs``, ``dequantize_row_iq4_nl``/``_xs``); docs/gguf-deepseek2.md §6.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from ._ops import GROUP_MAX_EPS, bytes_fp16, div, first_absmax, fp16_bytes, fp16_round, nearest_int, seqsum, sqrtf
from .base import GGMLType

#: ``kvalues_iq4nl`` (ggml-common.h)
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.tensor(KVALUES, dtype=torch.float32, device=device)
    mids = torch.tensor([KVALUES[k - 1] + KVALUES[k] for k in range(1, 16)], dtype=torch.float32, device=device)
    return vals, mids


def best_index(al: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, al)`` elementwise: int64 level indices 0..15."""
    x2 = al + al
    return (x2.unsqueeze(-1) >= mids).sum(-1)


def _fit_blocks(xb: torch.Tensor, w: torch.Tensor, vals: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Scale of each 32-block: ``xb``, ``w`` ``(n_blocks, 32)`` float32 -> ``(n_blocks,)`` float32 (0 for blocks with
    ``amax < 1e-15``); the trial loop of ``quantize_row_iq4_nl_impl``."""
    mx, amax = first_absmax(xb.t())
    empty = amax < GROUP_MAX_EPS
    v0 = float(KVALUES[0])
    safe = torch.where(empty, torch.ones_like(mx), mx)

    def sums(iscale):
        q = vals[best_index(iscale[:, None] * xb, mids)]
        wq = w * q
        return seqsum((wq * xb).t()), seqsum((wq * q).t())

    d = div(-safe, v0)
    sumqx, sumq2 = sums(div(1, d))
    d = torch.where(sumq2 > 0, div(sumqx, sumq2), torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sqx, sq2 = sums(div(float(itry + KVALUES[0]), safe))
        upd = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(upd, div(sqx, sq2), d)
        best = torch.where(upd, d * sqx, best)
    return torch.where(empty, torch.zeros_like(d), d)


def _weights(blocks: torch.Tensor, qw: torch.Tensor | None, n_super: int) -> torch.Tensor:
    """Element weights, same shape as ``blocks`` ``(nb, n_super)``."""
    if qw is None:
        return blocks * blocks
    sigma2 = seqsum((blocks * blocks).t()) * (2.0 / n_super)  # sigma2 *= 2.f/super_block_size (exact)
    return qw * sqrtf(sigma2[:, None] + blocks * blocks)


def _pack(L: torch.Tensor) -> torch.Tensor:
    """``q4[16*i + j] = L[32*i + j] | L[32*i + 16 + j] << 4``: ``(nb, n)`` level indices -> ``(nb, n/2)`` uint8."""
    nb, n = L.shape
    Lv = L.to(torch.uint8).view(nb, n // 32, 2, 16)
    return (Lv[:, :, 0] | (Lv[:, :, 1] << 4)).reshape(nb, n // 2)


def _unpack(qs: torch.Tensor) -> torch.Tensor:
    nb, half = qs.shape
    q = qs.view(nb, half // 16, 1, 16)
    return torch.cat([q & 0xF, q >> 4], dim=2).reshape(nb, half * 2).long()


class IQ4_NL(GGMLType, qtype=T.IQ4_NL):
    """``quantize_iq4_nl``: 32-element blocks, fp16 scale, 16 non-linear levels."""

    supports_imatrix = True
    chunk_elems = 1 << 18

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        vals, mids = _tables(blocks.device)
        d = _fit_blocks(blocks, _weights(blocks, qw, 32), vals, mids)
        ids = torch.where(d != 0, div(1, d), torch.zeros_like(d))
        L = best_index(ids[:, None] * blocks, mids)
        return torch.cat([fp16_bytes(d), _pack(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        vals, _ = _tables(blocks.device)
        d = bytes_fp16(blocks[:, :2])
        return d[:, None] * vals[_unpack(blocks[:, 2:])]


class IQ4_XS(GGMLType, qtype=T.IQ4_XS):
    """``quantize_iq4_xs``: 256-element super-blocks of eight 32-blocks, 6-bit sub-block scales."""

    supports_imatrix = True
    chunk_elems = 1 << 18

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        vals, mids = _tables(blocks.device)
        nb = blocks.shape[0]
        w = _weights(blocks, qw, 256)
        xb = blocks.reshape(nb * 8, 32)
        scales = _fit_blocks(xb, w.reshape(nb * 8, 32), vals, mids).view(nb, 8)
        max_scale, _ = first_absmax(scales.t())
        d = div(-max_scale, 32.0)
        idv = torch.where(d != 0, div(1, d), torch.zeros_like(d))
        l = nearest_int(idv[:, None] * scales).clamp_(-32, 31)
        dl = d[:, None] * l
        idl = torch.where(dl != 0, div(1, dl), torch.zeros_like(dl))
        L = best_index(idl.reshape(-1, 1) * xb, mids).view(nb, 256)
        lu = (l + 32).to(torch.int32)
        lo = (lu & 0xF).to(torch.uint8).view(nb, 4, 2)
        scales_l = lo[:, :, 0] | (lo[:, :, 1] << 4)
        hi = (lu >> 4).to(torch.int32)
        sh = torch.zeros(nb, dtype=torch.int32, device=blocks.device)
        for ib in range(8):
            sh |= hi[:, ib] << (2 * ib)
        scales_h = torch.stack([sh & 0xFF, sh >> 8], dim=1).to(torch.uint8)
        return torch.cat([fp16_bytes(fp16_round(d)), scales_h, scales_l, _pack(L)], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        vals, _ = _tables(blocks.device)
        nb = blocks.shape[0]
        d = bytes_fp16(blocks[:, :2])
        sh = blocks[:, 2].to(torch.int32) | (blocks[:, 3].to(torch.int32) << 8)
        sl = blocks[:, 4:8].to(torch.int32)
        ib = torch.arange(8, device=blocks.device)
        low = (sl[:, ib // 2] >> (4 * (ib % 2))) & 0xF
        high = (sh[:, None] >> (2 * ib)) & 3
        dl = d[:, None] * ((low | (high << 4)) - 32).to(torch.float32)  # (nb, 8)
        q = vals[_unpack(blocks[:, 8:])].view(nb, 8, 32)
        return (dl[:, :, None] * q).view(nb, 256)
