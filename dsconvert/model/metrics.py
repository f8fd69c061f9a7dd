"""Logit and hidden-state comparison metrics, as ``llama-perplexity --kl-divergence`` reports them.

All math is float64. Positions: llama-perplexity scores position ``i`` only when it has a next token
``token_ids[i+1]``, so every metric here uses positions ``0 .. T-2`` (it additionally skips the first
half of each context window; we score every position of the sequence given).

Source: ggml-org/llama.cpp ``tools/perplexity/perplexity.cpp`` (``kl_divergence_result``,
``log_softmax(..., kl_divergence_result &)``): ``p_diff = p_cand(next) - p_base(next)`` and
``RMS Δp = sqrt(mean(p_diff**2))``, reported there as a percentage (here a fraction).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def nonfinite_summary(logits: torch.Tensor) -> dict:
    """Count NaN / ±inf entries of ``(T, V)`` logits.

    Returns:
        ``{"n_nan": int, "n_posinf": int, "n_neginf": int, "bad_positions": list[int],
        "ok": bool}``; ``bad_positions`` lists rows holding any non-finite value (first 32).
    """
    x = logits.detach()
    nan = torch.isnan(x)
    pinf = torch.isposinf(x)
    ninf = torch.isneginf(x)
    bad = (nan | pinf | ninf).reshape(x.shape[0], -1).any(dim=-1) if x.dim() > 0 else nan
    rows = torch.nonzero(bad).flatten().tolist() if x.dim() > 0 else []
    return {
        "n_nan": int(nan.sum()),
        "n_posinf": int(pinf.sum()),
        "n_neginf": int(ninf.sum()),
        "bad_positions": rows[:32],
        "ok": not rows,
    }


def compare_logits(ref_logits: torch.Tensor, cand_logits: torch.Tensor, token_ids: torch.Tensor) -> dict:
    """Compare candidate logits against reference logits over one token sequence.

    Args:
        ref_logits, cand_logits: ``(T, V)`` logits for every position (any float dtype).
        token_ids: ``(T,)`` the sequence; ``token_ids[i+1]`` is the target of position ``i``.

    Returns:
        A dict of floats (and ints for counts), over the ``N = T - 1`` scored positions:

        * ``mean_kld``, ``max_kld``, ``p99_kld``, ``p999_kld``, ``median_kld``:
          ``KL(P_ref || P_cand) = sum_v p_ref (ln p_ref - ln p_cand)`` per position
          (percentiles by numpy's linear interpolation);
        * ``same_top_p``: fraction of positions with equal argmax (first index on ties);
        * ``rms_dp``, ``mean_dp``, ``max_abs_dp``: ``Δp = p_cand(next) - p_ref(next)``;
        * ``ppl_reference``, ``ppl_candidate``: ``exp(mean NLL of the next token)``;
        * ``ln_ppl_ratio``: ``ln(ppl_candidate / ppl_reference)``;
        * ``n_positions``; ``ref_nonfinite`` / ``cand_nonfinite``: :func:`nonfinite_summary`.

    Raises:
        ValueError: shape mismatch, ``T < 2``, or a token id outside ``0..V-1``.
    """
    if ref_logits.shape != cand_logits.shape or ref_logits.dim() != 2:
        raise ValueError(
            f"logit shapes differ or are not (T, V): {tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)}"
        )
    T, V = ref_logits.shape
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if token_ids.numel() != T:
        raise ValueError(f"token_ids has {token_ids.numel()} entries, logits have {T} positions")
    if T < 2:
        raise ValueError("need at least 2 tokens (one scored position)")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= V:
        raise ValueError(f"token id outside 0..{V - 1}")

    lp_ref = ref_logits[:-1].to(torch.float64).log_softmax(dim=-1)  # (N, V)
    lp_cand = cand_logits[:-1].to(torch.float64).log_softmax(dim=-1)  # (N, V)
    p_ref = lp_ref.exp()
    terms = torch.where(p_ref > 0, p_ref * (lp_ref - lp_cand), torch.zeros_like(p_ref))  # (N, V)
    kld = terms.sum(dim=-1).numpy()  # (N,)

    same_top = (lp_ref.argmax(dim=-1) == lp_cand.argmax(dim=-1)).to(torch.float64)
    nxt = token_ids[1:, None]  # (N, 1)
    nll_ref = -lp_ref.gather(1, nxt).squeeze(1)  # (N,)
    nll_cand = -lp_cand.gather(1, nxt).squeeze(1)
    dp = torch.exp(-nll_cand) - torch.exp(-nll_ref)  # (N,)

    mean_nll_ref = float(nll_ref.mean())
    mean_nll_cand = float(nll_cand.mean())
    with np.errstate(invalid="ignore"):  # NaN logits give NaN metrics; nonfinite_summary says why
        p999, p99, med = (float(np.percentile(kld, 99.9)), float(np.percentile(kld, 99.0)), float(np.median(kld)))
    return {
        "n_positions": int(T - 1),
        "mean_kld": float(np.mean(kld)),
        "max_kld": float(np.max(kld)),
        "p999_kld": p999,
        "p99_kld": p99,
        "median_kld": med,
        "same_top_p": float(same_top.mean()),
        "rms_dp": float(torch.sqrt((dp * dp).mean())),
        "mean_dp": float(dp.mean()),
        "max_abs_dp": float(dp.abs().max()),
        "ppl_reference": math.exp(mean_nll_ref),
        "ppl_candidate": math.exp(mean_nll_cand),
        "ln_ppl_ratio": mean_nll_cand - mean_nll_ref,
        "ref_nonfinite": nonfinite_summary(ref_logits),
        "cand_nonfinite": nonfinite_summary(cand_logits),
    }


def layer_errors(ref_hidden: list[torch.Tensor], cand_hidden: list[torch.Tensor]) -> list[dict]:
    """Per-layer relative error of the residual stream, to localise where two models diverge.

    Args:
        ref_hidden, cand_hidden: equal-length lists of ``(T, hidden)`` tensors (e.g.
            ``ForwardOutput.hidden_states``).

    Returns:
        ``[{"layer": i, "rel_error": ||a - b|| / ||a||, "max_abs_error": max|a - b|}, ...]``
        (Frobenius norms in float64; ``rel_error`` is ``inf`` if ``||a|| == 0 != ||a - b||``).

    Raises:
        ValueError: different layer counts or shapes.
    """
    if len(ref_hidden) != len(cand_hidden):
        raise ValueError(f"{len(ref_hidden)} reference layers vs {len(cand_hidden)} candidate layers")
    out = []
    for i, (a, b) in enumerate(zip(ref_hidden, cand_hidden)):
        if a.shape != b.shape:
            raise ValueError(f"layer {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        diff = float(torch.linalg.vector_norm(a64 - b64))
        ref = float(torch.linalg.vector_norm(a64))
        rel = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
        max_abs = float((a64 - b64).abs().max()) if a.numel() else 0.0
        out.append({"layer": i, "rel_error": rel, "max_abs_error": max_abs})
    return out
