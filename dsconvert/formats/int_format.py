"""Common interface of the quantized safetensors formats (compressed-tensors, AutoAWQ GEMM, GPTQ, DeepSeek FP8).

A format owns names, dtypes, shapes, bit layout and ``quantization_config``, and declares what it can store
(:meth:`IntFormat.check_scheme`, from a scheme's whole
:class:`~dsconvert.quant.schemes.SchemeDescription`) and the storage convention the scheme's kernel must
quantize in (:meth:`IntFormat.storage`). It never chooses scales: the scheme quantizes (RTN, GPTQ, AWQ search)
and hands a ready payload (:class:`~dsconvert.quant.rtn.QTensor` or
:class:`~dsconvert.quant.fp8_quant.FP8BlockTensor`) to :meth:`IntFormat.encode_qtensor`.

Weights are ``[N, K]``: N = out_features, K = in_features. ``prefix`` is the module name
(``model.layers.3.mlp.experts.7.down_proj``); tensor names are ``f"{prefix}.{suffix}"`` (just
``suffix`` when ``prefix`` is empty).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Mapping, NamedTuple

import torch

from dsconvert.errors import ShapeError, UsageError
from dsconvert.quant.rtn import Convention, QTensor, QuantSpec

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
        raise BadInputError(f"{fmt} module is missing tensor(s) {missing}; has {sorted(tensors)}",
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

    # --- names and plan (shapes only) -------------------------------------------------------
    @abstractmethod
    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        """Names this format writes for one module; with ``spec=None``, every name it may write."""

    @abstractmethod
    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        """``[(name, dtype, shape), ...]`` for a ``[N, K]`` weight, from shapes only.

        Raises:
            ShapeError: the shape cannot be stored with ``spec`` (group size, packing multiples).
            UsageError: ``spec`` unsupported (see :meth:`supports`).
        """

    def check_scheme(self, scheme, module: str | None = None) -> None:
        """Refuse a scheme this format cannot store. The base class stores integer weight-only schemes.

        Args:
            scheme: a :class:`~dsconvert.quant.schemes.SchemeDescription`.
            module: the module it is asked for (named in the message).

        Raises:
            UsageError: with the scheme, the module, what this format stores and a format that can.
        """
        w = scheme.weights
        if w.type != "int" or scheme.input_activations is not None:
            where = f" for {module}" if module else ""
            raise UsageError(f"format {self.name} cannot store scheme {scheme.name}{where}: it stores integer "
                             "weight-only schemes (W4A16, W4A16_ASYM, W8A16)",
                             hint="use --format compressed-tensors (or deepseek-fp8 for FP8_BLOCK)")

    def storage(self, spec) -> Convention:
        """What the scheme's kernel must quantize in for this format: the RTN :class:`Convention`."""
        return self.convention

    def model_quantization_config(self, spec, *, default_ignore: Iterable[str] = (), kept: Iterable[str] = (),
                                  modules: Iterable[str] = ()) -> dict:
        """``quantization_config`` for a whole model: ``default_ignore`` = patterns for what never quantizes
        (lm_head, router...), ``kept`` = quantizable modules the user kept in float, ``modules`` = every
        quantizable module. The base writes ``default_ignore + kept`` as the ignore list."""
        return self.quantization_config(spec, [*default_ignore, *kept])

    # --- encode -----------------------------------------------------------------------------
    @abstractmethod
    def encode_qtensor(self, prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
        """Pack an already quantized tensor (from RTN, GPTQ or AWQ search).

        ``qt`` may use either signedness (converted); its scale dtype must be this format's.
        """

    # --- decode -----------------------------------------------------------------------------
    @abstractmethod
    def decode(self, tensors: Mapping[str, torch.Tensor],
               spec_or_config: QuantSpec | dict) -> torch.Tensor:
        """Dequantize one module's tensors as the loader does; returns float32 ``[N, K]``.

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
