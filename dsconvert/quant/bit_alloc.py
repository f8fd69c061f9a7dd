"""Per-tensor type choice under a size budget: the sensitivity measure and the allocation (pure functions).

Sensitivity of one linear (weight ``W [M, N]``, M = out_features, N = in_features) to a quantizer ``Q``: the
expected squared error of its output relative to the output's energy, with the input's per-column second moments
``w_j = E[x_j^2]`` (llama.cpp's importance matrix; all ones without one) and the columns of the input taken as
uncorrelated::

    rel(Q) = sum_ij w_j (W_ij - Q(W)_ij)^2 / sum_ij w_j W_ij^2        (= E||(W - Q(W)) x||^2 / E||W x||^2)

Every linear's relative output error adds noise of the same order to the residual stream, whatever its size, so
the file's error is taken as the sum of ``rel`` over its tensors (a stacked expert tensor counts once, as one
linear of the layer), and the allocation minimises that sum subject to the byte budget: a Lagrangian (rate-
distortion) choice, made greedily on each tensor's lower convex hull of (bytes, rel) points, which is optimal for
convex per-tensor curves up to the last step that no longer fits (Shoham & Gersho, "Efficient bit allocation for
an arbitrary set of quantizers", IEEE Trans. ASSP 36(9), 1988).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


def weighted_rel_error(x: torch.Tensor, x_hat: torch.Tensor, w: torch.Tensor | None = None) -> tuple[float, float]:
    """``(sum_ij w_j (x - x_hat)^2, sum_ij w_j x^2)`` of rows ``x``/``x_hat`` (float, ``[R, N]``) with column
    weights ``w`` (``[N]``, non-negative; None: ones), in float64. Sum both over samples, then divide."""
    x = x.to(torch.float64)
    d = (x - x_hat.to(torch.float64)) ** 2
    e = x * x
    if w is not None:
        w = w.to(torch.float64)
        d, e = d * w, e * w
    return float(d.sum()), float(e.sum())


@dataclass(frozen=True)
class Choice:
    """One candidate type of one tensor: its bytes in the file and its relative output error."""

    type: str
    nbytes: int
    rel_error: float


def _hull(choices: list[Choice]) -> list[Choice]:
    """The lower convex hull of (bytes, error), bytes increasing, error strictly decreasing: the choices an
    optimal allocation can stop at (a dominated or non-convex point is never the best use of its bytes)."""
    pts: list[Choice] = []
    for c in sorted(choices, key=lambda c: (c.nbytes, c.rel_error)):
        if pts and c.rel_error >= pts[-1].rel_error:
            continue  # no better than a cheaper one
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a-c: drop it
            if (b.rel_error - a.rel_error) * (c.nbytes - a.nbytes) >= (c.rel_error - a.rel_error) * (b.nbytes - a.nbytes):
                pts.pop()
            else:
                break
        pts.append(c)
    return pts


def allocate(options: dict[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """One choice per tensor with the total bytes at most ``budget`` and the summed ``rel_error`` as small as the
    greedy hull walk finds: start every tensor at its smallest choice, then repeatedly take the upgrade with the
    largest error drop per byte that still fits.

    Args:
        options: tensor name -> its candidate choices (at least one each).
        budget: bytes available to these tensors.

    Returns:
        tensor name -> the chosen :class:`Choice`.

    Raises:
        ValueError: the smallest choices alone exceed ``budget`` (the message gives that minimum in bytes).
    """
    hulls = {n: _hull(c) for n, c in options.items()}
    pos = {n: 0 for n in hulls}
    used = sum(h[0].nbytes for h in hulls.values())
    if used > budget:
        raise ValueError(f"the smallest types need {used} bytes, more than the budget of {budget}")
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            gain = (h[i].rel_error - h[i + 1].rel_error) / max(1, h[i + 1].nbytes - h[i].nbytes)
            heapq.heappush(heap, (-gain, n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        step = h[i + 1].nbytes - h[i].nbytes
        if used + step > budget:
            continue  # this tensor stops here; cheaper upgrades of others may still fit
        used += step
        pos[n] = i + 1
        push(n)
    return {n: hulls[n][pos[n]] for n in hulls}
