"""GPTQ: quantize ``W`` column by column, pushing each column's rounding error onto the columns not yet
quantized through the inverse Hessian of the layer's inputs, so ``||X Wᵀ - X Ŵᵀ||`` stays small.

Source: Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323), Algorithm 1; AutoGPTQ ``auto_gptq/quantization/gptq.py``
(``GPTQ.add_batch``, ``GPTQ.fasterquant``); docs/int-formats.md §6.

Pure tensor code (no file I/O); runs wherever its inputs live (CPU or CUDA), in float32.

Notation: ``W`` is ``(M, N)`` (M = out_features, N = in_features), ``H`` is ``(N, N)``, ``g`` the group
length along N.

Deviations from AutoGPTQ ``fasterquant`` (each keeps the result exactly representable as a
:class:`~dsconvert.quant.rtn.QTensor`):

* Group parameters are computed at each group start from the **fully error-updated** weights of the
  group (AutoGPTQ reads the outer ``W``, which misses the updates of earlier columns of the same
  128-column block when ``g < 128``). This makes the lazy-batched result equal to the plain
  column-by-column algorithm.
* ``act_order`` needs ``static_groups`` (llm-compressor's ``actorder="static"``): group parameters are
  fixed from the weights before any update, so the groups stay contiguous in the original column order
  and no ``g_idx`` is needed. Dynamic act-order groups (AutoGPTQ ``desc_act`` without static groups) would
  need a ``g_idx``, which QTensor does not carry.
* An all-zero Hessian (a linear that saw no calibration tokens) does not zero the weight (AutoGPTQ does,
  docs/known-failures.md item 29): there is no information to act on, so the result is plain RTN.
* Scale rounding to the storage dtype and the zero-point rules are :mod:`dsconvert.quant.rtn`'s.
"""

from __future__ import annotations

import torch

from dsconvert.errors import BadInputError, ShapeError, UsageError
from dsconvert.quant.rtn import Convention, QTensor, QuantSpec, compute_qparams, quantize, round_to_grid

__all__ = ["HessianAccumulator", "gptq_quantize", "gptq_quantize_batch", "output_error"]

#: Damping retries: λ is multiplied by 10 after each failed Cholesky (GPTQModel auto-increments damp).
MAX_DAMP_RETRIES = 6


class HessianAccumulator:
    """Running ``H = 2/n Σ_t x_t x_tᵀ`` over calibration tokens, ``(N, N)`` float32 (AutoGPTQ ``add_batch``).

    Args:
        k: in_features.
        device: where ``H`` lives (default: the device of the first batch, CPU before).

    Attributes:
        H: ``(N, N)`` float32.
        n: tokens seen so far.
    """

    def __init__(self, k: int, device: torch.device | str | None = None):
        self.k = k
        self.n = 0
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add ``x`` ``(n, N)`` (any float dtype): ``H ← H·n_old/n_new + (2/n_new)·xᵀx`` in float32.

        Raises:
            ShapeError: ``x`` is not ``(n, N)``.
        """
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ShapeError(f"Hessian input must be (n_tokens, {self.k}), got {tuple(x.shape)}")
        t = x.shape[0]
        if t == 0:
            return
        xf = x.to(device=self.H.device, dtype=torch.float32)
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        xf = xf * (2.0 / self.n) ** 0.5
        self.H.addmm_(xf.t(), xf)  # (N, n) @ (n, N)


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factors of ``(H_b + λ_b I)⁻¹`` with ``λ_b = damp·mean(diag H_b)``, λ_b ×10 for each
    item whose factorisation fails (retried alone).

    Args:
        H: ``(B, N, N)`` float32 Hessians; not modified.

    Returns:
        ``(B, N, N)`` upper-triangular float32.

    Raises:
        BadInputError: an item is still not positive definite after ``MAX_DAMP_RETRIES`` retries
            (e.g. NaN inputs).
    """
    b, k, _ = H.shape
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).to(torch.float64)  # (B,)
    out: torch.Tensor | None = None  # allocated only when some item needs a retry (saves a (B, N, N) copy)
    todo = torch.arange(b, device=H.device)
    d = torch.full((b,), float(damp), dtype=torch.float64, device=H.device)
    for _ in range(MAX_DAMP_RETRIES + 1):
        Hd = H[todo] if todo.numel() < b else H.clone()
        torch.diagonal(Hd, dim1=-2, dim2=-1).add_((d[todo] * mean_diag[todo]).to(torch.float32)[:, None])
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        ok = info == 0
        Hi = torch.cholesky_inverse(L)
        del L
        U, info2 = torch.linalg.cholesky_ex(Hi, upper=True)
        del Hi
        good = ok & (info2 == 0) & torch.isfinite(U).flatten(1).all(dim=1)
        if out is None:
            if bool(good.all()):
                return U
            out = torch.empty_like(H)
        out[todo[good]] = U[good]
        del U
        todo = todo[~good]
        if todo.numel() == 0:
            return out
        d[todo] *= 10.0
    raise BadInputError(
        f"GPTQ: Hessian ({k}x{k}) is not positive definite even with damp {float(d[todo[0]]) / 10:g}",
        remedy="check-calibration",
    )


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    convention: Convention,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    name: str | None = None,
) -> QTensor:
    """GPTQ-quantize ``w`` ``(M, N)`` given the input Hessian ``H`` ``(N, N)`` (AutoGPTQ ``fasterquant``).

    Steps: dead channels (``H_ii = 0``) get ``H_ii = 1`` and ``W[:, i] = 0``; ``H += λI`` with
    ``λ = damp·mean(diag H)`` (×10 and retry if Cholesky fails); ``Hinv`` = upper Cholesky of ``H⁻¹``;
    columns processed in blocks of ``block_size`` with lazy updates: column ``i`` is rounded with
    :func:`~dsconvert.quant.rtn.round_to_grid` using the group's params (from
    :func:`~dsconvert.quant.rtn.compute_qparams` on the error-updated weights at the group start),
    ``err = (w_i - ŵ_i) / Hinv_ii`` is pushed onto the rest of the block, and the block's errors onto the
    later columns with one matmul.

    Args:
        w: ``(M, N)`` float weight (any float dtype; computed in float32 on its device).
        H: ``(N, N)`` Hessian (e.g. :class:`HessianAccumulator` ``.H``); not modified.
        spec: bits / group size (-1 = per-channel) / symmetric.
        convention: storage convention (signedness, scale dtype).
        damp: relative dampening (AutoGPTQ ``damp_percent``).
        block_size: lazy-batch width (128 in AutoGPTQ; any value gives the same result up to rounding).
        act_order: process columns by decreasing ``diag(H)``; requires ``static_groups``.
        static_groups: group params fixed from the (dead-zeroed) weights before any update.
        name: tensor name for error messages.

    Returns:
        :class:`QTensor` whose :func:`~dsconvert.quant.rtn.dequantize` equals the GPTQ-quantized weights.

    Raises:
        ShapeError: shapes disagree or the group size does not divide N.
        UsageError: ``act_order`` without ``static_groups`` on a grouped spec.
        BadInputError: non-finite weights or Hessian.
    """
    if w.dim() != 2:
        raise ShapeError(f"GPTQ needs a 2-D (out, in) weight, got {tuple(w.shape)}")
    n, k = w.shape
    if tuple(H.shape) != (k, k):
        raise ShapeError(f"Hessian shape {tuple(H.shape)} does not match weight {n}x{k} (expected ({k}, {k}))")
    g = spec.effective_group_size(k, name)
    if act_order and not static_groups and g != k:
        raise UsageError("GPTQ act_order with dynamic groups needs a g_idx, which dsconvert does not write",
                         remedy="static-groups")
    return gptq_quantize_batch(w[None], H[None], spec, convention, damp=damp, block_size=block_size,
                               act_order=act_order, static_groups=static_groups, names=[name])[0]


def gptq_quantize_batch(
    w: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    convention: Convention,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    names: list[str | None] | None = None,
) -> list[QTensor]:
    """:func:`gptq_quantize` of ``B`` independent weights of one shape at once (e.g. the experts of a MoE
    layer in flight), with one batched Cholesky and one column loop for the whole batch.

    Item ``b`` gets exactly the algorithm of :func:`gptq_quantize` on ``(w[b], H[b])``; the batched matmuls
    can round differently in the last bit. With ``act_order`` (a column order per item) the items run one
    by one. Rows of one weight are independent given its Hessian, so linears sharing an input (gate/up)
    can be stacked along M.

    Args:
        w: ``(B, M, N)`` float weights; H: ``(B, N, N)`` Hessians (not modified).
        names: ``B`` tensor names for error messages.
        others: as :func:`gptq_quantize`.

    Returns:
        ``B`` :class:`QTensor` of shape ``(M, N)``.

    Raises:
        as :func:`gptq_quantize`.
    """
    if w.dim() != 3 or H.dim() != 3 or H.shape[0] != w.shape[0]:
        raise ShapeError(f"batched GPTQ needs (B, M, N) weights and (B, N, N) Hessians, got {tuple(w.shape)} "
                         f"and {tuple(H.shape)}")
    bsz, n, k = w.shape
    names = list(names) if names is not None else [None] * bsz
    if tuple(H.shape[1:]) != (k, k):
        raise ShapeError(f"Hessian shape {tuple(H.shape[1:])} does not match weight {n}x{k} (expected ({k}, {k}))")
    g = spec.effective_group_size(k, names[0])
    if act_order and not static_groups and g != k:
        raise UsageError("GPTQ act_order with dynamic groups needs a g_idx, which dsconvert does not write",
                         remedy="static-groups")
    for b in range(bsz):
        if not torch.isfinite(w[b]).all():
            raise BadInputError(f"GPTQ: weight {names[b] or ''} holds NaN or inf".replace("  ", " "))
        if not torch.isfinite(H[b]).all():
            raise BadInputError(f"GPTQ: Hessian of {names[b] or 'a linear'} holds NaN or inf",
                                remedy="calibrate-fp32")
    out: list[QTensor | None] = [None] * bsz
    live = []
    for b in range(bsz):
        if bool((torch.diagonal(H[b]) == 0).all()):  # no calibration data at all: nothing to compensate with
            out[b] = quantize(w[b].to(torch.float32), spec, convention, name=names[b])
        else:
            live.append(b)
    if act_order:
        for b in live:
            out[b] = _gptq_core(w[b:b + 1], H[b:b + 1], spec, convention, g, damp, block_size, True, True)[0]
    elif live:
        sel = live if len(live) < bsz else slice(None)
        res = _gptq_core(w[sel], H[sel], spec, convention, g, damp, block_size, False, static_groups)
        for b, qt in zip(live, res):
            out[b] = qt
    return out  # type: ignore[return-value]


def _gptq_core(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, convention: Convention, g: int, damp: float,
               block_size: int, act_order: bool, static_groups: bool) -> list[QTensor]:
    """The batched column loop: ``w`` ``(B, M, N)``, ``H`` ``(B, N, N)``; ``act_order`` only with ``B == 1``."""
    W = w.to(torch.float32).clone()
    bsz, n, k = W.shape
    H = H.to(device=W.device, dtype=torch.float32)
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0  # (B, N)
    if bool(dead.any()):  # H_ii = 1 for dead channels: on a copy (the caller's H is not modified)
        # (otherwise no copy: H is only read, here and by _inverse_cholesky_upper, which makes its own
        # damped copy; this saves one (B, N, N) float32, 1 GiB for a real o_proj)
        H = H.clone()
        torch.diagonal(H, dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    W.masked_fill_(dead[:, None, :], 0.0)

    groups = k // g
    levels_dtype = torch.int8 if convention.signed else torch.uint8
    scale = torch.empty(bsz, n, groups, dtype=torch.float32, device=W.device)
    zero = None if (convention.signed and spec.symmetric) else torch.empty(bsz, n, groups, dtype=levels_dtype,
                                                                          device=W.device)
    if static_groups or g == k:
        s0, z0 = compute_qparams(W.view(bsz, n, groups, g), spec, convention)  # (B, M, N/g) each
        scale.copy_(s0)
        if zero is not None:
            zero.copy_(z0)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H[0]), descending=True)
        W = W[:, :, perm]
        H = H[:, perm][:, :, perm]
    Hinv = _inverse_cholesky_upper(H, damp)  # (B, N, N)
    del H, diag

    qint = torch.zeros_like(W)  # integer levels, (B, M, N) in processing order
    dynamic = not (static_groups or g == k)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, :, i1:i2].clone()  # (B, M, bw)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]  # (B, bw, bw)
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            gi = orig // g
            if dynamic and col % g == 0:
                # The group's weights with every earlier column's error applied: inside this block from W1,
                # beyond it from W minus this block's pending errors.
                end = col + g
                cur = W1[:, :, i:min(end, i2) - i1]
                if end > i2:
                    beyond = W[:, :, i2:end] - Err1[:, :, :i] @ Hinv[:, i1:i1 + i, i2:end]  # (B, M, end - i2)
                    cur = torch.cat([cur, beyond], dim=2)
                sg, zg = compute_qparams(cur[:, :, None, :], spec, convention)  # (B, M, 1) each
                scale[:, :, gi] = sg[..., 0]
                if zero is not None:
                    zero[:, :, gi] = zg[..., 0]
            s = scale[:, :, gi]  # (B, M)
            z = None if zero is None else zero[:, :, gi].to(torch.float32)
            wcol = W1[:, :, i]
            q = round_to_grid(wcol, s, z, spec.bits, convention.signed)  # (B, M)
            deq = (q - z) * s if z is not None else q * s
            qint[:, :, col] = q
            err = (wcol - deq) / Hinv1[:, i, i][:, None]  # (B, M)
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]  # (B, M, 1) x (B, 1, bw - i)
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]  # (B, M, bw) @ (B, bw, N - i2)
    del W, Hinv

    if perm is not None:
        qint = qint[:, :, torch.argsort(perm)]
    qint = qint.to(levels_dtype)
    return [QTensor(q=qint[b], scale=scale[b], zero=None if zero is None else zero[b], spec=spec,
                    convention=convention) for b in range(bsz)]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ``tr(D H Dᵀ) / tr(W H Wᵀ)`` with ``D = W - Ŵ``: the mean squared error of
    ``X Ŵᵀ`` against ``X Wᵀ`` over the tokens ``H`` was accumulated from, relative to the output's
    mean square (0 when ``W H Wᵀ`` has zero trace and ``D`` does too).

    Args:
        w, w_hat: ``(M, N)``; H: ``(N, N)``.
    """
    H = H.to(torch.float64)
    W = w.to(device=H.device, dtype=torch.float64, copy=True)  # D is formed in it
    # in place, the same numbers as ((W @ H) * W).sum() and ((D @ H) * D).sum(): at most H, W and one
    # product in float64 (a real o_proj: 2 GiB + 2 x 0.9 GiB)
    P = W @ H
    den = float(P.mul_(W).sum())
    del P
    D = W.sub_(w_hat.to(device=H.device, dtype=torch.float64))
    P = D @ H
    num = float(P.mul_(D).sum())
    del P, D, W
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return num / den
