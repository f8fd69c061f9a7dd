"""Block-wise FP8 (e4m3fn) dequantization, exactly as DeepSeek's ``inference/kernel.py::weight_dequant``.

Rule (../shared/reference/deepseek-checkpoint.md section 4)::

    W_bf16[i, j] = bf16_rne( float32(W_fp8[i, j]) * scale_inv[i // 128, j // 128] )

One fp32 multiply per element, then one round-to-nearest-even cast. The scale grid is
``(ceil(M/128), ceil(N/128))``: edge blocks are partial and use their block's scale as is.
"""

from __future__ import annotations

import torch


def scale_grid(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of the ``weight_scale_inv`` grid for a weight of ``shape`` = (out_features M, in_features N)."""
    m, n = shape
    bm, bn = block
    return (-(-m // bm), -(-n // bn))


def dequant_fp8_block(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantize a block-scaled FP8 weight.

    Args:
        weight: ``[M, N]`` ``torch.float8_e4m3fn`` (or its raw ``uint8`` bytes).
        scale_inv: ``[ceil(M/bm), ceil(N/bn)]`` float32 multipliers (DeepSeek's ``weight_scale_inv``).
        block: ``weight_block_size`` from ``quantization_config`` (never inferred from shapes).
        out_dtype: ``bfloat16`` (default), ``float16`` or ``float32``; the product is formed in fp32
            and cast once with round-to-nearest-even.

    Returns:
        ``[M, N]`` tensor of ``out_dtype`` on ``weight``'s device.

    Raises:
        ValueError: ``weight`` is not 2-D, or the scale grid does not match ``scale_grid(weight.shape)``.
    """
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    if weight.dim() != 2:
        raise ValueError(f"FP8 block dequant needs a 2-D weight, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    bm, bn = block
    grid = scale_grid((m, n), block)
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not match weight {m}x{n} with block {bm}x{bn} "
                         f"(expected {grid})")
    s = scale_inv.to(device=weight.device, dtype=torch.float32)
    gm, gn = grid
    # Pad to whole blocks, multiply each (bm, bn) tile by its scalar in fp32, crop, cast once (RNE).
    wf = torch.zeros((gm * bm, gn * bn), dtype=torch.float32, device=weight.device)
    wf[:m, :n] = weight.to(torch.float32)
    wf = wf.view(gm, bm, gn, bn) * s[:, None, :, None]
    return wf.view(gm * bm, gn * bn)[:m, :n].to(out_dtype)
