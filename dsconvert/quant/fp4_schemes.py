"""FP4 schemes (compressed-tensors presets NVFP4, NVFP4A16, MXFP4, MXFP4A16), one class each.

The math is :mod:`dsconvert.quant.fp4`; the rules are in docs/int-formats.md §12. These schemes are float
weights with their own scales, so they have no integer :class:`~dsconvert.quant.rtn.QuantSpec`: ``spec()``
refuses, and the quantize job packs them through the compressed-tensors FP4 module layout instead.
Source: compressed-tensors 0.20.1 ``quantization/quant_scheme.py``.
"""

from __future__ import annotations

from typing import ClassVar

from dsconvert.errors import UsageError
from dsconvert.quant.scheme_registry import ActivationArgs, SchemeDescription, WeightArgs, register_scheme

__all__ = ["FP4Scheme", "NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16"]


class FP4Scheme:
    """Base of the FP4 schemes. ``kind`` is ``nvfp4`` or ``mxfp4``; ``activations`` = W4A4."""

    name: ClassVar[str] = ""
    kind: ClassVar[str]
    activations: ClassVar[bool]
    group_size: ClassVar[int]
    bits: ClassVar[int] = 4
    default_format: ClassVar[str] = "compressed-tensors"
    methods: ClassVar[tuple[str, ...]] = ("rtn",)
    summary: ClassVar[str] = ""

    def spec(self, group_size: int | None = None, *, scale_fmt: str | None = None):
        """FP4 has no integer spec.

        Raises:
            UsageError: always (a caller asked an FP4 scheme for an integer layout; e.g. --format awq).
        """
        raise UsageError(f"scheme {self.name} stores e2m1 floats, which only the compressed-tensors format holds",
                         remedy="float-format")

    def describe(self, group_size: int | None = None, *, scale_fmt: str | None = None) -> SchemeDescription:
        """The scheme as data.

        Raises:
            UsageError: a ``group_size`` other than the scheme's own, or any ``scale_fmt`` (FP4 scales are fixed).
        """
        if group_size is not None and group_size != self.group_size:
            raise UsageError(f"scheme {self.name} groups {self.group_size} inputs per scale; group_size "
                             f"{group_size} does not apply", remedy="drop-group-size")
        if scale_fmt is not None:
            raise UsageError(f"scheme {self.name} has no scale_fmt option", remedy="drop-scale-fmt")
        w = WeightArgs(type="float", bits=4, strategy="tensor_group" if self.kind == "nvfp4" else "group",
                       group_size=self.group_size,
                       scale_dtype="float8_e4m3fn" if self.kind == "nvfp4" else "uint8",
                       scale_rule="amax" if self.kind == "nvfp4" else "pow2")
        a = None
        if self.activations:
            a = ActivationArgs(type="float", bits=4, strategy="tensor_group" if self.kind == "nvfp4" else "group",
                               dynamic=True, group_size=self.group_size)
        return SchemeDescription(self.name, w, a)


@register_scheme("NVFP4", aliases=["nvfp4-w4a4"])
class NVFP4(FP4Scheme):
    """e2m1 weights, e4m3 scale per 16, float32 global scale; activations NVFP4 (dynamic local, static global)."""

    summary = "e2m1 weights and activations, e4m3 scale per 16 + global scale (Blackwell)"
    kind = "nvfp4"
    activations = True
    group_size = 16


@register_scheme("NVFP4A16", aliases=["nvfp4-weight-only"])
class NVFP4A16(FP4Scheme):
    """NVFP4 weights; activations bf16."""

    summary = "e2m1 weights, e4m3 scale per 16 + global scale, activations bf16"
    kind = "nvfp4"
    activations = False
    group_size = 16


@register_scheme("MXFP4", aliases=["mxfp4-w4a4"])
class MXFP4(FP4Scheme):
    """e2m1 weights, e8m0 scale per 32; activations MXFP4 (dynamic)."""

    summary = "e2m1 weights and activations, e8m0 scale per 32 (OCP MX; AMD MI350/MI355)"
    kind = "mxfp4"
    activations = True
    group_size = 32


@register_scheme("MXFP4A16", aliases=["mxfp4-weight-only"])
class MXFP4A16(FP4Scheme):
    """MXFP4 weights; activations bf16."""

    summary = "e2m1 weights, e8m0 scale per 32, activations bf16"
    kind = "mxfp4"
    activations = False
    group_size = 32
