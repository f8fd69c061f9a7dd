"""SignRound: learned rounding offsets and clipping for group-wise INT weights, by sign-gradient descent on a
block's output error.

Per weight ``W`` ``[M, N]`` (M = out_features, N = in_features) quantized group-wise (``g`` input channels per
group, ``G = N // g`` groups per row):

* ``V`` ``[M, N]`` float32, the rounding offset, in ``[-0.5, 0.5]`` (init 0): ``q = clamp(round(W / s + V) + z)``.
* per group clipping factors in ``[0.5, 1]`` (init 1): asymmetric schemes scale the group minimum by
  ``alpha`` and the maximum by ``beta`` (``[M, G]`` each) before the scale and zero point are computed;
  symmetric schemes scale the group's ``absmax`` by one factor ``beta``.

Everything else is the RTN rule of :mod:`dsconvert.quant.rtn` (the convention's scale storage dtype, the
asymmetric range extended to include 0, the AutoAWQ range floor), so with ``V = 0`` and factors 1 the
integers, scales and zeros are exactly :func:`~dsconvert.quant.rtn.quantize`'s. In the trial forward,
``round`` (of ``W / s + V``, of the zero point and of the scale to its storage dtype) passes the gradient
straight through (straight-through estimator).

:func:`signround` optimizes ``V`` and the factors of a set of linears against a caller's block loss: each
iteration draws ``batch_size`` calibration samples (seeded ``randperm``), evaluates the loss with the trial
quantize-dequantized weights, keeps the parameters of the lowest loss seen, and steps every parameter by
``-lr_t * sign(grad)`` with ``lr_t = lr * (1 - t / iters)`` (linear decay to 0), then clamps them to their
ranges. After the last iteration the best parameters give the returned :class:`~dsconvert.quant.rtn.QTensor`.

Sources: W. Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs"
(arXiv 2309.05516); Intel auto-round (``AutoRound``: defaults ``iters=200``, ``lr=1/iters``,
``minmax_lr=lr``, ``batch_size=8``, sign-SGD with a linear LR schedule to 0, best-loss parameters kept,
``enable_minmax_tuning``). Facts carried over; the code here is independent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from dsconvert.errors import UsageError

from .rtn import Convention, QTensor, QuantSpec, _q_dtype, _round_scale, qrange

__all__ = ["SignRoundWeight", "SignRoundResult", "signround", "DEFAULT_ITERS", "DEFAULT_BATCH"]

#: auto-round's default iterations per block.
DEFAULT_ITERS = 200
#: auto-round's default calibration samples per iteration.
DEFAULT_BATCH = 8
#: Range of the clipping factors (auto-round's min/max scale).
CLIP_RANGE = (0.5, 1.0)


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` in the forward, identity gradient to ``x`` in the backward."""
    return x + (rounded - x).detach()


class SignRoundWeight:
    """One linear's SignRound state: the float weight and its learnable ``v`` and clipping factors.

    Args:
        w: ``[M, N]`` float weight (any float dtype; held as float32 on its device).
        spec: bits, group size (-1: per channel), symmetric.
        convention: storage convention (signedness, scale dtype, range floor).
        minmax: learn the clipping factors (auto-round ``enable_minmax_tuning``); else only ``v``.
        name: the module name, for error messages.

    Attributes:
        v: ``[M, N]`` float32, requires grad. alpha: ``[M, G]`` float32 (asymmetric and ``minmax`` only, else
        None). beta: ``[M, G]`` float32 (``minmax`` only, else None).

    Raises:
        ShapeError: ``w`` not 2-D or the group size does not divide N.
    """

    def __init__(self, w: torch.Tensor, spec: QuantSpec, convention: Convention, *, minmax: bool = True,
                 name: str | None = None):
        if w.dim() != 2:
            from dsconvert.errors import ShapeError

            raise ShapeError(f"SignRound needs a 2-D [M, N] weight, got {tuple(w.shape)}")
        self.w = w.detach().to(torch.float32)
        self.spec, self.convention, self.name = spec, convention, name
        M, N = self.w.shape
        self.g = spec.effective_group_size(N, name)
        G = N // self.g
        dev = self.w.device
        self.v = torch.zeros((M, N), dtype=torch.float32, device=dev, requires_grad=True)
        self.beta = torch.ones((M, G), dtype=torch.float32, device=dev, requires_grad=True) if minmax else None
        self.alpha = (torch.ones((M, G), dtype=torch.float32, device=dev, requires_grad=True)
                      if minmax and not spec.symmetric else None)

    @property
    def params(self) -> list[torch.Tensor]:
        """The learnable tensors: ``v`` then the factors that exist."""
        return [p for p in (self.v, self.alpha, self.beta) if p is not None]

    def _qparams(self, xg: torch.Tensor, ste: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale ``[M, G]`` float32 and zero point ``[M, G]`` float32 (None: symmetric signed) of the groups
        ``xg`` ``[M, G, g]`` under the current factors; ``ste``: rounding differentiable (straight through)."""
        spec, conv = self.spec, self.convention
        levels = (1 << spec.bits) - 1
        off = 1 << (spec.bits - 1)

        def rscale(s: torch.Tensor) -> torch.Tensor:
            r = _round_scale(s.detach(), conv.scale_dtype, self.name)
            return _ste(s, r) if ste else r

        if spec.symmetric:
            amax = torch.maximum(xg.amax(dim=-1), -xg.amin(dim=-1))
            if self.beta is not None:
                amax = amax * self.beta
            s = rscale(amax / (levels / 2))
            return s, None if conv.signed else torch.full_like(s, float(off))
        lo = xg.amin(dim=-1).clamp(max=0.0)
        hi = xg.amax(dim=-1).clamp(min=0.0)
        if self.alpha is not None:
            lo = lo * self.alpha
        if self.beta is not None:
            hi = hi * self.beta
        rng = hi - lo
        if conv.range_floor:
            rng = rng.clamp(min=conv.range_floor)
        s = rscale(rng / levels)
        zr = -lo / s
        zu = (_ste(zr, torch.round(zr.detach())) if ste else torch.round(zr)).clamp(0, levels)
        return s, (zu - off if conv.signed else zu)

    def fake_quant(self) -> torch.Tensor:
        """The trial quantize-dequantized weight ``[M, N]`` float32, differentiable in ``v`` and the factors."""
        M, N = self.w.shape
        xg = self.w.view(M, N // self.g, self.g)
        s, z = self._qparams(xg, ste=True)
        qmin, qmax = qrange(self.spec.bits, self.convention.signed)
        y = xg / s[..., None] + self.v.view_as(xg)
        y = _ste(y, torch.round(y.detach()))
        if z is not None:
            y = y + z[..., None]
        y = y.clamp(qmin, qmax)
        if z is not None:
            y = y - z[..., None]
        return (y * s[..., None]).view(M, N)

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        """The integers, scales and zeros of the current parameters, as :func:`~dsconvert.quant.rtn.quantize`
        stores them: q ``[M, N]`` int8/uint8, scale ``[M, G]`` float32 (exact in the storage dtype), zero
        ``[M, G]`` in q's dtype or None; on the weight's device."""
        M, N = self.w.shape
        xg = self.w.view(M, N // self.g, self.g)
        s, z = self._qparams(xg, ste=False)
        qmin, qmax = qrange(self.spec.bits, self.convention.signed)
        qdt = _q_dtype(self.spec.bits, self.convention.signed)
        y = torch.round(xg / s[..., None] + self.v.view_as(xg))
        if z is not None:
            y += z[..., None]
        y.clamp_(qmin, qmax)
        zero = None if z is None else z.to(qdt)
        return QTensor(y.view(M, N).to(qdt), s, zero, self.spec, self.convention)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``v`` to ``[-0.5, 0.5]`` and the factors to :data:`CLIP_RANGE` in place."""
        self.v.clamp_(-0.5, 0.5)
        for p in (self.alpha, self.beta):
            if p is not None:
                p.clamp_(*CLIP_RANGE)


@dataclass
class SignRoundResult:
    """What :func:`signround` returns.

    Attributes:
        quantized: ``{name: QTensor}`` from the best parameters.
        loss_init: the loss of the first iteration (the RTN weights, ``V = 0``, factors 1); None for 0 iters.
        loss_best: the lowest loss seen (the parameters returned); None for 0 iters.
        best_iter: the iteration it was seen at (-1 for 0 iters).
        losses: the loss of every iteration, in order.
    """

    quantized: dict[str, QTensor]
    loss_init: float | None
    loss_best: float | None
    best_iter: int
    losses: list[float] = field(default_factory=list)


def signround(
    weights: Mapping[str, SignRoundWeight],
    loss_fn: Callable[[Mapping[str, torch.Tensor], list[int]], torch.Tensor],
    n_samples: int,
    *,
    iters: int = DEFAULT_ITERS,
    lr: float | None = None,
    minmax_lr: float | None = None,
    batch_size: int = DEFAULT_BATCH,
    seed: int = 0,
) -> SignRoundResult:
    """Optimize the rounding offsets and clipping factors of ``weights`` by sign-gradient descent.

    Args:
        weights: ``{name: SignRoundWeight}``, optimized jointly.
        loss_fn: ``loss_fn(qdq, batch)``: the block's scalar loss (float32, differentiable in ``qdq``) with
            ``qdq[name]`` ``[M, N]`` the trial quantize-dequantized weights, on calibration samples ``batch``
            (indices into ``0..n_samples-1``); e.g. the MSE between the block's output with these weights
            and its float output.
        n_samples: calibration samples the batches are drawn from.
        iters: iterations (0: the RTN result, no loss evaluated).
        lr: step of ``v`` (default ``1 / iters``); minmax_lr: step of the factors (default ``lr``).
        batch_size: samples per iteration (at most ``n_samples``).
        seed: seeds the batch order (a ``torch.Generator`` on the CPU; the same seed gives the same result).

    Returns:
        :class:`SignRoundResult`; the weights' parameters are left at the best values.

    Raises:
        UsageError: ``iters < 0``, ``n_samples < 1``, ``batch_size < 1`` or a non-positive learning rate.
    """
    if iters < 0 or n_samples < 1 or batch_size < 1:
        raise UsageError(f"SignRound needs iters >= 0, samples >= 1, batch >= 1 (got {iters}, {n_samples}, "
                         f"{batch_size})")
    lr = 1.0 / iters if lr is None and iters else (lr or 0.0)
    minmax_lr = lr if minmax_lr is None else minmax_lr
    if iters and (lr <= 0 or minmax_lr <= 0):
        raise UsageError(f"SignRound learning rates must be positive (lr {lr}, minmax_lr {minmax_lr})")
    gen = torch.Generator().manual_seed(int(seed))
    bs = min(batch_size, n_samples)
    best: dict[str, list[torch.Tensor]] | None = None
    best_loss, best_iter, losses = float("inf"), -1, []
    for t in range(iters):
        batch = sorted(torch.randperm(n_samples, generator=gen)[:bs].tolist())
        with torch.enable_grad():
            loss = loss_fn({n: sw.fake_quant() for n, sw in weights.items()}, batch)
            for sw in weights.values():
                for p in sw.params:
                    p.grad = None
            loss.backward()
        val = float(loss.detach())
        losses.append(val)
        if val < best_loss:
            best_loss, best_iter = val, t
            best = {n: [p.detach().clone() for p in sw.params] for n, sw in weights.items()}
        decay = 1.0 - t / iters
        with torch.no_grad():
            for sw in weights.values():
                for p in sw.params:
                    if p.grad is not None:
                        p -= (lr if p is sw.v else minmax_lr) * decay * torch.sign(p.grad)
                sw.clamp_()
    if best is not None:
        with torch.no_grad():
            for n, sw in weights.items():
                for p, b in zip(sw.params, best[n]):
                    p.copy_(b)
    return SignRoundResult({n: sw.qtensor() for n, sw in weights.items()}, losses[0] if losses else None,
                           best_loss if losses else None, best_iter, losses)
