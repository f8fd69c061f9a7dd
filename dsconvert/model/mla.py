"""Multi-head Latent Attention, naive (non-absorbed) form, over a whole sequence.

Source: transformers 5.24 ``DeepseekV3Attention.forward``; DeepSeek ``inference/model.py::MLA``
(``attn_impl="naive"``). The absorbed form is mathematically equal (docs/checkpoint-layout.md §10 item 5).
"""

from __future__ import annotations

import torch

from dsconvert.model.config import ModelConfig
from dsconvert.model.layers import Getter, HeadHook, LinearHook, linear, rms_norm
from dsconvert.model.rope import apply_rope_interleaved


def mla_attention(
    cfg: ModelConfig,
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    scale: float,
    get: Getter,
    prefix: str,
    on_linear: LinearHook | None = None,
    on_heads: HeadHook | None = None,
) -> torch.Tensor:
    """Causal MLA over ``x``.

    Args:
        cfg: model config (H = num_attention_heads, dn/dr/dv = qk_nope/qk_rope/v head dims).
        x: ``(T, hidden)`` normalised input, compute dtype.
        positions: ``(T,)`` int64; key j is visible to query i iff ``positions[j] <= positions[i]``.
        cos, sin: ``(T, dr // 2)`` float32 from :func:`dsconvert.model.rope.rope_cos_sin`.
        scale: softmax scale (:func:`dsconvert.model.config.softmax_scale`).
        get: weight getter; names are ``{prefix}.q_a_proj.weight`` etc.
        prefix: ``model.layers.{i}.self_attn``.
        on_linear: optional Linear input hook.
        on_heads: optional per-head input hook of the absorbed form (see :data:`~dsconvert.model.layers.HeadHook`);
            the latent ``probs @ c_kv`` is computed only when it is given.

    Returns:
        ``(T, hidden)`` in the compute dtype (after ``o_proj``).
    """
    T = x.shape[0]
    nh, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    if cfg.q_lora_rank is None:
        q = linear(x, get, f"{prefix}.q_proj", on_linear)  # (T, nh*(dn+dr))
    else:
        qa = linear(x, get, f"{prefix}.q_a_proj", on_linear)  # (T, q_lora)
        qa = rms_norm(qa, get(f"{prefix}.q_a_layernorm.weight"), cfg.rms_norm_eps)
        q = linear(qa, get, f"{prefix}.q_b_proj", on_linear)  # (T, nh*(dn+dr))
    q = q.view(T, nh, dn + dr).transpose(0, 1)  # (nh, T, dn+dr)
    q_nope, q_pe = torch.split(q, [dn, dr], dim=-1)  # (nh, T, dn), (nh, T, dr)

    kv_a = linear(x, get, f"{prefix}.kv_a_proj_with_mqa", on_linear)  # (T, kv_lora + dr)
    c_kv, k_pe = torch.split(kv_a, [cfg.kv_lora_rank, dr], dim=-1)  # (T, kv_lora), (T, dr)
    c_kv = rms_norm(c_kv, get(f"{prefix}.kv_a_layernorm.weight"), cfg.rms_norm_eps)
    kv = linear(c_kv, get, f"{prefix}.kv_b_proj", on_linear)  # (T, nh*(dn+dv))
    kv = kv.view(T, nh, dn + dv).transpose(0, 1)  # (nh, T, dn+dv)
    k_nope, v = torch.split(kv, [dn, dv], dim=-1)  # (nh, T, dn), (nh, T, dv)
    if on_heads is not None:
        on_heads(f"{prefix}.kv_b_proj.k_b", q_nope)  # (nh, T, dn), before RoPE (only q_pe is rotated)

    q_pe = apply_rope_interleaved(q_pe, cos, sin)  # (nh, T, dr)
    k_pe = apply_rope_interleaved(k_pe, cos, sin)  # (T, dr), shared by all heads

    q_full = torch.cat((q_nope, q_pe), dim=-1)  # (nh, T, dn+dr)
    k_full = torch.cat((k_nope, k_pe.unsqueeze(0).expand(nh, T, dr)), dim=-1)  # (nh, T, dn+dr)
    scores = torch.matmul(q_full, k_full.transpose(1, 2)) * scale  # (nh, T, T)
    visible = positions[None, :] <= positions[:, None]  # (T_q, T_k)
    scores = scores.to(torch.float32).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(x.dtype)  # (nh, T, T)
    out = torch.matmul(probs, v)  # (nh, T, dv)
    if on_heads is not None:
        on_heads(f"{prefix}.kv_b_proj.v_b", torch.matmul(probs, c_kv))  # (nh, T, kv_lora)
    out = out.transpose(0, 1).reshape(T, nh * dv)  # (T, nh*dv)
    return linear(out, get, f"{prefix}.o_proj", on_linear)
