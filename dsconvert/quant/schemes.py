"""Quantization schemes, one class each, registered by compressed-tensors preset name.

A scheme describes itself completely as a :class:`SchemeDescription` (what a format needs to decide whether it
can store it, and what validate needs to emulate the serving engine):

* ``weights``: :class:`WeightArgs` - ``type`` int or float, ``bits``, ``strategy`` (group / channel / block /
  tensor), ``group_size`` or ``block`` shape, ``symmetric``, ``scale_dtype`` (None = the model dtype);
* ``input_activations``: :class:`ActivationArgs` or None - dynamic per token / per token group, or static.

A scheme also owns its math (formats never quantize): :attr:`SchemeDescription.spec` gives the kernel-level
spec (:class:`~dsconvert.quant.rtn.QuantSpec` for integer weights, :class:`~dsconvert.quant.fp8_quant.FP8BlockSpec`
for FP8 blocks), :meth:`Scheme.quantize_with_error` produces the payload a format packs (a ``QTensor`` or an
``FP8BlockTensor``) in the storage the format declares (``IntFormat.storage``: an RTN ``Convention``, or the scale
dtype for FP8), and :meth:`Scheme.dequantize` is its exact inverse. :attr:`Scheme.methods` lists the algorithms
that can produce it (RTN always; AWQ/GPTQ for integer weights).

The contract with formats (docs/int-formats.md §8): a format decides from the
:class:`SchemeDescription` alone whether it can store a scheme (``IntFormat.check_scheme``) and how
(``IntFormat.bind``); the pipeline never looks at a format's or a scheme's name.

Sources for the presets: compressed-tensors 0.20.1 ``quantization/quant_scheme.py`` (W4A16, W4A16_ASYM, W8A16,
W8A8 = ``INT8_W8A8``, FP8_BLOCK).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from dsconvert.errors import UsageError
from dsconvert.quant.fp8_quant import FP8BlockSpec, FP8BlockTensor, dequantize_fp8_block, quantize_fp8_block
from dsconvert.quant.scheme_registry import (SCHEMES, ActivationArgs, SchemeDescription, WeightArgs,
                                             get_scheme, match_scheme_name, register_scheme,
                                             registered_schemes)
from dsconvert.quant.rtn import (COMPRESSED_TENSORS, Convention, QTensor, QuantSpec, dequantize, quantize,
                                quantize_with_error)

__all__ = [
    "WeightArgs",
    "ActivationArgs",
    "SchemeDescription",
    "Scheme",
    "SCHEMES",
    "register_scheme",
    "get_scheme",
    "registered_schemes",
    "W4A16",
    "W4A16Asym",
    "W8A16",
    "W8A8",
    "FP8Block",
    "SCALE_FORMATS",
    "match_scheme_name",
]

#: ``--scale-fmt`` values: None = the scale as computed (amax / qmax); ``ue8m0`` = rounded up to a power of two
#: (DeepSeek-V3.1's ``scale_fmt``), the payload then quantized under the rounded scale.
SCALE_FORMATS = ("ue8m0",)


class Scheme:
    """Base class of integer weight-only schemes; subclasses set ``bits``, ``group_size``, ``symmetric``.

    Attributes:
        methods: algorithms that can produce this scheme (``rtn``, ``awq``, ``gptq``, ``autoround``).
        default_format: the ``--format`` used when none is given.
    """

    name: ClassVar[str] = ""
    bits: ClassVar[int]
    group_size: ClassVar[int] = 128
    symmetric: ClassVar[bool] = True
    allow_per_channel: ClassVar[bool] = False
    allow_group: ClassVar[bool] = True
    input_activations: ClassVar[ActivationArgs | None] = None
    default_format: ClassVar[str] = "compressed-tensors"
    methods: ClassVar[tuple[str, ...]] = ("rtn", "awq", "gptq", "autoround")
    summary: ClassVar[str] = ""

    def spec(self, group_size: int | None = None, *, scale_fmt: str | None = None) -> QuantSpec | FP8BlockSpec:
        """The kernel-level spec with these options (``describe(...).spec``).

        Raises:
            UsageError: an option this scheme does not take (see :meth:`describe`).
        """
        return self.describe(group_size, scale_fmt=scale_fmt).spec

    def describe(self, group_size: int | None = None, *, scale_fmt: str | None = None) -> SchemeDescription:
        """The whole scheme as data (see the module docstring), with ``--group-size`` / ``--scale-fmt`` applied.

        Raises:
            UsageError: ``group_size=-1`` on a scheme without per-channel, a positive group size on a
                per-channel-only scheme, or ``scale_fmt`` on an integer scheme.
        """
        if scale_fmt is not None:
            raise UsageError(f"scheme {self.name} has no scale_fmt option", remedy="drop-scale-fmt")
        g = self.group_size if group_size is None else group_size
        if g == -1 and not self.allow_per_channel:
            raise UsageError(f"scheme {self.name} does not support per-channel (group_size -1)",
                             remedy="group-or-w8a16")
        if g != -1 and not self.allow_group:
            raise UsageError(f"scheme {self.name} is per output channel; group_size {g} does not apply",
                             remedy="drop-group-size-or-grouped")
        sp = QuantSpec(bits=self.bits, group_size=g, symmetric=self.symmetric)
        w = WeightArgs(type="int", bits=sp.bits, strategy="channel" if sp.per_channel else "group",
                       symmetric=sp.symmetric, group_size=None if sp.per_channel else sp.group_size)
        return SchemeDescription(self.name, w, self.input_activations)

    def quantize(self, w: torch.Tensor, convention: Convention = COMPRESSED_TENSORS,
                 group_size: int | None = None, *, spec: QuantSpec | None = None,
                 name: str | None = None) -> QTensor:
        """RTN-quantize ``w`` ``[M, N]`` in the storage ``convention`` a format declares
        (see :func:`dsconvert.quant.rtn.quantize`)."""
        return quantize(w, spec if spec is not None else self.spec(group_size), convention, name=name)

    def quantize_with_error(self, w: torch.Tensor, spec, storage, *, name: str | None = None):
        """RTN-quantize ``w`` ``[M, N]`` (M = out_features, N = in_features) with ``spec`` in the format's
        ``storage`` (a :class:`~dsconvert.quant.rtn.Convention` here); returns ``(payload, rel_rms_error)``
        (:func:`dsconvert.quant.rtn.quantize_with_error`)."""
        return quantize_with_error(w, spec, storage, name=name)

    def dequantize(self, qt: QTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact inverse of :meth:`quantize`; see :func:`dsconvert.quant.rtn.dequantize`."""
        return dequantize(qt, out_dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric})")


@register_scheme("W4A16", aliases=["int4"])
class W4A16(Scheme):
    """int4 weights, symmetric, group 128; activations unquantized (bf16)."""

    summary = "int4 weights, group 128, activations bf16"
    bits = 4
    group_size = 128
    symmetric = True
    allow_per_channel = True


@register_scheme("W4A16_ASYM", aliases=["int4-asym", "int4-zp"])
class W4A16Asym(Scheme):
    """int4 weights, asymmetric (zero point), group 128."""

    summary = "int4 weights with zero points, group 128"
    bits = 4
    group_size = 128
    symmetric = False
    allow_per_channel = True


@register_scheme("W8A16", aliases=["int8-weight-only"])
class W8A16(Scheme):
    """int8 weights, symmetric, group 128; ``group_size=-1`` gives per-channel (vLLM moe_wna16 needs it)."""

    summary = "int8 weights, group 128 or per channel"
    bits = 8
    group_size = 128
    symmetric = True
    allow_per_channel = True



@register_scheme("W8A8", aliases=["INT8"])
class W8A8(Scheme):
    """int8 weights per output channel (symmetric) with dynamic per-token int8 input activations.

    compressed-tensors' ``INT8_W8A8`` preset (``W8A8``/``INT8``): weights ``channel``, activations ``token``,
    ``dynamic: true``. The weight math is the same RTN as W8A16 per channel (scale = absmax / 127.5, in the
    model dtype); the activations are quantized by the serving engine at run time.
    """

    summary = "int8 weights per channel, dynamic per-token int8 activations"
    bits = 8
    group_size = -1
    symmetric = True
    allow_per_channel = True
    allow_group = False
    methods = ("rtn", "gptq")
    input_activations = ActivationArgs(type="int", bits=8, strategy="token", dynamic=True, symmetric=True)


@register_scheme("FP8_BLOCK")
class FP8Block(Scheme):
    """float8_e4m3fn weights with one scale per 128 x 128 block, dynamic per-token-group (128) FP8 activations.

    DeepSeek-V3's own weight layout and compressed-tensors' ``FP8_BLOCK`` preset. Math:
    :func:`dsconvert.quant.fp8_quant.quantize_fp8_block` (scale = amax / 448 per zero-padded block; with
    ``scale_fmt="ue8m0"`` the scale is rounded up to a power of two *before* the payload is quantized).
    No calibrated method: the block rule has nothing to calibrate.
    """

    summary = "float8_e4m3fn weights, 128x128 block scales, dynamic per-token-group fp8 activations"
    bits = 8
    block = (128, 128)
    methods = ("rtn",)
    input_activations = ActivationArgs(type="float", bits=8, strategy="group", dynamic=True, symmetric=True,
                                       group_size=128)

    def describe(self, group_size: int | None = None, *, scale_fmt: str | None = None) -> SchemeDescription:
        """See :meth:`Scheme.describe`.

        Raises:
            UsageError: a ``group_size`` (blocks are fixed at 128 x 128), or a ``scale_fmt`` other than ue8m0.
        """
        if group_size is not None:
            raise UsageError(f"scheme {self.name} uses 128x128 blocks; group_size {group_size} does not apply",
                             remedy="drop-group-size")
        if scale_fmt is not None and scale_fmt not in SCALE_FORMATS:
            raise UsageError(f"scale_fmt {scale_fmt!r} is not a scale format", remedy="scale-fmt-values")
        w = WeightArgs(type="float", bits=8, strategy="block", symmetric=True, block=self.block,
                       scale_rule="pow2" if scale_fmt == "ue8m0" else "amax")
        return SchemeDescription(self.name, w, self.input_activations)

    def quantize(self, w: torch.Tensor, storage: torch.dtype = torch.float32, group_size: int | None = None, *,
                 spec: FP8BlockSpec | None = None, name: str | None = None) -> FP8BlockTensor:
        """Block-FP8 quantize ``w`` ``[M, N]`` with scales stored as ``storage``
        (:func:`dsconvert.quant.fp8_quant.quantize_fp8_block`)."""
        return quantize_fp8_block(w, spec if spec is not None else self.spec(group_size), scale_dtype=storage,
                                  name=name)

    def quantize_with_error(self, w: torch.Tensor, spec: FP8BlockSpec, storage: torch.dtype, *,
                            name: str | None = None) -> tuple[FP8BlockTensor, float]:
        """Block-FP8 quantize ``w`` ``[M, N]`` with scales stored as ``storage`` (float32 for DeepSeek's
        ``weight_scale_inv``, the model dtype for compressed-tensors); returns ``(payload, rel_rms_error)`` where
        the error compares ``w`` with the loader's dequant in float32."""
        t = quantize_fp8_block(w, spec, scale_dtype=storage, name=name)
        d = dequantize_fp8_block(t, torch.float32).to(torch.float64)
        w64 = w.to(torch.float64)
        n = float(torch.linalg.vector_norm(w64))
        return t, (float(torch.linalg.vector_norm(w64 - d)) / n if n > 0 else 0.0)

    def dequantize(self, qt: FP8BlockTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``round(float32(q) * scale, out_dtype)`` (:func:`dsconvert.quant.fp8_quant.dequantize_fp8_block`)."""
        return dequantize_fp8_block(qt, out_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block={self.block})"

# FP4 schemes register themselves into the same registry (their own module: docs/design.md §2); importing
# them here fills SCHEMES for every importer of this module (they import the registry, not this module).
from dsconvert.quant import fp4_schemes as _fp4_schemes  # noqa: E402,F401
