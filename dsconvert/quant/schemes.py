"""Quantization schemes, one class each, registered by compressed-tensors preset name.

A scheme describes itself completely as a :class:`SchemeDescription` (what a format needs to decide whether it
can store it, and what validate needs to emulate the serving engine):

* ``weights``: :class:`WeightArgs` - ``type`` int or float, ``bits``, ``strategy`` (group / channel / block /
  tensor), ``group_size`` or ``block`` shape, ``symmetric``, ``scale_dtype`` (None = the model dtype);
* ``input_activations``: :class:`ActivationArgs` or None - dynamic per token / per token group, or static.

A scheme also owns its math (formats never quantize): :meth:`Scheme.spec` gives the kernel-level spec
(:class:`~dsconvert.quant.rtn.QuantSpec` for integers), :meth:`Scheme.quantize` produces the payload a format
packs (a ``QTensor``) with the storage convention the format declares, and :meth:`Scheme.dequantize` is its
exact inverse. :attr:`Scheme.methods` lists the algorithms that can produce it (RTN always; AWQ/GPTQ for
integer weights).

Sources for the presets: compressed-tensors 0.20.1 ``quantization/quant_scheme.py`` (W4A16, W4A16_ASYM, W8A16,
FP8_BLOCK).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Iterable

import torch

from dsconvert.errors import UsageError
from dsconvert.quant.registry import Registry
from dsconvert.quant.rtn import COMPRESSED_TENSORS, Convention, QTensor, QuantSpec, dequantize, quantize

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
]


@dataclass(frozen=True)
class WeightArgs:
    """How weights are quantized.

    Attributes:
        type: ``"int"`` or ``"float"``.
        bits: 4 or 8.
        strategy: ``"group"`` (``group_size`` input channels per scale), ``"channel"`` (one scale per output
            row), ``"block"`` (one scale per ``block`` tile), ``"tensor"``.
        symmetric: no zero point.
        group_size: for ``"group"``; None otherwise.
        block: ``(rows, cols)`` for ``"block"``; None otherwise.
        scale_dtype: None = the model dtype (format's choice), else a torch dtype name (``"float32"``).
        scale_rule: ``"amax"`` (amax / qmax) or ``"pow2"`` (rounded up to a power of two, ue8m0).
    """

    type: str
    bits: int
    strategy: str
    symmetric: bool = True
    group_size: int | None = None
    block: tuple[int, int] | None = None
    scale_dtype: str | None = None
    scale_rule: str = "amax"


@dataclass(frozen=True)
class ActivationArgs:
    """How a module's input activations are quantized at run time by the serving engine.

    Attributes:
        type: ``"int"`` or ``"float"``.
        bits: 8 (or 4).
        strategy: ``"token"`` (one scale per token), ``"group"`` (per ``group_size`` channels of a token),
            ``"tensor"``.
        dynamic: scales computed at run time (True) or calibrated and stored (False).
        symmetric: no zero point.
        group_size: for ``"group"``.
    """

    type: str
    bits: int
    strategy: str
    dynamic: bool = True
    symmetric: bool = True
    group_size: int | None = None


@dataclass(frozen=True)
class SchemeDescription:
    """A whole scheme: name, weights, optional input activations."""

    name: str
    weights: WeightArgs
    input_activations: ActivationArgs | None = None

    @property
    def weight_only(self) -> bool:
        return self.input_activations is None

    def to_dict(self) -> dict:
        """JSON-ready dict (reports, ``--list-schemes``)."""
        d = asdict(self)
        if d["weights"]["block"] is not None:
            d["weights"]["block"] = list(d["weights"]["block"])
        return d


SCHEMES: Registry[type["Scheme"]] = Registry("scheme")


def register_scheme(name: str, aliases: Iterable[str] = ()):
    """Class decorator: ``@register_scheme("W4A16", aliases=["int4"])``; sets ``cls.name = name``."""
    return SCHEMES.register_class(name, aliases)


def get_scheme(name: str) -> "Scheme":
    """An instance of the scheme registered as ``name`` or an alias (normalised lookup).

    Raises:
        KeyError: unknown name; lists every name and alias.
    """
    return SCHEMES.get(name)()


def registered_schemes() -> list[str]:
    """Canonical scheme names, in registration order."""
    return SCHEMES.names()


class Scheme:
    """Base class of integer weight-only schemes; subclasses set ``bits``, ``group_size``, ``symmetric``.

    Attributes:
        methods: algorithms that can produce this scheme (``rtn``, ``awq``, ``gptq``).
        default_format: the ``--format`` used when none is given.
    """

    name: ClassVar[str] = ""
    bits: ClassVar[int]
    group_size: ClassVar[int] = 128
    symmetric: ClassVar[bool] = True
    allow_per_channel: ClassVar[bool] = False
    default_format: ClassVar[str] = "compressed-tensors"
    methods: ClassVar[tuple[str, ...]] = ("rtn", "awq", "gptq")
    summary: ClassVar[str] = ""

    def spec(self, group_size: int | None = None) -> QuantSpec:
        """The :class:`QuantSpec`, optionally with another group size.

        Raises:
            UsageError: ``group_size=-1`` on a scheme that does not allow per-channel.
        """
        g = self.group_size if group_size is None else group_size
        if g == -1 and not self.allow_per_channel:
            raise UsageError(f"scheme {self.name} does not support per-channel (--group-size -1)",
                             hint="use a positive group size, e.g. 128, or scheme W8A16")
        return QuantSpec(bits=self.bits, group_size=g, symmetric=self.symmetric)

    def describe(self, group_size: int | None = None) -> SchemeDescription:
        """The whole scheme as data (see the module docstring)."""
        sp = self.spec(group_size)
        w = WeightArgs(type="int", bits=sp.bits, strategy="channel" if sp.per_channel else "group",
                       symmetric=sp.symmetric, group_size=None if sp.per_channel else sp.group_size)
        return SchemeDescription(self.name, w, None)

    def quantize(self, w: torch.Tensor, convention: Convention = COMPRESSED_TENSORS,
                 group_size: int | None = None, *, spec: QuantSpec | None = None,
                 name: str | None = None) -> QTensor:
        """RTN-quantize ``w`` ``[M, N]`` in the storage ``convention`` a format declares
        (see :func:`dsconvert.quant.rtn.quantize`)."""
        return quantize(w, spec if spec is not None else self.spec(group_size), convention, name=name)

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


# FP4 schemes register themselves into the same registry (their own module: docs/design.md §2).
from dsconvert.quant import fp4_schemes as _fp4_schemes  # noqa: E402,F401
