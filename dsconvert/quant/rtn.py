"""Group-wise round-to-nearest (RTN) integer quantization: ``q = clamp(round(w / s) + z, qmin, qmax)``.

Weights are ``[M, N]`` (M = out_features, N = in_features). A group is ``group_size`` consecutive
input channels of one output row, so ``scale`` and ``zero`` are ``[M, N // g]`` (``group_size = -1``
means one group spanning N, i.e. per-channel: ``[M, 1]``).

The maths is shared by every on-disk family; a :class:`Convention` only fixes what differs:

===================  ======  ===========  ==============================================================
convention           q       scale dtype  zero point
===================  ======  ===========  ==============================================================
compressed-tensors   signed  bfloat16     none if symmetric; signed, same range as q, if asymmetric
autoawq              uint    float16      unsigned in [0, 2^b - 1]; (max - min) floored at 1e-5 first
gptq                 uint    float16      unsigned; symmetric groups get the constant 2^(b-1)
===================  ======  ===========  ==============================================================

Scale rules (Sources: compressed-tensors ``quantization/utils/helpers.py::calculate_qparams``,
AutoGPTQ ``quantization/quantizer.py::Quantizer.find_params``, AutoAWQ
``quantize/quantizer.py::pseudo_quantize_tensor``):

* symmetric: ``scale = absmax / ((2^b - 1) / 2)`` (absmax / 7.5 for int4, / 127.5 for int8);
  ``q_signed in [-2^(b-1), 2^(b-1) - 1]``; the unsigned families store ``q_signed + 2^(b-1)`` with
  ``zero = 2^(b-1)`` (AutoGPTQ's ``zero = (maxq + 1) / 2``).
* asymmetric: min/max are first extended to include 0, ``scale = (max - min) / (2^b - 1)``,
  ``zero_u = clamp(round(-min / scale), 0, 2^b - 1)``; compressed-tensors stores
  ``zero_u - 2^(b-1)`` (its ``bit_min - min / scale``).

**Scales are rounded to their storage dtype before q is computed**, so that ``(q - z) * scale``
with the scale read back from disk equals :func:`dequantize` here bit for bit. Everything else is
computed in float32, whatever the input dtype.

Deviations from the reference libraries (all harmless, all documented):

* AutoGPTQ's symmetric ``find_params`` sets ``xmin = -xmax`` only when ``xmin < 0``, so an
  all-non-negative group gets ``scale = xmax / 15`` and clips above ``7 * scale``; here every
  symmetric group uses ``absmax / 7.5`` (the same whenever the group has a negative value).
* AutoAWQ does not extend min/max to include 0; the two agree on every group holding values of
  both signs (every real weight group). With the extension, all-positive groups are not clipped.
* compressed-tensors/llm-compressor compute ``w / scale`` in the weight dtype (bf16) and the zero
  point from the unrounded scale; here both use float32 and the rounded scale. The written tensors
  are self-consistent and the library's own decompressor reproduces :func:`dequantize` exactly.
* A zero scale (all-zero group, or an underflow in the storage dtype) is replaced by the storage
  dtype's ``eps`` as compressed-tensors does; the group then quantizes to its zero point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dsconvert.errors import BadInputError, ShapeError, UsageError

__all__ = [
    "QuantSpec",
    "Convention",
    "COMPRESSED_TENSORS",
    "AUTOAWQ",
    "GPTQ",
    "QTensor",
    "qrange",
    "compute_qparams",
    "round_to_grid",
    "quantize",
    "quantize_with_error",
    "quantize_with_params",
    "dequantize",
]

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: ``bits`` (4 or 8), ``group_size`` (> 0, or -1 = per-channel), ``symmetric``.

    Raises:
        UsageError: bits not in (4, 8) or group_size neither -1 nor positive.
    """

    bits: int
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(f"unsupported bit width {self.bits}", remedy="bits")
        if not (self.group_size == -1 or self.group_size > 0):
            raise UsageError(f"invalid group size {self.group_size}", remedy="positive-group")

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    def effective_group_size(self, k: int, name: str | None = None) -> int:
        """Group length along N: ``group_size``, or N for per-channel.

        Raises:
            ShapeError: ``group_size`` does not divide ``k``.
        """
        if self.group_size == -1:
            return k
        if k % self.group_size:
            what = f"tensor {name!r}" if name else "tensor"
            smaller = [g for g in (256, 128, 64, 32, 16) if g < self.group_size and k % g == 0]
            raise ShapeError(
                f"group size {self.group_size} does not divide in_features N={k} of {what} "
                f"(N % {self.group_size} = {k % self.group_size})",
                **({"remedy": "smaller-group", "group_size": smaller[0]} if smaller else {"remedy": "per-channel"}),
            )
        return self.group_size

    def num_groups(self, k: int, name: str | None = None) -> int:
        """``N // g`` (1 for per-channel). Raises ShapeError like :meth:`effective_group_size`."""
        return k // self.effective_group_size(k, name)


@dataclass(frozen=True)
class Convention:
    """How one on-disk family stores q, zero and scale (see the module table).

    Attributes:
        name: ``"compressed-tensors"``, ``"autoawq"`` or ``"gptq"``.
        signed: q (and zero) stored signed, centred on 0; else unsigned in ``[0, 2^b - 1]``.
        scale_dtype: storage dtype the scale is rounded to (RNE) before q is computed.
        range_floor: floor on ``max - min`` of an asymmetric group before dividing (AutoAWQ 1e-5).
    """

    name: str
    signed: bool
    scale_dtype: torch.dtype
    range_floor: float = 0.0

    def with_scale_dtype(self, dtype: torch.dtype) -> "Convention":
        """Same convention with another scale storage dtype (e.g. compressed-tensors for an fp16 model)."""
        return dataclasses.replace(self, scale_dtype=dtype)


COMPRESSED_TENSORS = Convention("compressed-tensors", signed=True, scale_dtype=torch.bfloat16)
AUTOAWQ = Convention("autoawq", signed=False, scale_dtype=torch.float16, range_floor=1e-5)
GPTQ = Convention("gptq", signed=False, scale_dtype=torch.float16)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``(-2^(b-1), 2^(b-1) - 1)`` signed, ``(0, 2^b - 1)`` unsigned."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _q_dtype(bits: int, signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


@dataclass
class QTensor:
    """A quantized ``[M, N]`` weight.

    Attributes:
        q: ``[M, N]`` int8 (signed convention) or uint8 (unsigned convention).
        scale: ``[M, N // g]`` float32 whose values are exactly representable in
            ``convention.scale_dtype``.
        zero: ``[M, N // g]`` same dtype as ``q``, or None (symmetric signed convention: zero = 0).
        spec: the :class:`QuantSpec`.
        convention: the :class:`Convention` q/zero/scale follow.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    convention: Convention

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def group_size(self) -> int:
        """Effective group length along N (N for per-channel)."""
        return self.q.shape[1] // self.scale.shape[1]

    def to_convention(self, convention: Convention) -> "QTensor":
        """Re-express q/zero in another convention's signedness (values unchanged; the scale dtype must agree).

        Raises:
            ValueError: the scale dtypes differ (a re-rounded scale would change q).
        """
        if convention.scale_dtype != self.convention.scale_dtype:
            raise ValueError(f"cannot move a {self.convention.scale_dtype} scale to {convention.scale_dtype} "
                             "without requantizing")
        if convention.signed == self.convention.signed:
            return dataclasses.replace(self, convention=convention)
        off = 1 << (self.spec.bits - 1)
        if convention.signed:  # unsigned -> signed
            q = (self.q.to(torch.int16) - off).to(torch.int8)
            zero = None if self.spec.symmetric else (self.zero.to(torch.int16) - off).to(torch.int8)
        else:  # signed -> unsigned
            q = (self.q.to(torch.int16) + off).to(torch.uint8)
            zero = (torch.full_like(self.scale, off, dtype=torch.uint8) if self.zero is None
                    else (self.zero.to(torch.int16) + off).to(torch.uint8))
        return QTensor(q, self.scale, zero, self.spec, convention)


def _round_scale(scale: torch.Tensor, dtype: torch.dtype, name: str | None = None) -> torch.Tensor:
    """Round a float32 scale to ``dtype`` (RNE), replace zeros by ``eps(dtype)``, return float32 again.

    Raises:
        BadInputError: a scale rounds to inf in ``dtype`` (``name``: the tensor, for the message)."""
    s = scale.to(dtype)
    s = torch.where(s == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=s.device), s)
    if not torch.isfinite(s).all():
        raise BadInputError(
            (f"tensor {name}: " if name else "")
            + f"a quantization scale overflows {dtype} (largest group range {float(scale.max()):.4g})",
            hint="the weight holds huge or non-finite values; check the source tensor, or use a "
                 "bfloat16-scale format (compressed-tensors)",
        )
    return s.to(torch.float32)


def raw_group_scales(w: torch.Tensor, spec: QuantSpec, convention: Convention = COMPRESSED_TENSORS) -> torch.Tensor:
    """The min-max scale of every group of ``w`` ``[M, N]`` before it is rounded to the storage dtype: the value
    :func:`compute_qparams` rounds. Symmetric ``amax / ((2^b - 1) / 2)``; asymmetric ``(hi - lo) / (2^b - 1)``
    with ``lo = min(w, 0)``, ``hi = max(w, 0)`` (and the convention's range floor). Both are at most
    ``amax / ((2^b - 1) / 2)``, the bound :func:`scale_bound` uses.

    Returns:
        float32 ``[M, N // g]`` (``g = N`` for ``group_size -1``).
    Raises:
        ShapeError: ``group_size`` does not divide N.
    """
    if w.dim() != 2:
        raise ShapeError(f"expected a 2-D [M, N] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    g = k if spec.group_size <= 0 else spec.group_size
    if k % g:
        raise ShapeError(f"group size {g} does not divide N={k}")
    x = w.reshape(n, k // g, g).to(torch.float32)  # (M, N/g, g)
    levels = (1 << spec.bits) - 1
    if spec.symmetric:
        return x.abs().amax(dim=-1) / (levels / 2)
    rng = x.amax(dim=-1).clamp(min=0.0) - x.amin(dim=-1).clamp(max=0.0)
    if convention.range_floor:
        rng = rng.clamp(min=convention.range_floor)
    return rng / levels


def scale_bound(amax: float, bits: int) -> float:
    """An upper bound on every group scale of a weight whose largest magnitude is ``amax``:
    ``amax / ((2^b - 1) / 2)`` (see :func:`raw_group_scales`)."""
    return float(amax) / (((1 << bits) - 1) / 2)


def scale_overflows(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask of the float32 ``scale`` values that round (RNE) to inf in ``dtype`` (fp16: >= 65520)."""
    return ~torch.isfinite(scale.to(dtype))


def compute_qparams(
    w_groups: torch.Tensor, spec: QuantSpec, convention: Convention = COMPRESSED_TENSORS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale and zero point per group (rules in the module docstring).

    Args:
        w_groups: ``[..., g]`` float; the last dim is one group (e.g. ``[M, N // g, g]``).
        spec: bits / symmetric (``group_size`` is not used: the grouping is already done).
        convention: storage convention (signedness, scale dtype, AWQ range floor).

    Returns:
        ``(scale, zero)``: ``scale`` ``[...]`` float32, already rounded to ``convention.scale_dtype``;
        ``zero`` ``[...]`` int8/uint8 in the convention's q dtype, or None for symmetric signed.
    """
    x = w_groups.to(torch.float32)
    bits = spec.bits
    levels = (1 << bits) - 1
    off = 1 << (bits - 1)
    qdt = _q_dtype(bits, convention.signed)
    if spec.symmetric:
        scale = _round_scale(x.abs().amax(dim=-1) / (levels / 2), convention.scale_dtype)
        zero = None if convention.signed else torch.full_like(scale, off, dtype=qdt)
        return scale, zero
    lo = x.amin(dim=-1).clamp(max=0.0)
    hi = x.amax(dim=-1).clamp(min=0.0)
    rng = hi - lo
    if convention.range_floor:
        rng = rng.clamp(min=convention.range_floor)
    scale = _round_scale(rng / levels, convention.scale_dtype)
    zero_u = torch.round(-lo / scale).clamp(0, levels)
    zero = (zero_u - off if convention.signed else zero_u).to(qdt)
    return scale, zero


def round_to_grid(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, signed: bool
) -> torch.Tensor:
    """Elementwise ``clamp(round(x / scale) + zero, qmin, qmax)`` in float32 (broadcasting; RNE round).

    The building block for GPTQ's column loop and AWQ's search. Returns float32 integer values.
    """
    qmin, qmax = qrange(bits, signed)
    y = torch.round_(x.to(torch.float32) / scale)
    if zero is not None:
        y += zero.to(torch.float32)
    return y.clamp_(qmin, qmax)


def _check_2d(w: torch.Tensor) -> tuple[int, int]:
    if w.dim() != 2:
        raise ShapeError(f"integer quantization needs a 2-D [out_features, in_features] weight, "
                         f"got shape {tuple(w.shape)}")
    return w.shape[0], w.shape[1]


def quantize(
    w: torch.Tensor, spec: QuantSpec, convention: Convention = COMPRESSED_TENSORS, *, name: str | None = None
) -> QTensor:
    """RTN-quantize ``w`` ``[M, N]`` (any float dtype) group-wise with min-max scales.

    Args:
        w: ``[M, N]`` weight.
        spec: bits, group size (-1 = per-channel), symmetric.
        convention: storage convention; fixes signedness and the scale dtype (rounded first).
        name: tensor name for error messages.

    Returns:
        :class:`QTensor` with q ``[M, N]``, scale/zero ``[M, N // g]``.

    Raises:
        ShapeError: ``w`` not 2-D, or ``group_size`` does not divide N.
        BadInputError: ``w`` holds NaN/inf, or a scale overflows the storage dtype.
    """
    return quantize_with_error(w, spec, convention, name=name, error=False)[0]


# Elements per row chunk of the fused RTN loop: two float32 buffers of this size (~2 MiB) stay in the L2 cache,
# and ~12 torch calls per chunk amortise over ~250k elements.
_RTN_CHUNK_ELEMS = 1 << 18


def quantize_with_error(
    w: torch.Tensor, spec: QuantSpec, convention: Convention = COMPRESSED_TENSORS, *, name: str | None = None,
    error: bool = True,
) -> tuple[QTensor, float | None]:
    """:func:`quantize` plus the relative RMS error ``||w - dequantize(q)|| / ||w||``, in one fused pass.

    The weight is processed in row chunks of about 256k elements: each chunk is widened to float32 in a
    cache-resident buffer (``w`` itself may be bfloat16: no full float32 copy), its groups' min/max taken
    (NaN/inf detected there), the scales and zero points computed exactly as
    :func:`compute_qparams` does, then ``clamp(round(x / scale) + zero)`` as :func:`round_to_grid` does, and, with
    ``error``, the exact float32 dequant ``(q - zero) * scale`` subtracted from ``x`` and squared-summed. The q,
    scale and zero values are therefore identical to the unfused definition (same float32 operations, same
    order); the error's norms accumulate in float64 (the difference ``x - deq`` is one float32 rounding, so the
    result agrees with a float64 evaluation to ~1e-7 relative).

    Args:
        w: ``[M, N]`` weight, any float dtype, any device.
        spec, convention, name: as :func:`quantize`.
        error: also compute the relative RMS error (else None is returned for it).

    Returns:
        ``(QTensor, rel_rms_error or None)``; the error is 0.0 for an all-zero ``w``.

    Raises:
        ShapeError, BadInputError: as :func:`quantize`.
    """
    n, k = _check_2d(w)
    g = spec.effective_group_size(k, name)
    gcount = k // g
    dev = w.device
    bits = spec.bits
    levels = (1 << bits) - 1
    off = 1 << (bits - 1)
    signed = convention.signed
    qmin, qmax = qrange(bits, signed)
    qdt = _q_dtype(bits, signed)
    q = torch.empty((n, k), dtype=qdt, device=dev)
    scale = torch.empty((n, gcount), dtype=torch.float32, device=dev)
    need_zero = not (signed and spec.symmetric)
    zero = torch.empty((n, gcount), dtype=qdt, device=dev) if need_zero else None
    err_sq = ref_sq = 0.0
    if n and k:
        rows = max(1, min(n, _RTN_CHUNK_ELEMS // k))
        xbuf = torch.empty((rows, k), dtype=torch.float32, device=dev) if w.dtype != torch.float32 else None
        ybuf = torch.empty((rows, k), dtype=torch.float32, device=dev)
        eacc = torch.zeros((), dtype=torch.float64, device=dev)
        racc = torch.zeros((), dtype=torch.float64, device=dev)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            r = r1 - r0
            x = w[r0:r1]
            if xbuf is not None:
                x = xbuf[:r].copy_(x)
            xg = x.view(r, gcount, g)  # (rows, N/g, g)
            lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)  # (rows, N/g); aminmax(dim=) is 10x slower on CPU
            if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
                raise BadInputError(f"tensor {name or ''} holds NaN or inf values".replace("  ", " "),
                                    hint="check the source checkpoint; dsconvert will not quantize non-finite weights")
            if spec.symmetric:
                s = _round_scale(torch.maximum(hi, -lo) / (levels / 2), convention.scale_dtype, name)
                z = None if signed else torch.full_like(s, off, dtype=qdt)
            else:
                lo = lo.clamp(max=0.0)
                rng = hi.clamp(min=0.0) - lo
                if convention.range_floor:
                    rng = rng.clamp(min=convention.range_floor)
                s = _round_scale(rng / levels, convention.scale_dtype, name)
                zero_u = torch.round(-lo / s).clamp(0, levels)
                z = (zero_u - off if signed else zero_u).to(qdt)
            scale[r0:r1] = s
            if zero is not None:
                zero[r0:r1] = z
            y = torch.div(xg, s[..., None], out=ybuf[:r].view(r, gcount, g)).round_()
            zf = None if z is None else z.to(torch.float32)[..., None]
            if zf is not None:
                y += zf
            y.clamp_(qmin, qmax)
            q[r0:r1].copy_(y.view(r, k))
            if error:
                if zf is not None:
                    y -= zf
                y *= s[..., None]  # exact dequant: a <= 9-bit integer times a bf16/fp16 scale
                torch.sub(xg, y, out=y)
                eacc += torch.linalg.vector_norm(y, dtype=torch.float64) ** 2
                racc += torch.linalg.vector_norm(x, dtype=torch.float64) ** 2
        err_sq, ref_sq = float(eacc), float(racc)
    qt = QTensor(q=q, scale=scale, zero=zero, spec=spec, convention=convention)
    if not error:
        return qt, None
    return qt, (err_sq ** 0.5 / ref_sq ** 0.5 if ref_sq > 0 else 0.0)


def quantize_with_params(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    spec: QuantSpec,
    convention: Convention = COMPRESSED_TENSORS,
    *,
    name: str | None = None,
) -> QTensor:
    """Quantize ``w`` ``[M, N]`` with a given ``scale`` (and ``zero``) ``[M, N // g]``.

    ``scale`` is rounded to ``convention.scale_dtype`` here too (a no-op for scales from
    :func:`compute_qparams`), so the stored scale is the one q was computed with.

    Raises:
        ShapeError: shapes disagree, or ``group_size`` does not divide N.
        ValueError: ``zero`` is missing for an unsigned or asymmetric convention.
    """
    n, k = _check_2d(w)
    g = spec.effective_group_size(k, name)
    if tuple(scale.shape) != (n, k // g):
        raise ShapeError(f"scale shape {tuple(scale.shape)} does not match weight {n}x{k} with group {g} "
                         f"(expected {(n, k // g)})")
    need_zero = not (convention.signed and spec.symmetric)
    if need_zero and zero is None:
        raise ValueError(f"{convention.name} {'symmetric' if spec.symmetric else 'asymmetric'} "
                         "quantization needs a zero point")
    if zero is not None and tuple(zero.shape) != (n, k // g):
        raise ShapeError(f"zero shape {tuple(zero.shape)} does not match scale shape {(n, k // g)}")
    if convention.signed and spec.symmetric:
        zero = None
    s = _round_scale(scale.to(torch.float32), convention.scale_dtype)
    qdt = _q_dtype(spec.bits, convention.signed)
    z = None if zero is None else zero.to(qdt)
    q = round_to_grid(
        w.to(torch.float32).view(n, k // g, g),  # (M, N/g, g)
        s[..., None],
        None if z is None else z[..., None],
        spec.bits,
        convention.signed,
    ).view(n, k).to(qdt)
    return QTensor(q=q, scale=s, zero=z, spec=spec, convention=convention)


def dequantize(qt: QTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w[i, j] = (q[i, j] - zero[i, j // g]) * scale[i, j // g]``, computed exactly in float32.

    The product of a <= 9-bit integer and a bf16/fp16 scale is exact in float32, so the float32
    result is the exact inverse. ``out_dtype=qt.convention.scale_dtype`` gives what a loader computing
    in the scale dtype gets (one RNE rounding of that exact value), e.g. compressed-tensors'
    ``dequantize`` or vLLM's fp16/bf16 kernels.

    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    """
    n, k = qt.q.shape
    gcount = qt.scale.shape[1]
    g = k // gcount
    x = qt.q.to(torch.float32).view(n, gcount, g)  # (M, N/g, g)
    if qt.zero is not None:
        x = x - qt.zero.to(torch.float32)[..., None]
    return (x * qt.scale.to(torch.float32)[..., None]).view(n, k).to(out_dtype)
