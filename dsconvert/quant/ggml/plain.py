"""F32 / F16 / BF16 "passthrough" types (block size 1), byte-identical to ``ggml_quantize_chunk``.

* F32: the float32 bytes.
* F16: ``ggml_fp32_to_fp16_row`` -- round to nearest even (torch ``.half()``).
* BF16: ``ggml_compute_fp32_to_bf16`` (and gguf-py's ``BF16.quantize_blocks``): NaN -> quiet NaN
  with the top 16 bits kept, otherwise ``(u + 0x7fff + ((u >> 16) & 1)) >> 16`` (round to nearest even).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from .base import GGMLType


class F32(GGMLType, qtype=T.F32):
    """float32 as is."""

    ignores_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        return blocks.to(torch.float32).contiguous().view(torch.uint8).view(-1, 4)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.float32).view(-1, 1)


class F16(GGMLType, qtype=T.F16):
    """IEEE half, round to nearest even (``GGML_FP32_TO_FP16``)."""

    ignores_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        return blocks.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.float16).to(torch.float32).view(-1, 1)


class BF16(GGMLType, qtype=T.BF16):
    """bfloat16 with ggml's rounding (RNE, NaN kept quiet)."""

    ignores_imatrix = True

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, sigma2=None):
        u = blocks.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        rne = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        h = torch.where(nan, (u >> 16) | 64, rne)
        return h.to(torch.int16).contiguous().view(torch.uint8).view(-1, 2)

    @classmethod
    def dequantize_blocks(cls, blocks):
        h = blocks.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        return (h << 16).view(torch.float32).view(-1, 1)
