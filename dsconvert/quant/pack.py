"""Bit packing of 4/8-bit integers into int32 words, and the exact inverses.

All packers here are LSB-first: element ``i`` of a word occupies bits ``[i*b, (i+1)*b)``. Only bit
widths dividing 32 are supported (4 and 8 in practice), so no value straddles a word and the
compressed-tensors "dense" packing of #715 coincides with the word-aligned one.

Layouts (``q`` is ``[M, N]``, M = out_features, N = in_features; on-disk orientation noted):

======================  ==========================  ===============================================
function                 packs                      order inside a word
======================  ==========================  ===============================================
pack_int32_rows_lsb     along ``packed_dim``        sequential; signed values offset by +2^(b-1)
                        (compressed-tensors)        (``weight_packed`` dim 1, ``weight_zero_point`` dim 0)
pack_awq_gemm           ``[N, M]`` along M          AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
pack_gptq_qweight       ``[N, M]`` along N          sequential: word r, slot j = q[r * 32/b + j, n]
pack_gptq_qzeros        ``[G, M]`` along M          sequential; v1 stores zero - 1, v2 stores zero
======================  ==========================  ===============================================

Words are assembled as their four little-endian bytes (4-bit: two values per byte, ``lo | hi << 4``; 8-bit:
the values themselves) and the byte tensor is reinterpreted as int32: the same integer as
``sum(v_i << (i * b))`` wrapped to two's complement, with uint8 work only (no int64 words). On a big-endian
host the words are built arithmetically in int64 instead. Results are identical on CPU and CUDA. Golden words
(docs/int-formats.md): AWQ columns 0..7 = 0..7 -> ``0x75316420``;
GPTQ v1 symmetric 4-bit qzeros -> ``0x77777777``; compressed-tensors row [-8, -7, 0, 1, 2, 3, 6, 7]
-> ``0xfeba9810``.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

__all__ = [
    "AWQ_PACK_ORDER",
    "AWQ_UNPACK_ORDER",
    "pack_int32_lsb",
    "unpack_int32_lsb",
    "pack_int32_rows_lsb",
    "unpack_int32_rows_lsb",
    "pack_awq_gemm",
    "unpack_awq_gemm",
    "pack_gptq_qweight",
    "unpack_gptq_qweight",
    "pack_gptq_qzeros",
    "unpack_gptq_qzeros",
    "word_to_u32",
]

# Source: AutoAWQ awq/modules/linear/gemm.py::WQLinear_GEMM.from_linear (order_map) and
# awq/utils/packing_utils.py (AWQ_ORDER / AWQ_REVERSE_ORDER). Nibble i of a word holds column
# AWQ_PACK_ORDER[i] of its 8-column block; AWQ_UNPACK_ORDER is the inverse permutation.
AWQ_PACK_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER: tuple[int, ...] = (0, 4, 1, 5, 2, 6, 3, 7)


def _per_word(bits: int) -> int:
    if bits <= 0 or 32 % bits:
        raise ValueError(f"packing supports bit widths dividing 32, got {bits}")
    return 32 // bits


def word_to_u32(word: int | torch.Tensor) -> int:
    """An int32 word (Python int or 0-d tensor) as its unsigned 32-bit value, e.g. for ``hex()``."""
    return int(word) & 0xFFFFFFFF


def pack_int32_lsb(values: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack unsigned ``values`` ``[..., n]`` along the last dim into int32 ``[..., n * bits / 32]``.

    Slot ``i`` (bits ``i*b .. i*b+b-1``) of word ``w`` holds ``values[..., w * per + order[i]]`` with
    ``per = 32 / bits`` (``order`` defaults to sequential).

    Raises:
        ValueError: ``n`` is not a multiple of ``32 / bits``, ``order`` is not a permutation of
            ``range(32 / bits)``, or a value is outside ``[0, 2^bits)``.
    """
    per = _per_word(bits)
    n = values.shape[-1]
    if n % per:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words (need a multiple of {per})")
    if order is not None and sorted(order) != list(range(per)):
        raise ValueError(f"order {list(order)} is not a permutation of range({per})")
    if values.numel():
        lo, hi = torch.aminmax(values) if values.dtype not in (torch.bool,) else (values.min(), values.max())
    if values.numel() and (int(lo) < 0 or int(hi) >= (1 << bits)):
        raise ValueError(f"values outside [0, {1 << bits}) cannot be packed into {bits} bits")
    cols = list(order) if order is not None else list(range(per))
    if sys.byteorder == "little" and bits in (4, 8):
        # every value is in [0, 2^bits): one uint8 copy (transposing a strided input), then byte ops
        u = values.to(torch.uint8).contiguous().view(*values.shape[:-1], n // per, per)  # (..., words, per)
        seq = cols == list(range(per))
        if bits == 8:
            b = u if seq else u.index_select(-1, torch.tensor(cols, device=u.device))
        else:
            # byte j of a word holds slot 2j (low nibble) and slot 2j+1 (high nibble)
            if seq:
                lo, hi = u[..., 0::2], u[..., 1::2]
            else:
                lo = u.index_select(-1, torch.tensor(cols[0::2], device=u.device))
                hi = u.index_select(-1, torch.tensor(cols[1::2], device=u.device))
            b = torch.bitwise_or(lo, torch.bitwise_left_shift(hi, 4))
        return b.contiguous().view(torch.int32).reshape(u.shape[:-1])  # (..., words, 4) bytes -> LE int32
    v = values.reshape(*values.shape[:-1], n // per, per)  # (..., words, per)
    # One slot at a time keeps the int64 working set at one word tensor (values may be 1 GB+).
    word = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)  # (..., words), in [0, 2^32)
    for slot, col in enumerate(cols):
        word |= v[..., col].to(torch.int64) << (slot * bits)
    word = torch.where(word >= (1 << 31), word - (1 << 32), word)
    return word.to(torch.int32)


def unpack_int32_lsb(packed: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32_lsb`: int32 ``[..., words]`` -> unsigned int32 ``[..., words * 32 / bits]``."""
    per = _per_word(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    cols = list(order) if order is not None else list(range(per))
    out = torch.empty((*packed.shape, per), dtype=torch.int32, device=packed.device)  # (..., words, per)
    for slot, col in enumerate(cols):  # slot i of a word holds column cols[i]
        out[..., col] = ((w >> (slot * bits)) & ((1 << bits) - 1)).to(torch.int32)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _pad_last(v: torch.Tensor, multiple: int) -> torch.Tensor:
    n = v.shape[-1]
    pad = (-n) % multiple
    return torch.nn.functional.pad(v, (0, pad)) if pad else v


def pack_int32_rows_lsb(values: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors ``pack_to_int32``: signed 2-D ``values`` -> int32, LSB first along ``packed_dim``.

    Each value is offset by ``+2^(bits-1)`` before packing; a ragged end is zero-padded (raw bits),
    so ``[R, C]`` packed along dim 1 gives ``[R, ceil(C * bits / 32)]``. ``weight_packed`` uses
    ``packed_dim=1``; ``weight_zero_point`` uses ``packed_dim=0``.

    Source: compressed-tensors ``compressors/pack_quantized/helpers.py::pack_to_int32``.

    Raises:
        ValueError: ``values`` not 2-D, or outside ``[-2^(b-1), 2^(b-1))``.
    """
    if values.dim() != 2 or packed_dim not in (0, 1):
        raise ValueError(f"expected 2-D values and packed_dim 0 or 1, got {tuple(values.shape)}, {packed_dim}")
    if values.dtype == torch.int8 and bits <= 8:
        # uint8 arithmetic wraps mod 256, and exactly the values in [-2^(b-1), 2^(b-1)) land in [0, 2^b): the
        # range check in pack_int32_lsb still refuses every other value
        u = values.view(torch.uint8) + (1 << (bits - 1))
    else:
        u = values.to(torch.int16) + (1 << (bits - 1))  # int8 + offset fits int16
    if packed_dim == 0:
        u = u.t()  # (C, R): pack along the original dim 0
    out = pack_int32_lsb(_pad_last(u, _per_word(bits)), bits)
    return (out.t() if packed_dim == 0 else out).contiguous()


def unpack_int32_rows_lsb(packed: torch.Tensor, bits: int, size: int, packed_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32_rows_lsb`: returns signed int8 with ``size`` entries along ``packed_dim``."""
    if packed_dim == 0:
        packed = packed.t()
    u = unpack_int32_lsb(packed.contiguous(), bits)[:, :size]
    s = (u - (1 << (bits - 1))).to(torch.int8)
    return (s.t() if packed_dim == 0 else s).contiguous()


def pack_awq_gemm(q_kn: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """AutoAWQ GEMM: unsigned ``[N, M]`` (``qweight``) or ``[G, M]`` (``qzeros``) -> int32 ``[.., M / 8]``.

    Packs along the output dim M; nibble i of word j holds column ``8 j + AWQ_PACK_ORDER[i]``.
    Zeros are stored as-is (no offset). Source: AutoAWQ ``WQLinear_GEMM.from_linear``.

    Raises:
        ValueError: bits != 4 or M not a multiple of 8.
    """
    if bits != 4:
        raise ValueError(f"AutoAWQ GEMM packing is 4-bit only, got {bits}")
    return pack_int32_lsb(q_kn, 4, AWQ_PACK_ORDER)


def unpack_awq_gemm(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Inverse of :func:`pack_awq_gemm`: int32 ``[.., M / 8]`` -> unsigned int32 ``[.., M]``."""
    if bits != 4:
        raise ValueError(f"AutoAWQ GEMM packing is 4-bit only, got {bits}")
    return unpack_int32_lsb(packed, 4, AWQ_PACK_ORDER)


def pack_gptq_qweight(q_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight``: unsigned ``[N, M]`` -> int32 ``[N * bits / 32, M]``, packed along N, sequential.

    Word ``r`` of column ``n``, slot ``j`` holds ``q[r * 32/bits + j, n]``.
    Source: AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py::QuantLinear.pack``.
    """
    return pack_int32_lsb(q_kn.t(), bits).t().contiguous()  # (M, N) -> (M, N*b/32) -> (N*b/32, M)


def unpack_gptq_qweight(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_gptq_qweight`: int32 ``[N * bits / 32, M]`` -> unsigned int32 ``[N, M]``."""
    return unpack_int32_lsb(packed.t().contiguous(), bits).t().contiguous()


def pack_gptq_qzeros(zeros_gn: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """GPTQ ``qzeros``: unsigned zeros ``[G, M]`` -> int32 ``[G, M * bits / 32]``, along M, sequential.

    ``checkpoint_format="gptq"`` (v1) stores ``zero - 1`` (wrapped to ``bits`` bits, so a zero of 0
    is stored as ``2^b - 1``: the v1 defect GPTQ v2 fixes); ``"gptq_v2"`` stores ``zero``.

    Raises:
        ValueError: unknown ``checkpoint_format``.
    """
    z = zeros_gn.to(torch.int64)
    if checkpoint_format == "gptq":
        z = (z - 1) & ((1 << bits) - 1)
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r} (expected 'gptq' or 'gptq_v2')")
    return pack_int32_lsb(z, bits)


def unpack_gptq_qzeros(packed: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """Zeros as a loader computes them: v1 ``stored + 1`` (unmasked, as AutoGPTQ/vLLM do), v2 ``stored``.

    Returns int32 ``[G, M]``. For v1 a stored ``2^b - 1`` comes back as ``2^b`` (not 0), faithfully.
    """
    z = unpack_int32_lsb(packed, bits)
    if checkpoint_format == "gptq":
        return z + 1
    if checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r} (expected 'gptq' or 'gptq_v2')")
    return z
