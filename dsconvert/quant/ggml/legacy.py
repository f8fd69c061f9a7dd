"""Legacy 32-element block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml-quants.c ``quantize_row_*_ref``).

All five are byte-identical to llama.cpp (and to gguf-py's numpy quantizers). Block layouts
(``ggml-common.h``; fp16 little-endian)::

    Q8_0  d | qs[32] int8                         x = q*d
    Q4_0  d | qs[16]   (lo nibble j, hi j+16)     x = (q-8)*d
    Q4_1  d | m | qs[16]                          x = q*d + m
    Q5_0  d | qh u32 | qs[16]                     x = (q-16)*d, bit 4 of q_j in qh bit j
    Q5_1  d | m | qh u32 | qs[16]                 x = q*d + m
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from ._ops import bits_to_bytes, bytes_fp16, bytes_to_bits, div, first_absmax, fp16_bytes, pack_nibbles, roundf, sqrtf
from .base import GGMLType
from .kquants import make_qkx2_quants, make_qx_quants


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, div(1, d), torch.zeros_like(d))


def _c_minmax(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``min``/``max`` of each block as C's ``if (v < min) min = v;`` loops find them.

    The values equal ``amin``/``amax``; only the sign of a zero can differ: C keeps the first zero
    it meets (``-0.0 < 0.0`` is false), torch may return either.
    """
    mn = blocks.amin(1)
    mx = blocks.amax(1)
    is0 = blocks == 0
    if bool(is0.any()):
        first0 = blocks.gather(1, is0.to(torch.uint8).argmax(1, keepdim=True))[:, 0]
        mn = torch.where(mn == 0, first0, mn)
        mx = torch.where(mx == 0, first0, mx)
    return mn, mx


def _impl_weights(blocks: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-major ``(32, nb)`` values and their ``_impl`` weights ``qw * sqrtf(sigma2 + x*x)``, where
    ``sigma2`` is ``sum(x^2)/n_per_row`` of the block's row (``quantize_row_q{4,5}_{0,1}_impl``)."""
    xt = blocks.t().contiguous()
    return xt, qw.t() * sqrtf(sigma2.view(1, -1) + xt * xt)


def _sym_impl(blocks, qw, sigma2, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0 with an imatrix: ``d, L = make_qx_quants(32, nmax, x, rmse_type=1, weights)``; ``L`` ``(nb, 32)``."""
    xt, wt = _impl_weights(blocks, qw, sigma2)
    d, L = make_qx_quants(xt, nmax, wt)
    return d, L.t()


def _asym_impl(blocks, qw, sigma2, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1 with an imatrix: ``make_qkx3_quants(32, nmax, x, weights, -0.9, 0.05, 36)``; returns
    ``(d, m, L)`` with ``m = -the_min`` (the block minimum, stored as fp16) and ``L`` ``(nb, 32)``."""
    xt, wt = _impl_weights(blocks, qw, sigma2)
    d, the_min, L = make_qkx2_quants(xt, wt, nmax, -0.9, 0.05, 36, False)
    return d, -the_min, L.t()


def _qh_bytes(q: torch.Tensor) -> torch.Tensor:
    """5-bit quants ``(nb, 32)`` -> qh (``(nb, 4)`` uint8, bit j = bit 4 of q[j], little-endian u32)."""
    return bits_to_bytes((q.to(torch.uint8) >> 4) & 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``(nb, 16)`` uint8 -> ``(nb, 32)`` uint8: low nibbles are elements 0-15, high nibbles 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


class Q8_0(GGMLType, qtype=T.Q8_0):
    """``quantize_row_q8_0_ref``: ``d = amax/127``, ``q = roundf(x * (1/d))`` (half away from zero).

    llama.cpp ignores the imatrix for Q8_0 (``quantize_q8_0``), and so does this class.
    """

    ignores_imatrix = True
    # 64K-element chunks: the few full-size temporaries stay in cache and are reused by the allocator
    chunk_elems = 1 << 16

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        # amax of |x| as max(max, -min); abs() turns a -0.0 (all-zero block) into C's +0.0
        amax = torch.maximum(blocks.amax(1), blocks.amin(1).neg_()).abs_()
        d = div(amax, 127)
        q = roundf(blocks * _inv(d)[:, None])
        out = torch.empty((blocks.shape[0], cls.type_size), dtype=torch.uint8, device=blocks.device)
        out[:, :2] = fp16_bytes(d)
        out[:, 2:].view(torch.int8).copy_(q)
        return out

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = bytes_fp16(blocks[:, :2])
        return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d[:, None]


class Q4_0(GGMLType, qtype=T.Q4_0):
    """``quantize_row_q4_0_ref``: ``d = max/-8`` (signed max-|x| value), ``q = min(15, (int8)(x/d + 8.5))``.
    With an imatrix: ``quantize_row_q4_0_impl`` (a weighted ``make_qx_quants`` fit)."""

    supports_imatrix = needs_row_sigma2 = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is not None:
            d, q = _sym_impl(blocks, qw, sigma2, 8)
            return torch.cat([fp16_bytes(d), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)
        mx, _ = first_absmax(blocks.t())
        d = div(mx, -8)
        q = torch.trunc(blocks * _inv(d)[:, None] + 8.5).clamp(max=15)
        return torch.cat([fp16_bytes(d), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = bytes_fp16(blocks[:, :2])
        q = _nibbles(blocks[:, 2:]).to(torch.int32) - 8
        return q.to(torch.float32) * d[:, None]


class Q4_1(GGMLType, qtype=T.Q4_1):
    """``quantize_row_q4_1_ref``: ``d = (max-min)/15``, ``m = min``, ``q = min(15, (int8)((x-min)/d + 0.5))``.
    With an imatrix: ``quantize_row_q4_1_impl`` (a weighted ``make_qkx3_quants`` fit)."""

    supports_imatrix = needs_row_sigma2 = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is not None:
            d, m, q = _asym_impl(blocks, qw, sigma2, 15)
            return torch.cat([fp16_bytes(d), fp16_bytes(m), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)
        mn, mx = _c_minmax(blocks)
        d = div(mx - mn, 15)
        q = torch.trunc((blocks - mn[:, None]) * _inv(d)[:, None] + 0.5).clamp(max=15)
        return torch.cat([fp16_bytes(d), fp16_bytes(mn), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = bytes_fp16(blocks[:, :2])
        m = bytes_fp16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 4:]).to(torch.float32)
        return q * d[:, None] + m[:, None]


class Q5_0(GGMLType, qtype=T.Q5_0):
    """``quantize_row_q5_0_ref``: ``d = max/-16``, ``q = min(31, (int8)(x/d + 16.5))``.
    With an imatrix: ``quantize_row_q5_0_impl`` (a weighted ``make_qx_quants`` fit)."""

    supports_imatrix = needs_row_sigma2 = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is not None:
            d, q = _sym_impl(blocks, qw, sigma2, 16)
            return torch.cat([fp16_bytes(d), _qh_bytes(q), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)
        mx, _ = first_absmax(blocks.t())
        d = div(mx, -16)
        q = torch.trunc(blocks * _inv(d)[:, None] + 16.5).clamp(max=31)
        return torch.cat([fp16_bytes(d), _qh_bytes(q), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = bytes_fp16(blocks[:, :2])
        qh = bytes_to_bits(blocks[:, 2:6], 32)
        q = (_nibbles(blocks[:, 6:]) | (qh << 4)).to(torch.int32) - 16
        return q.to(torch.float32) * d[:, None]


class Q5_1(GGMLType, qtype=T.Q5_1):
    """``quantize_row_q5_1_ref``: ``d = (max-min)/31``, ``m = min``, ``q = (uint8)((x-min)/d + 0.5)``.
    With an imatrix: ``quantize_row_q5_1_impl`` (a weighted ``make_qkx3_quants`` fit)."""

    supports_imatrix = needs_row_sigma2 = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        if qw is not None:
            d, m, q = _asym_impl(blocks, qw, sigma2, 31)
            return torch.cat([fp16_bytes(d), fp16_bytes(m), _qh_bytes(q), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)
        mn, mx = _c_minmax(blocks)
        d = div(mx - mn, 31)
        q = torch.trunc((blocks - mn[:, None]) * _inv(d)[:, None] + 0.5)
        return torch.cat([fp16_bytes(d), fp16_bytes(mn), _qh_bytes(q), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        d = bytes_fp16(blocks[:, :2])
        m = bytes_fp16(blocks[:, 2:4])
        qh = bytes_to_bits(blocks[:, 4:8], 32)
        q = (_nibbles(blocks[:, 8:]) | (qh << 4)).to(torch.float32)
        return q * d[:, None] + m[:, None]
