"""Rotary embedding for the MLA rope dims: YaRN frequencies, attention factor, interleaved pairs.

DeepSeek rotates *adjacent* pairs ``(x0, x1), (x2, x3), ...`` of the ``qk_rope_head_dim`` slice, pair
``i`` by angle ``pos * inv_freq[i]`` (complex multiply in ``inference/model.py``; ``rope_interleave``
in transformers). YaRN frequencies are used whenever ``rope_scaling.type == "yarn"``, as in
transformers, whatever the sequence length.

Source: transformers 5.24 ``modeling_rope_utils._compute_yarn_parameters``.
"""

from __future__ import annotations

import math

import torch

from dsconvert.model.config import ModelConfig, yarn_get_mscale


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, shape ``(qk_rope_head_dim // 2,)`` float32.

    Plain RoPE: ``theta ** (-2i/d)``. YaRN: a per-dimension blend of ``inv_freq / factor``
    (interpolation) and ``inv_freq`` (extrapolation), with a linear ramp between the correction
    dims of ``beta_fast`` and ``beta_slow`` rotations over ``original_max_position_embeddings``
    (floored/ceiled when ``truncate``, the default).
    """
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    inv_freq_extra = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq_extra
    inv_freq_inter = 1.0 / (rs.factor * pos_freqs)

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_weight = 1 - ramp  # 1 = keep the original (extrapolated) frequency
    return inv_freq_inter * (1 - extra_weight) + inv_freq_extra * extra_weight


def rope_attention_factor(cfg: ModelConfig) -> float:
    """Multiplier on cos/sin (so ``q_pe . k_pe`` is scaled by its square).

    Explicit ``attention_factor`` if given; else ``mscale(f, mscale) / mscale(f, mscale_all_dim)``
    when both keys are non-zero (1.0 for V3); else ``0.1 ln f + 1``. This last case bites synthetic
    configs that omit ``mscale``: set both keys. Plain RoPE: 1.0.
    """
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.attention_factor is not None:
        return rs.attention_factor
    if rs.mscale and rs.mscale_all_dim:
        return yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_get_mscale(rs.factor)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of ``positions[:, None] * inv_freq``, times ``attention_factor``.

    Returns:
        Two float32 tensors of shape ``(T, rope_dim // 2)``.
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, d/2)
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of ``x`` in place of a complex multiply.

    Args:
        x: ``(..., T, d)`` with d even; pairs are ``(x[..., 2i], x[..., 2i+1])``.
        cos, sin: ``(T, d // 2)`` float32.

    Returns:
        Same shape and layout as ``x`` (still interleaved), in ``x.dtype``; computed in float32.
    """
    xf = x.to(torch.float32)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (..., T, d/2) each
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (..., T, d/2, 2)
    return out.flatten(-2).to(x.dtype)  # (..., T, d)
