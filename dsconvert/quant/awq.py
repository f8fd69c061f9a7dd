"""AWQ: activation-aware weight quantization. A per-input-channel scale ``s`` is searched so that
``Q(W·s)·(x/s)`` tracks ``W·x`` best (the ``1/s`` is folded into the previous op, so the float model is
unchanged), then each output-group's clipping range is searched.

Source: Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (arXiv 2306.00978); AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``,
``_compute_best_scale``, ``_compute_best_clip``) and ``awq/quantize/scale.py`` (``apply_clip``,
``scale_ln_fcs``, ``scale_fc_fc``); docs/int-formats.md §5.

Pure tensor code (no file I/O, no module names); runs on the inputs' device in float32. Notation:
``W`` is ``(M, N)``, ``x`` is ``(n_tokens, N)``, ``g`` the group length along N.

Pseudo-quantization uses :func:`dsconvert.quant.rtn.quantize` / :func:`~dsconvert.quant.rtn.dequantize`
with the target convention (scales rounded to the storage dtype), so the search optimises the weights
that are actually written. Deviations from AutoAWQ: its clip search batches output channels by 256 or 64
and asserts one divides M; here any M works (batches of ``OC_BATCH`` plus a remainder), and the group
partial outputs are batched matmuls rather than broadcast products (same numbers up to summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from dsconvert.errors import ShapeError
from dsconvert.quant.rtn import Convention, QuantSpec, compute_qparams, dequantize, quantize, round_to_grid

__all__ = [
    "awq_search_scale",
    "awq_search_scale_streamed",
    "awq_scale_candidates",
    "awq_weight_sums",
    "awq_search_clip",
    "apply_clip",
    "pseudo_quantize",
    "fold_norm",
    "fold_linear_rows",
    "scale_columns",
]

#: Output channels per batch in the clip search (AutoAWQ uses 256 or 64). The working set is
#: ``(N/g) x n_tok x OC_BATCH`` float32 (about 115 MB for N = 7168, g = 128, 1023 tokens).
OC_BATCH = 512


def pseudo_quantize(w: torch.Tensor, spec: QuantSpec, convention: Convention) -> torch.Tensor:
    """``dequantize(quantize(w))``: ``(M, N)`` float32 weights on the quantization grid."""
    return dequantize(quantize(w, spec, convention))


def awq_weight_sums(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """The part of AWQ's ``w_mean`` one ``(M, N)`` weight contributes: ``(Σ_rows |w| / (max|w| of its group
    + 1e-6)`` ``(N,)`` float32, ``M``). Summed over weights and divided by the total rows it is ``w_mean``, so
    the statistic can be accumulated over experts streamed in groups (AutoAWQ computes it on the
    concatenated weights: the same sum, in another order)."""
    k = w.shape[1]
    g = spec.effective_group_size(k)
    a = w.to(torch.float32).abs().view(w.shape[0], k // g, g)  # (M, N/g, g)
    a = a / (a.amax(dim=-1, keepdim=True) + 1e-6)
    return a.view(w.shape[0], k).sum(dim=0), int(w.shape[0])


def _w_mean(weights: Sequence[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Mean over all rows of all ``weights`` of ``|w| / (max|w| of its group + 1e-6)``: ``(N,)`` float32."""
    k = weights[0].shape[1]
    total = torch.zeros(k, dtype=torch.float32, device=weights[0].device)
    rows = 0
    for w in weights:
        t, r = awq_weight_sums(w, spec)
        total += t
        rows += r
    return total / max(rows, 1)


def awq_scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int = 20,
                         duo_scaling: bool = True) -> Iterator[tuple[float, torch.Tensor]]:
    """AutoAWQ's grid of smoothing scales: for ``r = i / n_grid`` (``i < n_grid``) yields ``(r, s)`` with
    ``s = x_mean^r / (w_mean^(1-r) + 1e-4)`` (``duo_scaling``; else ``x_mean^r``) clamped ``≥ 1e-4``,
    divided by ``sqrt(max(s)·min(s))``, non-finite entries set to 1. ``x_mean``, ``w_mean``, ``s``:
    ``(N,)`` float32."""
    for i in range(n_grid):
        r = i / n_grid
        if duo_scaling:
            s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(r).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        yield r, torch.where(torch.isfinite(s), s, torch.ones_like(s))


def awq_search_scale_streamed(
    x_mean: torch.Tensor,
    w_mean: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], float],
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[torch.Tensor, float, list[float]]:
    """:func:`awq_search_scale` for an inspected module too large to hold at once: the caller accumulates
    ``x_mean`` and ``w_mean`` (:func:`awq_weight_sums`) and evaluates each candidate ``s`` itself
    (``loss_fn(s) -> MSE`` against the float output, e.g. streaming a MoE's experts in groups).

    Returns:
        ``(s (N,) float32, best_ratio, errors)``, as :func:`awq_search_scale`.

    Raises:
        RuntimeError: every candidate gave a non-finite error.
    """
    best_err, best_ratio, best_s = float("inf"), -1.0, None
    errors: list[float] = []
    for r, s in awq_scale_candidates(x_mean, w_mean, n_grid, duo_scaling):
        err = float(loss_fn(s))
        errors.append(err)
        if err < best_err:
            best_err, best_ratio, best_s = err, r, s
    if best_s is None:
        raise RuntimeError(f"AWQ scale search: no finite loss on the {n_grid}-point grid ({errors[:3]}...)")
    return best_s, best_ratio, errors


def awq_search_scale(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    forward_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    spec: QuantSpec,
    convention: Convention,
    n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search the smoothing scale ``s`` ``(N,)`` for linears sharing the input ``x`` (AutoAWQ
    ``_search_best_scale`` / ``_compute_best_scale``).

    ``w_mean`` = per-channel mean of group-normalised ``|w|`` over all ``weights``; ``x_mean`` = mean
    ``|x|`` per channel. For ``r`` in ``0, 1/n_grid, …, (n_grid-1)/n_grid``:
    ``s = x_mean^r / (w_mean^(1-r) + 1e-4)`` (``duo_scaling``; else ``x_mean^r``), clamped ``≥ 1e-4``,
    divided by ``sqrt(max(s)·min(s))``, non-finite entries set to 1; every weight becomes
    ``Q(W·s)/s`` and ``forward_fn`` is rerun; the ``s`` with the least MSE against
    ``forward_fn(weights)`` wins.

    Args:
        x: ``(n, N)`` input of the linears (any float dtype).
        weights: the ``(M_i, N)`` float weights that share ``x`` and will be quantized.
        forward_fn: ``forward_fn(list of (M_i, N) weights) -> output`` of the inspected module (the
            linears themselves, or a whole attention/MoE block) computed from ``x``.
        spec, convention: the quantization the weights will get.
        n_grid: grid points (20 in AutoAWQ).
        duo_scaling: use ``w_mean`` as well as ``x_mean``.

    Returns:
        ``(s (N,) float32, best_ratio, errors)``: ``errors[i]`` is the MSE at ratio ``i / n_grid``.

    Raises:
        ShapeError: the weights disagree with ``x`` on N.
        RuntimeError: every candidate gave a non-finite error.
    """
    if x.dim() != 2:
        raise ShapeError(f"AWQ input must be (n_tokens, N), got {tuple(x.shape)}")
    k = x.shape[1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ShapeError(f"AWQ weight {tuple(w.shape)} does not take inputs of width {k}")
    ws = [w.to(torch.float32) for w in weights]
    x_mean = x.to(torch.float32).abs().mean(dim=0) if x.shape[0] else torch.ones(k, device=x.device)  # (N,)
    w_mean = _w_mean(ws, spec)  # (N,)
    ref = forward_fn(ws).to(torch.float32)

    def loss(s: torch.Tensor) -> float:
        cand = [pseudo_quantize(w * s[None, :], spec, convention) / s[None, :] for w in ws]
        return float((forward_fn(cand).to(torch.float32) - ref).pow(2).mean())

    return awq_search_scale_streamed(x_mean, w_mean, loss, n_grid, duo_scaling)


def awq_search_clip(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    convention: Convention,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_token: int = 512,
) -> torch.Tensor:
    """Per output-channel group, the clipping bound ``max_val`` that minimises the group's output MSE
    (AutoAWQ ``_compute_best_clip``).

    Tokens are subsampled with step ``max(1, n // n_sample_token)`` (works for any ``n ≥ 0``,
    docs/known-failures.md item 30). For ``i < int(max_shrink·n_grid)``: ``max_val = max|w_group|·(1 - i/n_grid)``,
    weights clamped to ``±max_val`` and pseudo-quantized; the error of group ``j`` is
    ``mean_t (Σ_{c∈j} x_tc (q_c - w_c))²``.

    Args:
        w: ``(M, N)`` float weight (already scaled by AWQ's ``s``).
        x: ``(n, N)`` its input (already divided by ``s``).

    Returns:
        ``max_val`` ``(M, N // g, 1)`` float32 (``apply_clip``'s argument). With no tokens, ``max|w|``
        per group (no clipping).
    """
    n_out, k = w.shape
    g = spec.effective_group_size(k)
    if x.dim() != 2 or x.shape[1] != k:
        raise ShapeError(f"clip search input {tuple(x.shape)} does not match weight {n_out}x{k}")
    step = max(1, x.shape[0] // n_sample_token)
    groups = k // g
    xs = x[::step].to(device=w.device, dtype=torch.float32)  # (n_tok, N)
    wg_all = w.to(torch.float32).reshape(n_out, groups, g)  # (M, N/g, g)
    if xs.shape[0] == 0:
        return wg_all.abs().amax(dim=-1, keepdim=True)
    xg = xs.reshape(-1, groups, g).permute(1, 0, 2)  # (N/g, n_tok, g)
    out = []
    for b0 in range(0, n_out, OC_BATCH):
        wg = wg_all[b0:b0 + OC_BATCH]  # (B, N/g, g)
        org_max = wg.abs().amax(dim=-1, keepdim=True)  # (B, N/g, 1)
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        org_out = torch.bmm(xg, wg.permute(1, 2, 0))  # (N/g, n_tok, B): per-group partial outputs
        for i_s in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i_s / n_grid)
            cur = torch.maximum(torch.minimum(wg, max_val), -max_val)  # (B, N/g, g)
            scale, zero = compute_qparams(cur, spec, convention)  # (B, N/g) each
            z = None if zero is None else zero[..., None].to(torch.float32)
            q = round_to_grid(cur, scale[..., None], z, spec.bits, convention.signed)
            deq = (q - z) * scale[..., None] if z is not None else q * scale[..., None]
            cur_out = torch.bmm(xg, deq.permute(1, 2, 0))  # (N/g, n_tok, B)
            err = (cur_out - org_out).pow_(2).mean(dim=1).t()[..., None]  # (B, N/g, 1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        out.append(best_max)
    return torch.cat(out, dim=0)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``clamp(w, -max_val, max_val)`` per group: ``w`` ``(M, N)``, ``max_val`` ``(M, N // g, 1)`` →
    ``(M, N)`` float32 (AutoAWQ ``scale.py::apply_clip``)."""
    n, k = w.shape
    mv = max_val.to(device=w.device, dtype=torch.float32)
    wg = w.to(torch.float32).reshape(n, mv.shape[1], -1)  # (M, N/g, g)
    return torch.maximum(torch.minimum(wg, mv), -mv).reshape(n, k)


# -- folds (float-exact up to rounding: the float model's output does not change) -------------------
def fold_norm(norm_weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight followed by linears scaled by ``s``: ``norm_weight / s`` (``scale_ln_fcs``), float32."""
    return norm_weight.to(torch.float32) / s.to(norm_weight.device, torch.float32)


def scale_columns(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W·diag(s)``: a linear ``(M, N)`` whose input was divided by ``s`` (its columns ``*= s``), float32."""
    return w.to(torch.float32) * s.to(w.device, torch.float32)[None, :]


def fold_linear_rows(w_prev: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The previous linear of a linear→linear fold (``scale_fc_fc``): its output rows ``/= s``,
    ``(N, P)`` float32: N = the next linear's in_features, P = its own (e.g. ``up_proj`` before ``down_proj``,
    through the gate product)."""
    return w_prev.to(torch.float32) / s.to(w_prev.device, torch.float32)[:, None]
