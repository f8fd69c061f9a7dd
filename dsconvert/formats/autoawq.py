"""AutoAWQ GEMM layout (``quant_method: "awq"``, ``version: "gemm"``), 4-bit only.

Per module (M = out_features, N = in_features, g = group size, N for per-channel):

==========  =======  ============  ========================================================
tensor      dtype    shape         content
==========  =======  ============  ========================================================
``qweight``  int32   [N, M/8]      unsigned q, packed along M in AWQ order [0,2,4,6,1,3,5,7]
``qzeros``   int32   [N/g, M/8]    unsigned zero points, same packing, stored as-is
``scales``   fp16    [N/g, M]      multipliers
==========  =======  ============  ========================================================

Dequant: ``w[n, k] = (q[k, n] - z[k // g, n]) * s[k // g, n]`` in fp16. There is no ``.weight``.
Symmetric specs are stored GPTQ-style (zero 2^(b-1) = 8, scale absmax / 7.5) in the same zero-point
layout, which every AWQ loader reads. Sources: AutoAWQ 0.2.9 ``awq/modules/linear/gemm.py::WQLinear_GEMM``,
``awq/quantize/quantizer.py::pseudo_quantize_tensor``; vLLM ``awq.py`` / ``awq_marlin.py``.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from dsconvert.errors import ShapeError, UnsupportedError, UsageError
from dsconvert.formats.int_format import IntFormat, TensorPlan, _require, by_suffix, join_name
from dsconvert.formats.format_registry import register_format
from dsconvert.quant.pack import pack_awq_gemm, unpack_awq_gemm
from dsconvert.quant.rtn import AUTOAWQ, QTensor, QuantSpec

__all__ = ["AutoAWQFormat", "check_modules_to_not_convert"]

_NAMES = ("qweight", "qzeros", "scales")


def check_modules_to_not_convert(ignore: Iterable[str], module_names: Iterable[str]) -> list[str]:
    """Check that each ignore entry, matched as a **substring** (as vLLM does), hits only ignored modules.

    vLLM tests ``any(entry in prefix for entry in modules_to_not_convert)``, so
    ``model.layers.1.mlp.gate`` would also skip ``model.layers.1.mlp.gate_proj`` and
    ``model.layers.1.`` would skip layer 10-19. ``module_names`` must list every module prefix the
    loader will see (HF names and, if relevant, vLLM's fused names such as ``gate_up_proj``).

    Returns:
        The entries, in order.

    Raises:
        UsageError: an entry is a substring of a module that is not itself ignored.
    """
    entries = list(ignore)
    ignored = set(entries)
    bad = {}
    for e in entries:
        hits = [m for m in module_names if e in m and m not in ignored]
        if hits:
            bad[e] = hits[:3]
    if bad:
        raise UsageError(
            "AWQ modules_to_not_convert entries match other modules by substring: "
            + "; ".join(f"{e!r} also matches {h}" for e, h in bad.items()),
            hint="leave modules unquantized by not emitting quantized tensors for them "
                 "(modules_to_not_convert null), or quantize the partner modules too",
        )
    return entries


@register_format("autoawq", aliases=["awq", "awq-gemm"])
class AutoAWQFormat(IntFormat):
    """AutoAWQ GEMM writer/reader (scales fp16)."""

    convention = AUTOAWQ
    scale_dtype = torch.float16

    def supports(self, spec: QuantSpec) -> bool:
        if spec.bits != 4:
            raise UsageError(f"the AutoAWQ GEMM format stores 4-bit weights only, not {spec.bits}-bit",
                             hint="use --format compressed-tensors or --format gptq for 8-bit")
        return True

    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        return [join_name(prefix, s) for s in _NAMES]

    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        self.supports(spec)
        n, k = self._check_2d(shape, prefix)
        groups = spec.num_groups(k, prefix or None)
        if n % 8:
            raise ShapeError(f"AutoAWQ GEMM packs 8 output columns per int32; out_features M={n} of "
                             f"{prefix!r} is not a multiple of 8",
                             hint="--ignore this layer or use --format compressed-tensors")
        return [
            TensorPlan(join_name(prefix, "qweight"), torch.int32, (k, n // 8)),
            TensorPlan(join_name(prefix, "qzeros"), torch.int32, (groups, n // 8)),
            TensorPlan(join_name(prefix, "scales"), torch.float16, (groups, n)),
        ]

    def encode_qtensor(self, prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
        self.supports(qt.spec)
        if qt.convention.scale_dtype != torch.float16:
            raise ValueError(f"AutoAWQ stores fp16 scales; QTensor scales are {qt.convention.scale_dtype}")
        qt = qt.to_convention(AUTOAWQ.with_scale_dtype(torch.float16))
        n, k = qt.shape
        self.plan(prefix, (n, k), qt.spec)
        return {
            join_name(prefix, "qweight"): pack_awq_gemm(qt.q.t()),  # (M, N) -> (N, M) -> (N, M/8)
            join_name(prefix, "qzeros"): pack_awq_gemm(qt.zero.t()),  # (M, G) -> (G, M) -> (G, M/8)
            join_name(prefix, "scales"): qt.scale.t().to(torch.float16).contiguous(),  # (G, M)
        }

    def to_qtensor(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> QTensor:
        """Unpack into an unsigned :class:`QTensor` (``q`` ``[M, N]``)."""
        spec = self._spec(spec_or_config)
        t = by_suffix(tensors)
        _require(t, _NAMES, "AutoAWQ")
        q = unpack_awq_gemm(t["qweight"]).t()  # (N, M) -> (M, N)
        z = unpack_awq_gemm(t["qzeros"]).t()  # (G, M) -> (M, G)
        s = t["scales"]
        k, n = q.shape[1], q.shape[0]
        if tuple(s.shape) != (spec.num_groups(k), n) or tuple(z.shape) != (n, s.shape[0]):
            raise UnsupportedError(f"AutoAWQ tensors disagree: qweight {tuple(t['qweight'].shape)}, "
                                   f"qzeros {tuple(t['qzeros'].shape)}, scales {tuple(s.shape)}, "
                                   f"group size {spec.group_size}")
        return QTensor(q=q.to(torch.uint8).contiguous(), scale=s.t().to(torch.float32).contiguous(),
                       zero=z.to(torch.uint8).contiguous(), spec=spec,
                       convention=AUTOAWQ.with_scale_dtype(s.dtype))

    def decode(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> torch.Tensor:
        from dsconvert.quant.rtn import dequantize

        qt = self.to_qtensor(tensors, spec_or_config)
        return dequantize(qt, out_dtype=qt.convention.scale_dtype).to(torch.float32)

    def quantization_config(self, spec: QuantSpec, ignore: Iterable[str] = (),
                            module_names: Iterable[str] | None = None) -> dict:
        """``{quant_method awq, bits 4, group_size, zero_point true, version gemm, modules_to_not_convert}``.

        ``modules_to_not_convert`` is null when ``ignore`` is empty (the DeepSeek default: the router
        stays unquantized because no quantized tensors are emitted for it). Otherwise every entry is
        checked with :func:`check_modules_to_not_convert` against ``module_names``.

        Raises:
            UsageError: ``ignore`` given without ``module_names``, or an entry matches another module.
        """
        self.supports(spec)
        ignore = list(ignore)
        if ignore and module_names is None:
            raise UsageError("AWQ loaders match modules_to_not_convert by substring; cannot check the "
                             "ignore list without the model's module names",
                             hint="pass module_names, or leave ignored modules out of the quantized set "
                                  "with modules_to_not_convert null")
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": spec.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": check_modules_to_not_convert(ignore, module_names) if ignore else None,
        }

    def model_quantization_config(self, spec: QuantSpec, *, default_ignore: Iterable[str] = (),
                                  kept: Iterable[str] = (), modules: Iterable[str] = ()) -> dict:
        """AWQ loaders never see the default-kept modules (no quantized tensors are emitted for them), so only
        the user's ``kept`` modules go to ``modules_to_not_convert``, checked against ``modules``."""
        kept = list(kept)
        return self.quantization_config(spec, kept, module_names=list(modules)) if kept \
            else self.quantization_config(spec)

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        qc = quantization_config or {}
        return (str(qc.get("quant_method", "")).lower() == "awq"
                and str(qc.get("version", "gemm")).lower() == "gemm")

    def spec_from_config(self, quantization_config: dict) -> QuantSpec:
        qc = quantization_config
        if not self.detect(qc):
            raise UnsupportedError("quantization_config is not AutoAWQ GEMM")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        gs = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if bits != 4:
            raise UnsupportedError(f"AutoAWQ GEMM checkpoint declares {bits} bits; only 4 is defined")
        if not qc.get("zero_point", True):
            raise UnsupportedError("AutoAWQ zero_point: false (signed q, no qzeros) is not supported")
        return QuantSpec(bits=4, group_size=gs, symmetric=False)
