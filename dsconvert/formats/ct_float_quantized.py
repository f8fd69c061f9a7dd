"""compressed-tensors ``float-quantized``: float8_e4m3fn weights with 128 x 128 block scales (FP8_BLOCK).

Per module (M = out_features, N = in_features, blocks ``(bm, bn)`` = ``block_structure``, edge blocks partial):

=================  ===============  ==========================  ==========================================
tensor             dtype            shape                       content
=================  ===============  ==========================  ==========================================
``weight``         float8_e4m3fn    [M, N]                      ``e4m3(w / scale)``
``weight_scale``   bf16             [ceil(M/bm), ceil(N/bn)]    multiplier per block (model dtype)
=================  ===============  ==========================  ==========================================

This is DeepSeek's own layout with ``weight_scale_inv`` renamed and the scale in the model dtype. Dequant:
``w = q.to(bf16) * scale`` in bf16. The input activations are quantized by the engine per token and per group of
128 channels at run time (``input_activations: {strategy: group, group_size: 128, dynamic: true}``).

Source: compressed-tensors 0.20.1 ``compressors/naive_quantized/base.py`` (``FloatQuantizationCompressor``,
padding for block strategies), ``quantization/quant_scheme.py::FP8_BLOCK``; docs/int-formats.md §10. Verified
against the installed library in tests/convert/test_w8a8_fp8.py.
"""

from __future__ import annotations

from typing import Mapping

import torch

from dsconvert.errors import UnsupportedError, UsageError
from dsconvert.formats.ct_pack_quantized import CompressedTensorsFormat
from dsconvert.formats.ct_registry import register_ct_compressor
from dsconvert.formats.fp8_block_tensors import FP8BlockTensors
from dsconvert.quant.fp8_quant import FP8BlockSpec, FP8BlockTensor, dequantize_fp8_block

__all__ = ["CTFloatQuantized"]

@register_ct_compressor("float-quantized")
class CTFloatQuantized(FP8BlockTensors, CompressedTensorsFormat):
    """float8_e4m3fn block-scaled weights with dynamic fp8 activations (FP8_BLOCK)."""

    scale_name = "weight_scale"

    @classmethod
    def accepts(cls, scheme) -> bool:
        return scheme.weights.type == "float" and scheme.input_activations is not None

    def check_codec(self, scheme, module: str | None = None) -> None:
        """float-quantized here: 8-bit block weights, amax scales, dynamic fp8 per-token-group activations.

        Raises:
            UsageError: anything else (power-of-two scales, other strategies), naming the module.
        """
        w, a = scheme.weights, scheme.input_activations
        where = f" for module {module}" if module else ""
        if w.scale_rule == "pow2":
            raise UsageError(f"compressed-tensors float-quantized cannot declare power-of-two (ue8m0) scales{where}",
                             hint="use --format deepseek-fp8 for --scale-fmt ue8m0, or drop --scale-fmt")
        if not (w.bits == 8 and w.strategy == "block" and w.block is not None and a.type == "float" and a.dynamic):
            raise UsageError(f"compressed-tensors float-quantized cannot store scheme {scheme.name}{where}: it "
                             "stores FP8 block weights with dynamic fp8 activations (FP8_BLOCK)",
                             hint="use --scheme FP8_BLOCK")

    def supports(self, spec) -> bool:
        if not isinstance(spec, FP8BlockSpec):
            raise UsageError(f"compressed-tensors float-quantized stores FP8 blocks, not {spec}",
                             hint="use --scheme FP8_BLOCK")
        return True

    def storage(self, scheme) -> torch.dtype:
        """FP8 block scales are stored in the model dtype (bf16)."""
        return self.scale_dtype

    def decode(self, tensors: Mapping[str, torch.Tensor], spec_or_config) -> torch.Tensor:
        """``q.to(bf16) * scale`` per block (one rounding to the scale dtype) as float32 ``[M, N]``.

        Raises:
            BadInputError: a tensor is missing. UnsupportedError: the scale grid does not match the weight.
        """
        spec = spec_or_config if isinstance(spec_or_config, FP8BlockSpec) else self.spec_from_config(spec_or_config)
        q, scale = self.block_tensors(tensors)
        grid = spec.grid(tuple(q.shape))
        if q.dtype != torch.float8_e4m3fn or tuple(scale.shape) != grid:
            raise UnsupportedError(f"float-quantized module: weight {q.dtype} {tuple(q.shape)} with weight_scale "
                                   f"{tuple(scale.shape)} (expected float8_e4m3fn and the block grid {grid})")
        out = scale.dtype if scale.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return dequantize_fp8_block(FP8BlockTensor(q, scale, spec), out).to(torch.float32)

    def group_args(self, spec: FP8BlockSpec) -> tuple[dict, dict]:
        """The FP8_BLOCK preset's args as compressed-tensors 0.20.1 serialises them."""
        weights = {"block_structure": list(spec.block), "dynamic": False, "group_size": None, "num_bits": 8,
                   "strategy": "block", "symmetric": True, "type": "float"}
        acts = {"dynamic": True, "group_size": spec.block[1], "num_bits": 8, "strategy": "group", "symmetric": True,
                "type": "float"}
        return weights, acts

    def spec_from_config(self, quantization_config: dict) -> FP8BlockSpec:
        if self._config_formats(quantization_config) != {self.compression_format}:
            raise UnsupportedError(f"quantization_config is not compressed-tensors {self.compression_format}")
        spec = self.scheme_from_config(quantization_config).spec
        self.supports(spec)
        return spec
