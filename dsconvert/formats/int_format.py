"""Common interface of the integer weight formats (compressed-tensors, AutoAWQ GEMM, GPTQ).

A format owns names, dtypes, shapes, bit layout and ``quantization_config``; it never chooses
scales beyond calling RTN in :meth:`IntFormat.encode` (calibrated algorithms hand a ready
:class:`~dsconvert.quant.rtn.QTensor` to :meth:`IntFormat.encode_qtensor`).

Weights are ``[N, K]``: N = out_features, K = in_features. ``prefix`` is the module name
(``model.layers.3.mlp.experts.7.down_proj``); tensor names are ``f"{prefix}.{suffix}"`` (just
``suffix`` when ``prefix`` is empty).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Mapping, NamedTuple

import torch

from dsconvert.errors import ShapeError
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
        """``[(name, dtype, shape), ...]`` for a ``[N, K]`` weight, from shapes only.

        Raises:
            ShapeError: the shape cannot be stored with ``spec`` (group size, packing multiples).
            UsageError: ``spec`` unsupported (see :meth:`supports`).
        """

    # --- encode -----------------------------------------------------------------------------
    def encode(self, prefix: str, w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        """RTN-quantize ``w`` ``[N, K]`` with this format's convention and pack it.

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
