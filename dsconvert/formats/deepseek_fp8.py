"""DeepSeek's native block-FP8 layout (``quant_method: fp8``), as the V3/R1 release ships it.

Per quantized module (M = out_features, N = in_features, 128 x 128 blocks, edge blocks partial):

=======================  ===============  ============================  ====================================
tensor                   dtype            shape                         content
=======================  ===============  ============================  ====================================
``weight``               float8_e4m3fn    [M, N]                        ``e4m3(w / scale_inv)``
``weight_scale_inv``     float32          [ceil(M/128), ceil(N/128)]    multiplier per block (amax / 448)
=======================  ===============  ============================  ====================================

Everything else (embeddings, ``lm_head``, norms, the router and its F32 ``e_score_correction_bias``, the MTP
``eh_proj`` and ``shared_head``) stays in BF16/F32 as in the release. ``quantization_config`` is
``{activation_scheme: dynamic, fmt: e4m3, quant_method: fp8, weight_block_size: [128, 128]}``, plus
``scale_fmt: ue8m0`` when the scales are powers of two (as DeepSeek-V3.1's config declares it), plus
``modules_to_not_convert`` (transformers' ``FineGrainedFP8Config`` key) when ``--ignore`` kept quantizable
modules in BF16. The output reads back in dsconvert as an FP8 release (``fp8-to-bf16``, ``validate``,
``quantize``) and in transformers through its fine-grained FP8 loader (tests/convert/test_w8a8_fp8.py).

Sources: DeepSeek-V3 ``config.json`` and ``README_WEIGHTS.md``; docs/checkpoint-layout.md; docs/int-formats.md §11.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from dsconvert.errors import UnsupportedError, UsageError
from dsconvert.formats.fp8_block_tensors import FP8BlockTensors
from dsconvert.formats.int_format import IntFormat
from dsconvert.formats.format_registry import register_format
from dsconvert.quant.fp8_quant import FP8BlockSpec, FP8BlockTensor, dequantize_fp8_block

__all__ = ["DeepSeekFP8Format"]

@register_format("deepseek-fp8", aliases=["fp8-native"])
class DeepSeekFP8Format(FP8BlockTensors, IntFormat):
    """Writer/reader of DeepSeek's ``weight`` + ``weight_scale_inv`` layout (float32 scales)."""

    convention = None  # no integer convention: this format stores FP8 blocks only
    scale_dtype = torch.float32
    scale_name = "weight_scale_inv"

    def supports(self, spec) -> bool:
        """True for an :class:`FP8BlockSpec`.

        Raises:
            UsageError: an integer spec.
        """
        if not isinstance(spec, FP8BlockSpec):
            raise UsageError("format deepseek-fp8 stores FP8_BLOCK only",
                             hint="use --scheme FP8_BLOCK, or --format compressed-tensors for integer schemes")
        return True

    def check_scheme(self, scheme, module: str | None = None) -> None:
        """FP8 block weights with dynamic per-token-group fp8 activations only (what ``quant_method: fp8``
        declares; the activation group is the block's column width).

        Raises:
            UsageError: any other scheme, naming the scheme and the module.
        """
        w, a = scheme.weights, scheme.input_activations
        ok = (w.type == "float" and w.bits == 8 and w.strategy == "block" and w.block is not None
              and a is not None and a.type == "float" and a.dynamic and a.strategy == "group"
              and a.group_size == w.block[1])
        if not ok:
            where = f" for module {module}" if module else ""
            raise UsageError(f"format deepseek-fp8 cannot store scheme {scheme.name}{where}: it stores FP8_BLOCK "
                             "(e4m3 weights, 128x128 float32 block scales, dynamic activations) only",
                             hint="use --scheme FP8_BLOCK, or --format compressed-tensors for integer schemes")

    def storage(self, scheme) -> torch.dtype:
        """Scales are stored as float32 (``weight_scale_inv``)."""
        return self.scale_dtype

    def decode(self, tensors: Mapping[str, torch.Tensor], spec_or_config) -> torch.Tensor:
        """``bf16(float32(weight) * weight_scale_inv)`` (DeepSeek's ``weight_dequant``) as float32 ``[M, N]``."""
        spec = spec_or_config if isinstance(spec_or_config, FP8BlockSpec) else self.spec_from_config(spec_or_config)
        q, scale_inv = self.block_tensors(tensors)
        return dequantize_fp8_block(FP8BlockTensor(q, scale_inv, spec)).to(torch.float32)

    def quantization_config(self, spec: FP8BlockSpec, ignore: Iterable[str] = ()) -> dict:
        """The release's ``quantization_config``; ``ignore`` (quantizable modules kept in BF16) becomes
        ``modules_to_not_convert`` when not empty."""
        self.supports(spec)
        qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
              "weight_block_size": list(spec.block)}
        if spec.pow2:
            qc["scale_fmt"] = "ue8m0"
        ignore = list(ignore)
        if ignore:
            qc["modules_to_not_convert"] = ignore
        return qc

    def model_quantization_config(self, spec, *, default_ignore: Iterable[str] = (), kept: Iterable[str] = (),
                                  modules: Iterable[str] = ()) -> dict:
        """Only the user's ``kept`` modules are listed: what never quantizes (embeddings, head, router) is not an
        FP8 Linear in DeepSeek's layout in the first place, as in the release's own config."""
        return self.quantization_config(spec, kept)

    def scheme_from_config(self, quantization_config: dict):
        from dsconvert.quant.schemes import get_scheme

        spec = self.spec_from_config(quantization_config)
        return get_scheme("FP8_BLOCK").describe(scale_fmt="ue8m0" if spec.pow2 else None)

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        return (quantization_config or {}).get("quant_method") == "fp8"

    def spec_from_config(self, quantization_config: dict) -> FP8BlockSpec:
        qc = quantization_config
        if not self.detect(qc):
            raise UnsupportedError("quantization_config is not DeepSeek fp8")
        bs = qc.get("weight_block_size")
        if not bs or len(bs) != 2:
            raise UnsupportedError(f"quant_method fp8 without a 2-entry weight_block_size (got {bs!r})")
        return FP8BlockSpec((int(bs[0]), int(bs[1])), pow2=qc.get("scale_fmt") == "ue8m0")
