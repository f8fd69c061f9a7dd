"""Common interface of the quantized safetensors formats (compressed-tensors, AutoAWQ GEMM, GPTQ, DeepSeek FP8).

A format owns names, dtypes, shapes, bit layout and ``quantization_config``; it never chooses
scales beyond calling RTN in :meth:`IntFormat.encode` (the scheme quantizes: RTN, GPTQ, AWQ search, the FP8
block rule, and hands a ready payload, a :class:`~dsconvert.quant.rtn.QTensor` or an
:class:`~dsconvert.quant.fp8_quant.FP8BlockTensor`, to :meth:`IntFormat.encode_qtensor`).

The scheme/format contract (docs/int-formats.md §8):

* :meth:`IntFormat.check_scheme` decides from a scheme's whole
  :class:`~dsconvert.quant.schemes.SchemeDescription` (weights and input activations) whether the format can
  store it, and refuses with a :class:`~dsconvert.errors.UsageError` (exit 2) naming the module otherwise;
* :meth:`IntFormat.bind` returns the codec that stores that scheme (the format itself, or, for
  compressed-tensors, the compressor for ``pack-quantized`` / ``int-quantized`` / ``float-quantized``...);
  :meth:`IntFormat.storage` is what the scheme's kernel must quantize in (an RTN convention, or a scale dtype);
* :meth:`IntFormat.model_quantization_config` writes the model's ``quantization_config``;
  :meth:`IntFormat.from_config` / :meth:`IntFormat.scheme_from_config` read an existing one back.

The pipeline only calls these; it never branches on a format's name.

Weights are ``[M, N]``: M = out_features, N = in_features. ``prefix`` is the module name
(``model.layers.3.mlp.experts.7.down_proj``); tensor names are ``f"{prefix}.{suffix}"`` (just
``suffix`` when ``prefix`` is empty).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Mapping, NamedTuple

import torch

from dsconvert.errors import ShapeError, UsageError
from dsconvert.quant.rtn import Convention, QTensor, QuantSpec, quantize

__all__ = ["TensorPlan", "IntFormat", "join_name", "by_suffix", "SAFETENSORS_DTYPE"]

SAFETENSORS_DTYPE = {
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.float8_e4m3fn: "F8_E4M3",
}


class TensorPlan(NamedTuple):
    """One output tensor, from shapes only: ``(name, dtype, shape)``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def safetensors_dtype(self) -> str:
        """``I32``, ``BF16``, ``F16``, ``I64``..."""
        return SAFETENSORS_DTYPE[self.dtype]


def join_name(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def by_suffix(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-key ``{"a.b.qweight": t}`` or ``{"qweight": t}`` by the last name component."""
    return {k.rsplit(".", 1)[-1]: v for k, v in tensors.items()}


def _require(tensors: Mapping[str, torch.Tensor], names: Iterable[str], fmt: str) -> None:
    from dsconvert.errors import BadInputError

    missing = [n for n in names if n not in tensors]
    if missing:
        raise BadInputError(f"{fmt} module is missing {', '.join(missing)}; it has {', '.join(sorted(tensors))}",
                            hint="check that every partner tensor of the module was read (it may sit in another shard)")


class IntFormat(ABC):
    """Base class of the integer formats. Instances are stateless apart from constructor options."""

    name: ClassVar[str] = ""
    convention: Convention  # the RTN convention encode() quantizes with

    # --- capability -------------------------------------------------------------------------
    @abstractmethod
    def supports(self, spec: QuantSpec) -> bool:
        """True if this format can store ``spec``.

        Raises:
            UsageError: it cannot, with a message naming the limit and a hint (e.g. AWQ is 4-bit only).
        """

    def check_scheme(self, scheme, module: str | None = None) -> None:
        """Refuse a scheme this format cannot store. The base class stores integer weight-only schemes whose
        :class:`QuantSpec` :meth:`supports` accepts.

        Args:
            scheme: a :class:`~dsconvert.quant.schemes.SchemeDescription`.
            module: the module it is asked for (named in the message).

        Raises:
            UsageError: with the scheme, the module, what this format stores and a format that can.
        """
        w = scheme.weights
        if w.type != "int" or scheme.input_activations is not None:
            where = f" for module {module}" if module else ""
            raise UsageError(f"format {self.name} cannot store scheme {scheme.name}{where}: it stores integer "
                             "weight-only schemes (W4A16, W4A16_ASYM, W8A16)",
                             hint="use --format compressed-tensors (W8A8, FP8_BLOCK) or --format deepseek-fp8 "
                                  "(FP8_BLOCK)")
        try:
            self.supports(scheme.spec)
        except UsageError as e:
            if not module:
                raise
            raise UsageError(f"{e.message} (module {module})", hint=e.hint, remedy=e.remedy, **e.facts) from None

    def bind(self, scheme, module: str | None = None) -> "IntFormat":
        """The codec that stores ``scheme`` (a :class:`~dsconvert.quant.schemes.SchemeDescription`): this format
        itself by default. Raises UsageError like :meth:`check_scheme`."""
        self.check_scheme(scheme, module)
        return self

    def storage(self, scheme):
        """What ``scheme``'s kernel quantizes in for this format: the RTN :class:`Convention` by default."""
        return self.convention

    def from_config(self, quantization_config: dict) -> "IntFormat":
        """The codec that reads a checkpoint with this ``quantization_config`` (this format by default)."""
        return self

    def scheme_from_config(self, quantization_config: dict):
        """The :class:`~dsconvert.quant.schemes.SchemeDescription` a ``quantization_config`` declares: integer
        weight-only by default (from :meth:`spec_from_config`); the name is the matching registered scheme's.

        Raises:
            UnsupportedError: as :meth:`spec_from_config`.
        """
        from dsconvert.quant.schemes import SchemeDescription, WeightArgs, match_scheme_name

        sp = self.spec_from_config(quantization_config)
        w = WeightArgs(type="int", bits=sp.bits, strategy="channel" if sp.per_channel else "group",
                       symmetric=sp.symmetric, group_size=None if sp.per_channel else sp.group_size)
        return SchemeDescription(match_scheme_name(w, None) or f"INT{sp.bits}", w, None)

    @property
    def marker_suffix(self) -> str:
        """The tensor suffix only a quantized module has (how a reader finds the quantized modules)."""
        return self.tensor_names("", None)[0]

    def model_quantization_config(self, spec, *, default_ignore: Iterable[str] = (), kept: Iterable[str] = (),
                                  modules: Iterable[str] = ()) -> dict:
        """``quantization_config`` for a whole model.

        Args:
            spec: the kernel spec of the quantized modules.
            default_ignore: patterns for what never quantizes (lm_head, the router...).
            kept: quantizable modules the user kept in float (``--ignore``).
            modules: every quantizable module.

        The base writes ``default_ignore + kept`` as the ignore list.
        """
        return self.quantization_config(spec, [*default_ignore, *kept])

    def record_calibration(self, quantization_config: dict, record: dict) -> dict:
        """``quantization_config`` with the calibration record (which data, hash of the windows) under
        ``"calibration"``: compressed-tensors' and transformers' parsers ignore unknown keys."""
        return {**quantization_config, "calibration": record}

    def sidecar_files(self, quantization_config: dict) -> dict[str, dict]:
        """JSON files this format writes beside ``config.json`` (file name -> content); none by default."""
        return {}

    # --- names and plan (shapes only) -------------------------------------------------------
    @abstractmethod
    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        """Names this format writes for one module; with ``spec=None``, every name it may write."""

    @abstractmethod
    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        """``[(name, dtype, shape), ...]`` for a ``[M, N]`` weight, from shapes only.

        Raises:
            ShapeError: the shape cannot be stored with ``spec`` (group size, packing multiples).
            UsageError: ``spec`` unsupported (see :meth:`supports`).
        """

    # --- encode -----------------------------------------------------------------------------
    def encode(self, prefix: str, w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        """RTN-quantize ``w`` ``[M, N]`` with this format's convention and pack it.

        Returns:
            ``{name: tensor}`` exactly as :meth:`plan` lists them (names, dtypes, shapes), on ``w``'s device.
        """
        self.supports(spec)
        self.plan(prefix, tuple(w.shape), spec)  # shape checks with the format's own messages
        return self.encode_qtensor(prefix, quantize(w, spec, self.convention, name=prefix or None))

    @abstractmethod
    def encode_qtensor(self, prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
        """Pack an already quantized tensor (from RTN, GPTQ or AWQ search).

        ``qt`` may use either signedness (converted); its scale dtype must be this format's.
        """

    # --- decode -----------------------------------------------------------------------------
    @abstractmethod
    def decode(self, tensors: Mapping[str, torch.Tensor],
               spec_or_config: QuantSpec | dict) -> torch.Tensor:
        """Dequantize one module's tensors as the loader does; returns float32 ``[M, N]``.

        ``tensors`` is keyed by suffix (``qweight``) or full name. The loader's product
        ``(q - z) * scale`` is rounded once to the stored scale dtype (bf16/fp16), as
        compressed-tensors' ``dequantize`` and vLLM's fp16/bf16 kernels compute it.
        """

    # --- metadata ---------------------------------------------------------------------------
    @abstractmethod
    def quantization_config(self, spec: QuantSpec, ignore: Iterable[str] = ()) -> dict:
        """The ``config.json -> quantization_config`` dict for a model quantized with ``spec``."""

    @classmethod
    @abstractmethod
    def detect(cls, quantization_config: dict) -> bool:
        """True if ``quantization_config`` (from an existing checkpoint) is this format."""

    @abstractmethod
    def spec_from_config(self, quantization_config: dict) -> QuantSpec:
        """The :class:`QuantSpec` a ``quantization_config`` of this format describes.

        Raises:
            UnsupportedError: the config uses features this reader does not handle.
        """

    # --- helpers ----------------------------------------------------------------------------
    def _spec(self, spec_or_config: QuantSpec | dict) -> QuantSpec:
        return spec_or_config if isinstance(spec_or_config, QuantSpec) else self.spec_from_config(spec_or_config)

    @staticmethod
    def _check_2d(shape: tuple[int, ...], prefix: str) -> tuple[int, int]:
        if len(shape) != 2:
            raise ShapeError(f"tensor {prefix!r}: integer formats need a 2-D [out, in] weight, got {tuple(shape)}")
        return int(shape[0]), int(shape[1])
