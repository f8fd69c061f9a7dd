"""Small building blocks shared by MLA and the MLPs: RMSNorm, a hooked Linear, SwiGLU FFN."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: ``on_linear(name, input)``: called with the input activations ``(n_tokens, in_features)`` of every
#: Linear, ``name`` being the HF weight name without ``.weight``. It may return a tensor of the same shape to
#: use as the Linear's input instead (``validate`` emulates activation quantization that way); None keeps it.
LinearHook = Callable[[str, torch.Tensor], "torch.Tensor | None"]

#: ``on_heads(name, x)``: called with the per-head inputs ``(n_head, n_tokens, in_features)`` of the matrices the
#: absorbed MLA form multiplies per head: ``{attn}.kv_b_proj.k_b`` gets ``q_nope`` (in = qk_nope_head_dim) and
#: ``{attn}.kv_b_proj.v_b`` the attention-weighted latent ``softmax(QK^T) @ c_kv`` (in = kv_lora_rank). These
#: are the inputs of llama.cpp's ``attn_k_b`` / ``attn_v_b`` (docs/gguf-deepseek2.md §3).
HeadHook = Callable[[str, torch.Tensor], None]

#: ``get(name) -> Tensor``: a weight already cast to the compute dtype.
Getter = Callable[[str], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x**2) + eps))`` with the statistics in float32, cast back to ``x.dtype``
    before the weight multiply (transformers' ``DeepseekV3RMSNorm``)."""
    xf = x.to(torch.float32)
    var = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def linear(x: torch.Tensor, get: Getter, name: str, on_linear: LinearHook | None) -> torch.Tensor:
    """``x @ W.T`` for ``W = get(name + ".weight")`` of shape ``(M, N)``; ``x`` is ``(T, N)``; ``on_linear`` sees
    ``x`` first and may replace it (see :data:`LinearHook`)."""
    if on_linear is not None:
        r = on_linear(name, x)
        if r is not None:
            x = r
    return F.linear(x, get(name + ".weight"))


def swiglu_mlp(x: torch.Tensor, get: Getter, prefix: str, on_linear: LinearHook | None) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with weights ``{prefix}.{gate,up,down}_proj.weight``."""
    g = linear(x, get, f"{prefix}.gate_proj", on_linear)
    u = linear(x, get, f"{prefix}.up_proj", on_linear)
    return linear(F.silu(g) * u, get, f"{prefix}.down_proj", on_linear)
