"""IQ3_XXS and IQ3_S: 3-bit lattice quantizers (3.0625 and 3.4375 bits per weight).

Every group of 4 magnitudes is coded by one point of a grid of 4-tuples (levels ``2l+1``, ``l`` in 0..7): 256
points for IQ3_XXS, 512 for IQ3_S. A 32-block (eight 4-groups) gets a 4-bit scale under an fp16 super-block scale.
The search is :class:`.iq2._Lattice16`'s, configured as llama.cpp's ``quantize_row_iq3_xxs_impl`` /
``quantize_row_iq3_s_impl`` (both ``kMaxQ = 8``, ``sigma2 = 2*sum(x^2)/256``, start scale ``max/15``):

* IQ3_XXS: signs with the parity trick of IQ2_XXS (7 bits per 8-group, the odd negative flipped onto the element
  of least ``w*x^2``), 31 trial scales ``id = (15 + 0.2*is)/max`` (``is`` in -15..15), blocks whose largest
  magnitude is below ``1e-8`` skipped, only off-grid groups requantized at the chosen scale, ``d`` stored as
  ``max_scale/31 * 1.0125``;
* IQ3_S: all 8 sign bits, 19 trial scales (``is`` in -9..9), only all-zero blocks skipped, every group requantized
  at the chosen scale (the on-grid flags start false), ``d`` stored as ``max_scale/31 * 1.033``. A skipped block
  does not advance llama.cpp's ``qs``/``signs`` pointers, so the blocks after it are written that many slots
  earlier and the tail of those arrays stays zero (``qh`` and the scales stay at the block's own position).

Both run without importance weights (then ``w = x^2``), as in llama.cpp. The grid points are gguf-py's tables for
the types (the ``kgrid_256`` / ``kgrid_512`` of ``iq3xs_init_impl``), the neighbour lists are rebuilt as
``iq3xs_init_impl`` builds them: every grid point at the 2 (IQ3_XXS) or 3 (IQ3_S) smallest squared distances.

Block layouts (``ggml-common.h``)::

    IQ3_XXS  d | qs: 64 grid indices (bytes) | 8 x u32: 4 x 7 sign bits, scale in the top 4 bits      98 B
    IQ3_S    d | qs: 64 low index bytes | qh: 8 bytes (9th index bit per group) | signs: 32 | scales: 4  110 B

Source: llama.cpp ``ggml/src/ggml-quants.c`` (``iq3xs_init_impl``, ``iq3_find_best_neighbour``,
``quantize_row_iq3_xxs_impl``, ``quantize_row_iq3_s_impl``, ``dequantize_row_iq3_xxs``, ``dequantize_row_iq3_s``).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ._ops import bytes_fp16
from .base import GGMLType
from .iq2 import _Lattice16


class _Lattice3(_Lattice16):
    """Common settings of the IQ3 types (32-blocks of eight 4-groups, 8 levels, weights ``x^2`` without imatrix)."""

    kmax = 8
    bsize = 32
    tstep = 0.2
    sigma_mul = 2
    plain_sigma = False

    @classmethod
    def _values(cls, gi, dev):
        """Grid values ``(..., 4)`` float32 of grid indices ``gi`` as the dequantizers use them (gguf-py's map)."""
        grid = cls._tables(dev)[0]
        vals = torch.tensor(getattr(gq, cls.grid_name).grid_map, dtype=torch.float32, device=dev)
        return vals[(grid[gi] - 1) // 2]

    @classmethod
    def _unpack(cls, blocks):
        """``(d, b)``: the fp16 super-block scales ``(nb,)`` float32 and the block bytes as int64 ``(nb, size)``."""
        return bytes_fp16(blocks[:, :2]), blocks.to(torch.int64)

    @classmethod
    def _signed(cls, db, gi, sgn):
        """Dequantized ``(nb, 256)`` float32: block scales ``db (nb, 8)`` x grid values of ``gi (nb, 8, 8)`` with
        the sign bits ``sgn (nb, 8, 8, 4)`` (1 = negative)."""
        y = db[..., None, None] * cls._values(gi, db.device) * torch.where(sgn.bool(), -1.0, 1.0)
        return y.reshape(db.shape[0], 256)


class IQ3_XXS(_Lattice3, GGMLType, qtype=T.IQ3_XXS):
    """``quantize_iq3_xxs``: 3.0625 bpw, importance weights optional."""

    supports_imatrix = True
    chunk_elems = 1 << 17
    grid_name, nwant = "IQ3_XXS", 2
    ntrial, parity, eps = 15, True, 1e-8

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        dev = blocks.device
        nb = blocks.shape[0]
        gi, signs, sc, _ = cls._search(blocks, qw)
        dd, ls, empty = cls._scales(sc, dmul=1.0125)
        ss = (signs.view(nb, 8, 4) << torch.tensor([0, 7, 14, 21], device=dev)).sum(-1) | (ls << 28)
        sb = ((ss.unsqueeze(-1) >> torch.tensor([0, 8, 16, 24], device=dev)) & 0xFF).view(nb, 32)
        body = torch.cat([gi.view(nb, 64), sb], dim=1)
        body = torch.where(empty[:, None], torch.zeros_like(body), body).to(torch.uint8)
        return torch.cat([dd, body], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        dev = blocks.device
        nb = blocks.shape[0]
        d, b = cls._unpack(blocks)
        gi = b[:, 2:66].view(nb, 8, 8)
        u32 = (b[:, 66:98].view(nb, 8, 4) << torch.tensor([0, 8, 16, 24], device=dev)).sum(-1)      # (nb, 8)
        s7 = (u32[..., None] >> torch.tensor([0, 7, 14, 21], device=dev)) & 127                   # (nb, 8, 4)
        bits = (s7.unsqueeze(-1) >> torch.arange(7, device=dev)) & 1                              # (nb, 8, 4, 7)
        sgn = torch.cat([bits, bits.sum(-1, keepdim=True) & 1], dim=-1).view(nb, 8, 8, 4)
        ls = (u32 >> 28).to(torch.float32)
        return cls._signed((d[:, None] * (0.5 + ls)) * 0.5, gi, sgn)


class IQ3_S(_Lattice3, GGMLType, qtype=T.IQ3_S):
    """``quantize_iq3_s``: 3.4375 bpw, importance weights optional."""

    supports_imatrix = True
    chunk_elems = 1 << 17
    grid_name, nwant = "IQ3_S", 3
    ntrial, parity, redo_all = 9, False, True
    eps = float(np.nextafter(np.float32(0), np.float32(1)))   # skip only ``max == 0``

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        dev = blocks.device
        nb = blocks.shape[0]
        gi, signs, sc, skip = cls._search(blocks, qw)
        dd, ls, _ = cls._scales(sc, dmul=1.033)
        gi = gi.view(nb, 8, 8)
        qh = ((gi >> 8) << torch.arange(8, device=dev)).sum(-1)                                    # (nb, 8)
        # skipped blocks (all zero here) leave no slot in qs / signs: the later blocks move up
        order = torch.argsort(skip.to(torch.int8), dim=1, stable=True)
        lo = (gi & 0xFF).gather(1, order[..., None].expand(nb, 8, 8)).view(nb, 64)
        sg = signs.view(nb, 8, 4).gather(1, order[..., None].expand(nb, 8, 4)).view(nb, 32)
        body = torch.cat([lo, qh, sg, cls._nibbles(ls).to(torch.int64)], dim=1).to(torch.uint8)
        return torch.cat([dd, body], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        dev = blocks.device
        nb = blocks.shape[0]
        d, b = cls._unpack(blocks)
        hi = (b[:, 66:74, None] >> torch.arange(8, device=dev)) & 1                               # (nb, 8, 8)
        gi = b[:, 2:66].view(nb, 8, 8) | (hi << 8)
        sgn = ((b[:, 74:106].view(nb, 8, 4, 1) >> torch.arange(8, device=dev)) & 1).view(nb, 8, 8, 4)
        scb = b[:, 106:110]
        ls = torch.stack([scb & 15, scb >> 4], dim=-1).view(nb, 8).to(torch.float32)
        return cls._signed(d[:, None] * (1 + 2 * ls), gi, sgn)
