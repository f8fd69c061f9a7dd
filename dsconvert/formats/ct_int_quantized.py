"""compressed-tensors ``int-quantized``: int8 weights stored unpacked, for W8A8 (dynamic int8 activations).

Per module (M = out_features, N = in_features), per-output-channel symmetric scales:

=================  =======  ========  ==============================================
tensor             dtype    shape     content
=================  =======  ========  ==============================================
``weight``         int8     [M, N]    signed q in [-128, 127]
``weight_scale``   bf16     [M, 1]    multiplier (model dtype), absmax / 127.5
=================  =======  ========  ==============================================

No zero point (symmetric). Dequant: ``w = q * scale`` computed in the scale dtype. The engine quantizes the
input activations per token at run time (``input_activations: {strategy: token, dynamic: true}``).

Source: compressed-tensors 0.20.1 ``compressors/naive_quantized/base.py`` (``IntQuantizationCompressor``: the
``naive`` layout, selected when input activations are quantized and the weights are ``int``) and
``quantization/quant_scheme.py::INT8_W8A8``; docs/int-formats.md §9. Verified against the installed library in
tests/convert/test_w8a8_fp8.py.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dsconvert.errors import UnsupportedError, UsageError
from dsconvert.formats.ct_pack_quantized import CompressedTensorsFormat
from dsconvert.formats.ct_registry import register_ct_compressor
from dsconvert.formats.int_format import TensorPlan, _require, by_suffix, join_name
from dsconvert.quant.rtn import COMPRESSED_TENSORS, QTensor, QuantSpec, dequantize

__all__ = ["CTIntQuantized"]

_NAMES = ("weight", "weight_scale")


@register_ct_compressor("int-quantized")
class CTIntQuantized(CompressedTensorsFormat):
    """int8 weights per channel with quantized input activations (W8A8)."""

    @classmethod
    def accepts(cls, scheme) -> bool:
        return scheme.weights.type == "int" and scheme.input_activations is not None

    def check_codec(self, scheme, module: str | None = None) -> None:
        """int-quantized here: 8-bit symmetric per-channel weights with dynamic int8 activations.

        Raises:
            UsageError: anything else, naming the module.
        """
        w, a = scheme.weights, scheme.input_activations
        if not (w.bits == 8 and w.symmetric and w.strategy == "channel" and a.type == "int" and a.dynamic):
            where = f" for module {module}" if module else ""
            raise UsageError(f"compressed-tensors int-quantized cannot store scheme {scheme.name}{where}: it "
                             "stores int8 symmetric per-channel weights with dynamic int8 activations (W8A8)",
                             hint="use --scheme W8A8")

    def supports(self, spec: QuantSpec) -> bool:
        if not (spec.bits == 8 and spec.symmetric and spec.per_channel):
            raise UsageError(f"compressed-tensors int-quantized stores int8 symmetric per-channel weights, "
                             f"not {spec}", hint="use --scheme W8A8")
        return True

    @property
    def marker_suffix(self) -> str:
        return "weight_scale"

    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        return [join_name(prefix, s) for s in _NAMES]

    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        self.supports(spec)
        n, k = self._check_2d(shape, prefix)
        return [TensorPlan(join_name(prefix, "weight"), torch.int8, (n, k)),
                TensorPlan(join_name(prefix, "weight_scale"), self.scale_dtype, (n, 1))]

    def encode_qtensor(self, prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
        """Store a signed per-channel 8-bit :class:`QTensor` (scale ``[M, 1]`` in this writer's dtype)."""
        if qt.convention.scale_dtype != self.scale_dtype:
            raise ValueError(f"QTensor scales are {qt.convention.scale_dtype}, this writer stores {self.scale_dtype}")
        self.supports(qt.spec)
        qt = qt.to_convention(self.convention)
        return {join_name(prefix, "weight"): qt.q.to(torch.int8).contiguous(),
                join_name(prefix, "weight_scale"): qt.scale.to(self.scale_dtype).reshape(-1, 1).contiguous()}

    def to_qtensor(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> QTensor:
        """One module's tensors as a signed :class:`QTensor` (scale dtype as stored).

        Raises:
            BadInputError: a tensor is missing. UnsupportedError: the scale is not ``[M, 1]``.
        """
        spec = self._spec(spec_or_config)
        t = by_suffix(tensors)
        _require(t, _NAMES, "compressed-tensors int-quantized")
        q, scale = t["weight"], t["weight_scale"]
        if q.dtype != torch.int8 or tuple(scale.shape) != (q.shape[0], 1):
            raise UnsupportedError(f"int-quantized module: weight {q.dtype} {tuple(q.shape)} with weight_scale "
                                   f"{tuple(scale.shape)} (expected int8 [M, N] and [M, 1])")
        conv = COMPRESSED_TENSORS.with_scale_dtype(scale.dtype)
        return QTensor(q=q, scale=scale.to(torch.float32), zero=None, spec=spec, convention=conv)

    def decode(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> torch.Tensor:
        qt = self.to_qtensor(tensors, spec_or_config)
        return dequantize(qt, out_dtype=qt.convention.scale_dtype).to(torch.float32)

    def group_args(self, spec: QuantSpec) -> tuple[dict, dict]:
        """The W8A8 preset's args as compressed-tensors 0.20.1 serialises them."""
        acts = {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token", "symmetric": True,
                "type": "int"}
        return self.weights_args(spec), acts

    def spec_from_config(self, quantization_config: dict) -> QuantSpec:
        if self._config_formats(quantization_config) != {self.compression_format}:
            raise UnsupportedError(f"quantization_config is not compressed-tensors {self.compression_format}")
        spec = self.scheme_from_config(quantization_config).spec
        self.supports(spec)
        return spec
