"""DeepSeek-V2/V3/R1 (and V3.2) checkpoint layout as data: the one place that says which layer a tensor is in, which
linears a decoder layer has, which of them are fused by the engines, and what stays in float.

Names follow the release (``model.layers.{L}.self_attn.kv_b_proj.weight``, ``model.layers.{L}.mlp.experts.{E}.
down_proj.weight``); a layer ``L >= num_hidden_layers`` is the multi-token-prediction (MTP) block. Every consumer
(quantization policy, calibration, validate, inspect, the forward estimate, GGUF naming) reads these tables, so a
new tensor family is one entry here. DeepSeek-V4's table is :mod:`.deepseek_v4`.

Sources: docs/checkpoint-layout.md §1-§3 (names, MLA with or without ``q_lora_rank``, dense then MoE layers, the MTP
block) and docs/known-failures.md item 36 (the fused groups vLLM and SGLang load as one layer).
"""

from __future__ import annotations

import re

LAYER_PREFIX = "model.layers."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

#: attention linears under ``self_attn.``: with a query LoRA (V3/R1, ``q_lora_rank`` set) and without (V2-Lite)
ATTN_LINEARS_LORA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
ATTN_LINEARS_NO_LORA = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
#: the projections of every MLP: the dense MLP (``mlp.``), each routed expert (``mlp.experts.E.``) and the shared
#: expert (``mlp.shared_experts.``)
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
#: the MoE router, kept in float: ``mlp.gate.weight`` (E, hidden) and ``mlp.gate.e_score_correction_bias`` (E,)
ROUTER_TENSORS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
#: Linear modules that are never quantized, as ``--ignore``-style patterns: the lm_head, the router, the MTP block's
#: ``eh_proj`` and ``shared_head.head``
KEPT_LINEARS = ("lm_head", r"re:.*mlp\.gate$", r"re:.*eh_proj$", r"re:.*shared_head\.head$")

QUANTIZABLE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.(?:"
    rf"self_attn\.(?P<attn>{'|'.join(sorted(set(ATTN_LINEARS_LORA + ATTN_LINEARS_NO_LORA)))})"
    rf"|mlp\.(?P<dense>{'|'.join(MLP_LINEARS)})"
    rf"|mlp\.experts\.(?P<expert>\d+)\.(?P<eproj>{'|'.join(MLP_LINEARS)})"
    rf"|mlp\.shared_experts\.(?P<sproj>{'|'.join(MLP_LINEARS)})"
    r")\.weight$")
"""The 2-D weights ``quantize`` may quantize (a match is a decoder linear's ``.weight``)."""


def layer_index(name: str) -> int | None:
    """``L`` of a ``model.layers.{L}.*`` tensor name, else None (embeddings, final norm, lm_head)."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def is_mtp(name: str, num_hidden_layers: int) -> bool:
    """True for a tensor of the MTP block: ``model.layers.{L}.*`` with ``L >= num_hidden_layers``."""
    i = layer_index(name)
    return i is not None and i >= num_hidden_layers


def attention_linears(q_lora_rank: int | None) -> tuple[str, ...]:
    """The ``self_attn.`` linears of a layer: ``q_proj`` without a query LoRA, ``q_a_proj``/``q_b_proj`` with it."""
    return ATTN_LINEARS_NO_LORA if q_lora_rank is None else ATTN_LINEARS_LORA


def mlp_prefixes(layer: int, *, moe: bool, n_routed_experts: int = 0, n_shared_experts: int = 0) -> list[str]:
    """Module prefixes of a layer's MLPs: the routed experts in order, then the shared expert (MoE), or the dense MLP.

    >>> mlp_prefixes(3, moe=True, n_routed_experts=2, n_shared_experts=1)
    ['model.layers.3.mlp.experts.0', 'model.layers.3.mlp.experts.1', 'model.layers.3.mlp.shared_experts']
    """
    p = f"{LAYER_PREFIX}{layer}.mlp"
    if not moe:
        return [p]
    out = [f"{p}.experts.{e}" for e in range(n_routed_experts)]
    if n_shared_experts:
        out.append(f"{p}.shared_experts")
    return out


def layer_linears(layer: int, *, q_lora_rank: int | None, moe: bool, n_routed_experts: int = 0,
                  n_shared_experts: int = 0) -> list[str]:
    """Every linear module of decoder layer ``layer``, in the order calibration visits them: attention, then each
    MLP's gate/up/down (routed experts first, the shared expert last)."""
    a = f"{LAYER_PREFIX}{layer}.self_attn"
    names = [f"{a}.{n}" for n in attention_linears(q_lora_rank)]
    for m in mlp_prefixes(layer, moe=moe, n_routed_experts=n_routed_experts, n_shared_experts=n_shared_experts):
        names += [f"{m}.{n}" for n in MLP_LINEARS]
    return names


def fused_group(weight_name: str) -> str | None:
    """The fused group a quantizable weight belongs to (its members must share one precision), else None.

    The engines load {q_a_proj, kv_a_proj_with_mqa} as ``fused_qkv_a_proj``, each MLP's {gate_proj, up_proj} as
    ``gate_up_proj`` and all routed experts of a layer as one FusedMoE.
    """
    m = QUANTIZABLE.match(weight_name)
    if not m:
        return None
    layer = m.group("layer")
    if m.group("attn") in ("q_a_proj", "kv_a_proj_with_mqa"):
        return f"layer {layer}: q_a_proj + kv_a_proj_with_mqa (fused_qkv_a_proj)"
    if m.group("dense") in ("gate_proj", "up_proj"):
        return f"layer {layer}: mlp gate_proj + up_proj (gate_up_proj)"
    if m.group("sproj") in ("gate_proj", "up_proj"):
        return f"layer {layer}: shared_experts gate_proj + up_proj (gate_up_proj)"
    if m.group("expert") is not None:
        return f"layer {layer}: all routed experts (FusedMoE)"
    return None
