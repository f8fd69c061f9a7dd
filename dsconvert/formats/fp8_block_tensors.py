"""The two tensors of a block-FP8 module, shared by the formats that store them.

DeepSeek's release layout (``weight`` + float32 ``weight_scale_inv``) and compressed-tensors' ``float-quantized``
(``weight`` + ``weight_scale`` in the model dtype) differ only in the scale's name and dtype: float8_e4m3fn
``weight`` ``[M, N]`` and a scale per block on the ``(ceil(M/bm), ceil(N/bn))`` grid (docs/int-formats.md §10,
§11). A format mixes :class:`FP8BlockTensors` in and sets ``scale_name`` and ``scale_dtype``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dsconvert.formats.int_format import TensorPlan, _require, by_suffix, join_name
from dsconvert.quant.fp8_quant import FP8BlockSpec, FP8BlockTensor, quantize_fp8_block

__all__ = ["FP8BlockTensors"]


class FP8BlockTensors:
    """Names, plan and packing of a block-FP8 module (mixed into an :class:`~.int_format.IntFormat`)."""

    scale_name: str
    scale_dtype: torch.dtype

    @property
    def marker_suffix(self) -> str:
        return self.scale_name

    def tensor_names(self, prefix: str, spec=None) -> list[str]:
        return [join_name(prefix, "weight"), join_name(prefix, self.scale_name)]

    def plan(self, prefix: str, shape: tuple[int, int], spec: FP8BlockSpec) -> list[TensorPlan]:
        """``weight`` ``[M, N]`` float8_e4m3fn and the scale grid in ``scale_dtype``.

        Raises:
            UsageError: ``spec`` is not an :class:`FP8BlockSpec` (the format's ``supports``).
            ShapeError: ``shape`` is not 2-D.
        """
        self.supports(spec)
        m, n = self._check_2d(shape, prefix)
        return [TensorPlan(join_name(prefix, "weight"), torch.float8_e4m3fn, (m, n)),
                TensorPlan(join_name(prefix, self.scale_name), self.scale_dtype, spec.grid((m, n), prefix))]

    def encode(self, prefix: str, w: torch.Tensor, spec: FP8BlockSpec) -> dict[str, torch.Tensor]:
        """Block-FP8 quantize ``w`` ``[M, N]`` (DeepSeek's rule, scales in this format's dtype) and store it."""
        self.plan(prefix, tuple(w.shape), spec)
        return self.encode_qtensor(prefix, quantize_fp8_block(w, spec, scale_dtype=self.scale_dtype,
                                                              name=prefix or None))

    def encode_qtensor(self, prefix: str, qt: FP8BlockTensor) -> dict[str, torch.Tensor]:
        """Store an :class:`FP8BlockTensor` whose scales are already in this format's dtype.

        Raises:
            ValueError: another tensor type or scale dtype (a caller bug).
        """
        if not isinstance(qt, FP8BlockTensor) or qt.scale.dtype != self.scale_dtype:
            raise ValueError(f"{self.name} packs an FP8BlockTensor with {self.scale_dtype} scales")
        return {join_name(prefix, "weight"): qt.q.contiguous(),
                join_name(prefix, self.scale_name): qt.scale.contiguous()}

    def block_tensors(self, tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, scale)`` of one module's tensors (full names or suffixes).

        Raises:
            BadInputError: a tensor is missing.
        """
        t = by_suffix(tensors)
        _require(t, ("weight", self.scale_name), self.name)
        return t["weight"], t[self.scale_name]
