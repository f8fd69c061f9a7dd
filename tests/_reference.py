"""Slow, obvious oracles for tests. Deliberately independent of the package's fast paths."""

from __future__ import annotations

import math

import numpy as np
import torch


def fp8_e4m3fn_table() -> torch.Tensor:
    """float32 value of each of the 256 float8_e4m3fn bytes, decoded from the bit layout by formula.

    1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F/0xFF are NaN (no inf).
    """
    vals = []
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, mant = (b >> 3) & 0xF, b & 0x7
        if e == 0xF and mant == 0x7:
            vals.append(math.nan)
        elif e == 0:
            vals.append(sign * math.ldexp(mant, -9))  # (m/8) * 2**(1-7)
        else:
            vals.append(sign * math.ldexp(8 + mant, e - 10))  # (1 + m/8) * 2**(e-7)
    return torch.tensor(vals, dtype=torch.float32)


def e4m3fn_decode(u8: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bytes (any shape, uint8) -> float32 values through :func:`fp8_e4m3fn_table`."""
    return fp8_e4m3fn_table().numpy()[np.asarray(u8, dtype=np.uint8)]


def bf16_rne_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16) by integer round-to-nearest-even; a NaN keeps its sign and the top
    of its payload and is forced quiet (bit 6), as torch's conversion does."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    nan = np.isnan(x)
    r[nan] = (bits[nan] >> 16) | 0x0040
    return r.astype(np.uint16)


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (ties to even), returned as float32."""
    return (bf16_rne_bits(x).astype(np.uint32) << 16).view(np.float32)


def dequant_fp8_block_reference(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """One (bm, bn) block at a time: table-decode to fp32, multiply by the block's fp32 scalar, cast once."""
    w = weight.cpu()
    if w.dtype != torch.uint8:
        w = w.view(torch.uint8)
    m, n = w.shape
    bm, bn = block
    table = fp8_e4m3fn_table()
    s = scale_inv.cpu().to(torch.float32)
    assert tuple(s.shape) == (-(-m // bm), -(-n // bn))
    out = torch.empty((m, n), dtype=out_dtype)
    for i in range(0, m, bm):
        for j in range(0, n, bn):
            vals = table[w[i : i + bm, j : j + bn].long()]  # fp32
            prod = vals * s[i // bm, j // bn]  # fp32 tensor * 0-dim fp32 tensor: one fp32 multiply
            out[i : i + bm, j : j + bn] = prod.to(out_dtype)
    return out


E2M1_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_encode_reference(x: float) -> int:
    """e2m1 code of one float by brute force: clamp to [-6, 6], nearest of the 8 magnitudes, a tie to the even
    code; bit 3 set for x < 0."""
    a = min(abs(float(x)), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1_TABLE[c] - a), c % 2))
    return best | (8 if x < 0 else 0)


def fp4_unpack_reference(packed) -> list[list[int]]:
    """Nibbles of each byte row, low nibble first (compressed-tensors' order), as plain Python lists."""
    return [[n for b in row for n in (int(b) & 0xF, int(b) >> 4)] for row in packed.tolist()]
