"""DeepSeek MoE: router (V3 sigmoid/noaux_tc, V2 softmax/greedy/group_limited_greedy) and the
expert mixture, fetching only the routed experts that receive a token.

Source: transformers 5.24 ``DeepseekV3TopkRouter`` / ``DeepseekV2TopkRouter``; DeepSeek-V2
``modeling_deepseek.py::MoEGate`` for V2's ``norm_topk_prob`` semantics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsconvert.model.config import ModelConfig
from dsconvert.model.layers import Getter, LinearHook, swiglu_mlp


def route(
    cfg: ModelConfig, router_logits: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k = num_experts_per_tok`` experts per token and their mixing weights, in float32.

    1. ``s = sigmoid(logits)`` or ``softmax(logits)`` (``scoring_func``).
    2. Choice scores ``c = s + bias`` (``e_score_correction_bias``; selection only).
    3. ``topk_method``:
       * ``greedy``: top-k of ``c``;
       * ``noaux_tc``: group score = sum of the group's top-2 ``c``; keep ``topk_group`` groups;
       * ``group_limited_greedy``: group score = max ``c`` of the group; keep ``topk_group`` groups.
       Experts outside the kept groups get ``-inf`` (never 0.0: a biased score can be negative).
    4. Weights = **unbiased** ``s`` of the chosen experts. V3/v32: if ``norm_topk_prob`` divide by
       their sum + 1e-20, then always × ``routed_scaling_factor``. V2 (DeepSeek-V2 ``MoEGate``):
       if ``k > 1 and norm_topk_prob`` normalise, *else* × ``routed_scaling_factor`` (transformers'
       V2 ignores ``norm_topk_prob``; all V2 releases have it false, where the two agree).

    Args:
        cfg: config with the router fields set.
        router_logits: ``(T, E)`` float32.
        bias: ``(E,)`` or None.

    Returns:
        ``(weights (T, k) float32, indices (T, k) int64)``; order within a row is unspecified.
    """
    logits = router_logits.to(torch.float32)
    T, E = logits.shape
    k = cfg.num_experts_per_tok
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.to(torch.float32)[None, :]
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        grouped = choice.view(T, cfg.n_group, E // cfg.n_group)  # (T, G, E/G)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
        else:  # group_limited_greedy
            group_scores = grouped.max(dim=-1).values  # (T, G)
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_keep = group_keep.unsqueeze(-1).expand(T, cfg.n_group, E // cfg.n_group).reshape(T, E)
        choice = choice.masked_fill(~expert_keep, float("-inf"))
    indices = choice.topk(k, dim=-1, sorted=False).indices  # (T, k)
    weights = scores.gather(1, indices)  # (T, k)
    if cfg.model_type == "deepseek_v2":
        if k > 1 and cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * cfg.routed_scaling_factor
    else:
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    return weights, indices


def routed_expert_output(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, eid: int, eget: Getter,
                         prefix: str, on_linear: LinearHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed expert ``eid``'s weighted contribution: ``(token_idx (n,) int64, w * expert(x[token_idx]))``, the
    product ``(n, hidden)`` in float32 weights' promotion (transformers' order); ``x`` ``(T, hidden)``,
    ``weights``/``indices`` ``(T, k)`` from :func:`route`, ``eget`` the expert's weight getter."""
    token_idx, k_pos = torch.where(indices == eid)  # (n,), (n,)
    y = swiglu_mlp(x[token_idx], eget, f"{prefix}.experts.{eid}", on_linear)  # (n, hidden)
    return token_idx, y * weights[token_idx, k_pos, None]  # float32 weights, as transformers


def moe_forward(
    cfg: ModelConfig,
    x: torch.Tensor,
    get: Getter,
    fetch_expert: Callable[[str], Getter],
    has: Callable[[str], bool],
    prefix: str,
    on_linear: LinearHook | None = None,
    experts: Callable | None = None,
) -> torch.Tensor:
    """``sum_i w_i * expert_i(x) + shared_experts(x)`` for every token.

    Args:
        x: ``(T, hidden)`` normalised input, compute dtype.
        get: getter for the layer's dense tensors (router, shared experts).
        fetch_expert: ``fetch_expert(expert_prefix)`` returns a getter for that expert's three
            weights; it is called once per expert that receives at least one token, and the
            weights are dropped before the next expert is fetched.
        has: whether the source holds a tensor (the router bias is optional).
        prefix: ``model.layers.{i}.mlp``.
        experts: ``experts(x, weights, indices, eids)`` yields :func:`routed_expert_output`'s
            ``(token_idx, y)`` for each expert id of ``eids`` in that (ascending) order, computed elsewhere
            (``imatrix --ray``); None: here, each expert fetched with ``fetch_expert``. The sum is the same.

    Returns:
        ``(T, hidden)`` in the compute dtype.
    """
    if on_linear is not None:
        on_linear(f"{prefix}.gate", x)
    gate_w = get(f"{prefix}.gate.weight").to(torch.float32)  # (E, hidden)
    router_logits = F.linear(x.to(torch.float32), gate_w)  # (T, E), fp32 router as transformers
    bias_name = f"{prefix}.gate.e_score_correction_bias"
    bias = get(bias_name) if has(bias_name) else None
    weights, indices = route(cfg, router_logits, bias)

    out = torch.zeros_like(x)
    eids = torch.unique(indices).tolist()  # ascending: only experts with >= 1 token
    if experts is not None:
        ys = experts(x, weights, indices, eids)
    else:
        ys = (routed_expert_output(x, weights, indices, eid, fetch_expert(f"{prefix}.experts.{eid}"), prefix,
                                   on_linear) for eid in eids)
    for token_idx, y in ys:
        out.index_add_(0, token_idx, y.to(out.dtype))
    if cfg.n_shared_experts:
        out = out + swiglu_mlp(x, get, f"{prefix}.shared_experts", on_linear)
    return out


def moe_forward_many(
    cfg: ModelConfig,
    xs: list[torch.Tensor],
    get: Getter,
    fetch_expert: Callable[[str], Getter],
    has: Callable[[str], bool],
    prefix: str,
    on_linear: LinearHook | None = None,
) -> list[torch.Tensor]:
    """``[moe_forward(cfg, x, ...) for x in xs]`` with the same operations per sequence (routing, each
    expert's matmuls on that sequence's tokens, accumulation in ascending expert order), so each result is
    bit-identical to the per-sequence call, but every routed expert is fetched once for all sequences.

    Args:
        xs: ``[(T_s, hidden)]`` normalised inputs, compute dtype; others as :func:`moe_forward`.

    Returns:
        ``[(T_s, hidden)]`` in the compute dtype.
    """
    gate_w = get(f"{prefix}.gate.weight").to(torch.float32)  # (E, hidden)
    bias_name = f"{prefix}.gate.e_score_correction_bias"
    bias = get(bias_name) if has(bias_name) else None
    routes = []
    for x in xs:
        if on_linear is not None:
            on_linear(f"{prefix}.gate", x)
        routes.append(route(cfg, F.linear(x.to(torch.float32), gate_w), bias))  # (T_s, k) each
    outs = [torch.zeros_like(x) for x in xs]
    eids = sorted(set().union(*(set(torch.unique(i).tolist()) for _, i in routes)))
    for eid in eids:
        eget = fetch_expert(f"{prefix}.experts.{eid}")
        for x, out, (weights, indices) in zip(xs, outs, routes):
            if not bool((indices == eid).any()):
                continue
            token_idx, y = routed_expert_output(x, weights, indices, eid, eget, prefix, on_linear)
            out.index_add_(0, token_idx, y.to(out.dtype))
        del eget
    if cfg.n_shared_experts:
        outs = [out + swiglu_mlp(x, get, f"{prefix}.shared_experts", on_linear) for x, out in zip(xs, outs)]
    return outs
