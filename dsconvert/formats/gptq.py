"""GPTQ layouts: v1 (``checkpoint_format: "gptq"``, AutoGPTQ) and v2 (``"gptq_v2"``, GPTQModel).

Per module (M = out_features, N = in_features, g = group size, N for per-channel, b = bits):

==========  =======  ================  =======================================================
tensor      dtype    shape             content
==========  =======  ================  =======================================================
``qweight``  int32   [N*b/32, M]       unsigned q, packed along N, sequential LSB first
``qzeros``   int32   [N/g, M*b/32]     unsigned zeros along M, sequential; v1 stores zero - 1
``scales``   fp16    [N/g, M]          multipliers
``g_idx``    int32   [N]               group of each input channel (``k // g``; no act-order)
==========  =======  ================  =======================================================

Dequant (loader): ``w[n, k] = (q[k, n] - zero[g_idx[k], n]) * s[g_idx[k], n]`` in fp16, where
``zero = stored + 1`` for v1. v1 cannot store a zero of 0 (it wraps to 2^b - 1 and reads back as
2^b), so v1 is written symmetric only (zero 8, stored 7: qzeros words ``0x77777777``); use v2 for
asymmetric. Sources: AutoGPTQ ``nn_modules/qlinear/qlinear_cuda_old.py::QuantLinear.pack``,
``quantization/quantizer.py``; GPTQModel ``utils/model.py::convert_gptq_v1_to_v2_format``.
"""

from __future__ import annotations

import re
from typing import ClassVar, Iterable, Mapping

import torch

from dsconvert.errors import ShapeError, UnsupportedError, UsageError
from dsconvert.formats.int_format import IntFormat, TensorPlan, _require, by_suffix, join_name
from dsconvert.formats.format_registry import register_format
from dsconvert.quant.pack import (
    pack_gptq_qweight,
    pack_gptq_qzeros,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)
from dsconvert.quant.rtn import GPTQ, QTensor, QuantSpec

__all__ = ["GPTQFormat", "GPTQv2Format"]

_NAMES = ("qweight", "qzeros", "scales", "g_idx")


@register_format("gptq", aliases=["gptq-v1", "autogptq"])
class GPTQFormat(IntFormat):
    """GPTQ v1 writer/reader (``checkpoint_format: "gptq"``), symmetric only when writing."""

    checkpoint_format: ClassVar[str] = "gptq"
    convention = GPTQ
    scale_dtype = torch.float16

    def supports(self, spec: QuantSpec) -> bool:
        if not spec.symmetric and self.checkpoint_format == "gptq":
            raise UsageError("GPTQ v1 (checkpoint_format gptq) cannot store asymmetric groups whose zero "
                             "point is 0 (it stores zero - 1), so dsconvert writes v1 symmetric only",
                             hint="use a symmetric scheme (W4A16), or --format gptq_v2 for W4A16_ASYM")
        return True

    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        return [join_name(prefix, s) for s in _NAMES]

    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        self.supports(spec)
        n, k = self._check_2d(shape, prefix)
        groups = spec.num_groups(k, prefix or None)
        b = spec.bits
        for dim, what in ((k, "in_features N"), (n, "out_features M")):
            if (dim * b) % 32:
                raise ShapeError(f"GPTQ packs {32 // b} values per int32; {what}={dim} of {prefix!r} "
                                 f"is not a multiple of {32 // b}",
                                 hint="--ignore this layer or use --format compressed-tensors")
        return [
            TensorPlan(join_name(prefix, "qweight"), torch.int32, (k * b // 32, n)),
            TensorPlan(join_name(prefix, "qzeros"), torch.int32, (groups, n * b // 32)),
            TensorPlan(join_name(prefix, "scales"), torch.float16, (groups, n)),
            TensorPlan(join_name(prefix, "g_idx"), torch.int32, (k,)),
        ]

    def encode_qtensor(self, prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
        if qt.convention.scale_dtype != torch.float16:
            raise ValueError(f"GPTQ stores fp16 scales; QTensor scales are {qt.convention.scale_dtype}")
        qt = qt.to_convention(GPTQ)
        n, k = qt.shape
        self.plan(prefix, (n, k), qt.spec)
        b = qt.spec.bits
        g = qt.group_size
        return {
            join_name(prefix, "qweight"): pack_gptq_qweight(qt.q.t(), b),  # (M, N) -> (N, M) -> (N*b/32, M)
            join_name(prefix, "qzeros"): pack_gptq_qzeros(qt.zero.t(), b, self.checkpoint_format),  # (G, M*b/32)
            join_name(prefix, "scales"): qt.scale.t().to(torch.float16).contiguous(),  # (G, M)
            join_name(prefix, "g_idx"): (torch.arange(k, device=qt.q.device, dtype=torch.int32) // g),
        }

    def decode(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> torch.Tensor:
        """Loader dequant honouring ``g_idx`` (so act-order checkpoints decode too); float32 ``[M, N]``."""
        spec = self._spec(spec_or_config)
        t = by_suffix(tensors)
        _require(t, ("qweight", "qzeros", "scales"), "GPTQ")
        b = spec.bits
        q = unpack_gptq_qweight(t["qweight"], b)  # (N, M)
        z = unpack_gptq_qzeros(t["qzeros"], b, self.checkpoint_format)  # (G, M) true zeros
        s = t["scales"]  # (G, M)
        k, n = q.shape
        if "g_idx" in t:
            g_idx = t["g_idx"].to(torch.int64)
        else:
            g_idx = torch.arange(k, device=q.device) // spec.effective_group_size(k)
        if tuple(s.shape) != tuple(z.shape) or s.shape[1] != n or g_idx.shape != (k,) or \
                (k and int(g_idx.max()) >= s.shape[0]):
            raise UnsupportedError(f"GPTQ tensors disagree: qweight {tuple(t['qweight'].shape)}, qzeros "
                                   f"{tuple(t['qzeros'].shape)}, scales {tuple(s.shape)}, g_idx {tuple(g_idx.shape)}")
        w = (q.to(torch.float32) - z[g_idx].to(torch.float32)) * s[g_idx].to(torch.float32)  # (N, M)
        return w.to(s.dtype).to(torch.float32).t().contiguous()  # (M, N)

    def quantization_config(self, spec: QuantSpec, ignore: Iterable[str] = ()) -> dict:
        """GPTQ ``quantization_config`` (GPTQModel/optimum keys; ``checkpoint_format`` explicit).

        ``ignore`` names become GPTQModel ``dynamic`` skip rules ``"-:^<escaped name>$"`` (exact match;
        honoured by vLLM's gptq_marlin); absent when ``ignore`` is empty.
        """
        self.supports(spec)
        cfg = {
            "quant_method": "gptq",
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": False,
            "sym": spec.symmetric,
            "checkpoint_format": self.checkpoint_format,
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "lm_head": False,
            "pack_dtype": "int32",
        }
        ignore = list(ignore)
        if ignore:
            cfg["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in ignore}
        return cfg

    def record_calibration(self, quantization_config: dict, record: dict) -> dict:
        """The calibration record goes under GPTQModel's free-form ``meta`` dict (``meta.calibration``)."""
        meta = dict(quantization_config.get("meta") or {}, calibration=record)
        return {**quantization_config, "meta": meta}

    def sidecar_files(self, quantization_config: dict) -> dict[str, dict]:
        """``quantize_config.json``: the same keys as ``quantization_config``. AutoGPTQ-style loaders (and
        vLLM's fallback) read this file instead of the config.json entry."""
        return {"quantize_config.json": dict(quantization_config)}

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        qc = quantization_config or {}
        if str(qc.get("quant_method", "")).lower() != "gptq" or qc.get("is_marlin_format"):
            return False
        return str(qc.get("checkpoint_format", "gptq")).lower() == cls.checkpoint_format

    def spec_from_config(self, quantization_config: dict) -> QuantSpec:
        qc = quantization_config
        if not self.detect(qc):
            raise UnsupportedError(f"quantization_config is not GPTQ {self.checkpoint_format}")
        return QuantSpec(bits=int(qc["bits"]), group_size=int(qc.get("group_size", -1)),
                         symmetric=bool(qc.get("sym", True)))


@register_format("gptq_v2", aliases=["gptq-v2-format", "gptqmodel"])
class GPTQv2Format(GPTQFormat):
    """GPTQ v2 (``checkpoint_format: "gptq_v2"``): stores the true zero; asymmetric allowed."""

    checkpoint_format: ClassVar[str] = "gptq_v2"
