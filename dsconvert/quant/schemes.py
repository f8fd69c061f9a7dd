"""Weight-only integer quantization schemes (compressed-tensors preset names), one decorator each.

A scheme declares ``bits``, ``group_size`` (default; -1 = per-channel allowed where noted),
``symmetric`` and the on-disk format it defaults to. :meth:`Scheme.spec` turns it into a
:class:`~dsconvert.quant.rtn.QuantSpec`; :meth:`Scheme.quantize` / :meth:`Scheme.dequantize` are
RTN and its exact inverse (used by tests and ``validate``).

Source for the presets: compressed-tensors ``quantization/quant_scheme.py`` (W4A16, W4A16_ASYM, W8A16).
"""

from __future__ import annotations

from typing import ClassVar, Iterable

import torch

from dsconvert.errors import UsageError
from dsconvert.quant.registry import Registry
from dsconvert.quant.rtn import COMPRESSED_TENSORS, Convention, QTensor, QuantSpec, dequantize, quantize

__all__ = [
    "Scheme",
    "SCHEMES",
    "register_scheme",
    "get_scheme",
    "registered_schemes",
    "W4A16",
    "W4A16Asym",
    "W8A16",
]

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
    """Base class. Subclasses set ``bits``, ``group_size``, ``symmetric``, ``default_format``."""

    name: ClassVar[str] = ""
    bits: ClassVar[int]
    group_size: ClassVar[int] = 128
    symmetric: ClassVar[bool] = True
    allow_per_channel: ClassVar[bool] = False
    default_format: ClassVar[str] = "compressed-tensors"

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

    def quantize(self, w: torch.Tensor, convention: Convention = COMPRESSED_TENSORS,
                 group_size: int | None = None) -> QTensor:
        """RTN-quantize ``w`` ``[N, K]``; see :func:`dsconvert.quant.rtn.quantize`."""
        return quantize(w, self.spec(group_size), convention)

    def dequantize(self, qt: QTensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact inverse of :meth:`quantize`; see :func:`dsconvert.quant.rtn.dequantize`."""
        return dequantize(qt, out_dtype)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric})")


@register_scheme("W4A16", aliases=["int4"])
class W4A16(Scheme):
    """int4 weights, symmetric, group 128; activations unquantized (bf16)."""

    bits = 4
    group_size = 128
    symmetric = True
    allow_per_channel = True


@register_scheme("W4A16_ASYM", aliases=["int4-asym", "int4-zp"])
class W4A16Asym(Scheme):
    """int4 weights, asymmetric (zero point), group 128."""

    bits = 4
    group_size = 128
    symmetric = False
    allow_per_channel = True


@register_scheme("W8A16", aliases=["int8-weight-only"])
class W8A16(Scheme):
    """int8 weights, symmetric, group 128; ``group_size=-1`` gives per-channel (vLLM moe_wna16 needs it)."""

    bits = 8
    group_size = 128
    symmetric = True
    allow_per_channel = True
