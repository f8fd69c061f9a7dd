"""The scheme registry and the descriptions schemes give of themselves (:class:`WeightArgs`,
:class:`ActivationArgs`, :class:`SchemeDescription`), apart from any scheme: :mod:`dsconvert.quant.schemes`
(INT and FP8 schemes) and :mod:`dsconvert.quant.fp4_schemes` both register into :data:`SCHEMES` from here, so
neither imports the other for it. Import :mod:`dsconvert.quant.schemes` to get the registry filled (it imports
the FP4 module); this module imports no scheme.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

from dsconvert.errors import UsageError
from dsconvert.quant.fp8_quant import FP8BlockSpec
from dsconvert.quant.registry import Registry
from dsconvert.quant.rtn import QuantSpec

__all__ = ["WeightArgs", "ActivationArgs", "SchemeDescription", "SCHEMES", "register_scheme", "get_scheme",
           "match_scheme_name", "registered_schemes"]


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

    @property
    def spec(self) -> QuantSpec | FP8BlockSpec:
        """The kernel-level spec these weight args define.

        ``int`` weights with strategy group/channel -> :class:`QuantSpec` (channel = group size -1); ``float``
        8-bit weights with strategy block -> :class:`FP8BlockSpec` (``scale_rule == "pow2"`` -> power-of-two
        scales).

        Raises:
            UsageError: weight args no kernel here implements.
        """
        w = self.weights
        if w.type == "int" and w.strategy in ("group", "channel"):
            return QuantSpec(bits=w.bits, group_size=-1 if w.strategy == "channel" else int(w.group_size),
                             symmetric=w.symmetric)
        if w.type == "float" and w.bits == 8 and w.strategy == "block" and w.block is not None:
            return FP8BlockSpec(tuple(w.block), pow2=w.scale_rule == "pow2")
        raise UsageError(f"scheme {self.name}: no kernel for {w.type} {w.bits}-bit {w.strategy} weights")

    def to_dict(self) -> dict:
        """JSON-ready dict (reports, ``--list-schemes``)."""
        d = asdict(self)
        if d["weights"]["block"] is not None:
            d["weights"]["block"] = list(d["weights"]["block"])
        return d


#: canonical name -> :class:`~dsconvert.quant.schemes.Scheme` subclass.
SCHEMES: Registry[type] = Registry("scheme")


def register_scheme(name: str, aliases: Iterable[str] = ()):
    """Class decorator: ``@register_scheme("W4A16", aliases=["int4"])``; sets ``cls.name = name``."""
    return SCHEMES.register_class(name, aliases)


def get_scheme(name: str) -> Any:
    """An instance of the scheme (a :class:`~dsconvert.quant.schemes.Scheme`) registered as ``name`` or an alias
    (normalised lookup).

    Raises:
        KeyError: unknown name; lists every name and alias.
    """
    return SCHEMES.get(name)()


def match_scheme_name(weights: WeightArgs, input_activations: ActivationArgs | None) -> str | None:
    """The registered scheme whose description (at its default options, or its group size / per-channel /
    power-of-two variant) has these weight and activation args; None if none does (readers, ``inspect``)."""
    for name, cls in SCHEMES.items():
        sch = cls()
        variants = [{}, {"group_size": weights.group_size}, {"group_size": -1}, {"scale_fmt": "ue8m0"}]
        for kw in variants:
            try:
                d = sch.describe(**kw)
            except (UsageError, TypeError, ValueError):
                continue
            if d.weights == weights and d.input_activations == input_activations:
                return name
    return None


def registered_schemes() -> list[str]:
    """Canonical scheme names, in registration order."""
    return SCHEMES.names()
