"""compressed-tensors ``pack-quantized`` (weight-only INT4/INT8) and ``float-quantized`` (FP8_BLOCK), as
llm-compressor writes them.

Per module, N = out_features, K = in_features, g = group size (K for per-channel), b = bits:

=====================  =======  ==========================  =========================================
tensor                 dtype    shape                       content
=====================  =======  ==========================  =========================================
``weight_packed``      int32    [N, ceil(K*b/32)]           signed q + 2^(b-1), LSB first along K
``weight_scale``       bf16     [N, K/g]                    multiplier (model dtype)
``weight_shape``       int64    [2]                         (N, K)
``weight_zero_point``  int32    [ceil(N*b/32), K/g]         asymmetric only; signed zp packed along dim 0
=====================  =======  ==========================  =========================================

Dequant: ``w = (q - zp) * scale`` computed in the scale dtype.

``float-quantized`` FP8_BLOCK (M = out_features, N = in_features, 128 x 128 blocks, edge blocks partial):

=====================  ===============  ============================  ==================================
tensor                 dtype            shape                         content
=====================  ===============  ============================  ==================================
``weight``             float8_e4m3fn    [M, N]                        ``e4m3(w / scale)``
``weight_scale``       bf16             [ceil(M/128), ceil(N/128)]    multiplier per block (model dtype)
=====================  ===============  ============================  ==================================

Dequant: ``w = q.to(bf16) * scale`` in bf16 (``naive_quantized/base.py``, ``lifecycle/forward_helpers.py``).
Sources: compressed-tensors 0.20.1 ``compressors/pack_quantized/{base,helpers}.py``,
``quantization/quant_config.py``, ``compressors/model_compressors/model_compressor.py::update_config``.
The layout and the config dict are verified against the installed library in tests/test_int_formats.py
(its ``PackedQuantizationCompressor.decompress`` reads our tensors bit-exactly).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from dsconvert.errors import UnsupportedError, UsageError
from dsconvert.formats.int_format import IntFormat, TensorPlan, _require, by_suffix, join_name
from dsconvert.formats.registry import register_format
from dsconvert.quant.fp8_quant import FP8BlockSpec, FP8BlockTensor, dequantize_fp8_block
from dsconvert.quant.pack import pack_int32_rows_lsb, unpack_int32_rows_lsb
from dsconvert.quant.rtn import COMPRESSED_TENSORS, QTensor, QuantSpec, dequantize

__all__ = ["CompressedTensorsFormat", "CT_LAYOUT_VERSION"]

#: compressed-tensors release whose on-disk layout and config this module reproduces (written as
#: ``quantization_config.version``, as ``ModelCompressor.update_config`` writes its own version).
CT_LAYOUT_VERSION = "0.20.1"

_WEIGHT = ("weight_packed", "weight_scale", "weight_shape")
_ZP = "weight_zero_point"
_FLOAT = ("weight", "weight_scale")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@register_format("compressed-tensors", aliases=["ct", "pack-quantized", "llm-compressor"])
class CompressedTensorsFormat(IntFormat):
    """``pack-quantized`` writer/reader.

    Args:
        scale_dtype: ``weight_scale`` dtype = the model dtype (bf16 for DeepSeek-V3; fp16 allowed).
    """

    def __init__(self, scale_dtype: torch.dtype = torch.bfloat16):
        if scale_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"compressed-tensors scale dtype must be bfloat16 or float16, got {scale_dtype}")
        self.scale_dtype = scale_dtype
        self.convention = COMPRESSED_TENSORS.with_scale_dtype(scale_dtype)

    def supports(self, spec: QuantSpec) -> bool:
        return True  # any QuantSpec (int4/int8, sym/asym, group/channel), and FP8 blocks

    def check_scheme(self, scheme, module: str | None = None) -> None:
        """Integer weight-only schemes (pack-quantized) and FP8 blocks with dynamic activations (float-quantized).

        Raises:
            UsageError: anything else, naming the scheme and the module.
        """
        w, a = scheme.weights, scheme.input_activations
        ok = (w.type == "int" and a is None) or (
            w.type == "float" and w.strategy == "block" and w.bits == 8 and w.scale_rule == "amax"
            and a is not None and a.dynamic)
        if not ok:
            where = f" for {module}" if module else ""
            extra = (" (power-of-two scales are DeepSeek's ue8m0 format: use --format deepseek-fp8)"
                     if w.scale_rule == "pow2" else "")
            raise UsageError(f"format {self.name} cannot store scheme {scheme.name}{where}{extra}",
                             hint="compressed-tensors here stores W4A16, W4A16_ASYM, W8A16 (pack-quantized) and "
                                  "FP8_BLOCK (float-quantized)")

    def storage(self, spec):
        """The RTN convention for integer specs; the scale dtype (the model dtype) for FP8 blocks."""
        return self.scale_dtype if isinstance(spec, FP8BlockSpec) else self.convention

    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        if isinstance(spec, FP8BlockSpec):
            return [join_name(prefix, s) for s in _FLOAT]
        suffixes = list(_WEIGHT)
        if spec is None or not spec.symmetric:
            suffixes.append(_ZP)
        if spec is None:
            suffixes += list(_FLOAT)
        return [join_name(prefix, s) for s in suffixes]

    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        n, k = self._check_2d(shape, prefix)
        if isinstance(spec, FP8BlockSpec):
            return [TensorPlan(join_name(prefix, "weight"), torch.float8_e4m3fn, (n, k)),
                    TensorPlan(join_name(prefix, "weight_scale"), self.scale_dtype, spec.grid((n, k), prefix))]
        groups = spec.num_groups(k, prefix or None)
        out = [
            TensorPlan(join_name(prefix, "weight_packed"), torch.int32, (n, _ceil_div(k * spec.bits, 32))),
            TensorPlan(join_name(prefix, "weight_scale"), self.scale_dtype, (n, groups)),
            TensorPlan(join_name(prefix, "weight_shape"), torch.int64, (2,)),
        ]
        if not spec.symmetric:
            out.append(TensorPlan(join_name(prefix, _ZP), torch.int32, (_ceil_div(n * spec.bits, 32), groups)))
        return out

    def encode_qtensor(self, prefix: str, qt: QTensor | FP8BlockTensor) -> dict[str, torch.Tensor]:
        if isinstance(qt, FP8BlockTensor):
            if qt.scale.dtype != self.scale_dtype:
                raise ValueError(f"FP8 scales are {qt.scale.dtype}, this writer stores {self.scale_dtype}")
            return {join_name(prefix, "weight"): qt.q.contiguous(),
                    join_name(prefix, "weight_scale"): qt.scale.contiguous()}
        if qt.convention.scale_dtype != self.scale_dtype:
            raise ValueError(f"QTensor scales are {qt.convention.scale_dtype}, this writer stores {self.scale_dtype}")
        qt = qt.to_convention(self.convention)
        n, k = qt.shape
        b = qt.spec.bits
        out = {
            join_name(prefix, "weight_packed"): pack_int32_rows_lsb(qt.q, b, packed_dim=1),
            join_name(prefix, "weight_scale"): qt.scale.to(self.scale_dtype).contiguous(),
            join_name(prefix, "weight_shape"): torch.tensor([n, k], dtype=torch.int64, device=qt.q.device),
        }
        if not qt.spec.symmetric:
            out[join_name(prefix, _ZP)] = pack_int32_rows_lsb(qt.zero, b, packed_dim=0)
        return out

    def to_qtensor(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> QTensor:
        """Unpack one module's tensors into a signed :class:`QTensor` (scale dtype as stored)."""
        spec = self._spec(spec_or_config)
        t = by_suffix(tensors)
        _require(t, list(_WEIGHT) + ([] if spec.symmetric else [_ZP]), "compressed-tensors")
        n, k = (int(v) for v in t["weight_shape"].tolist())
        scale = t["weight_scale"]
        groups = spec.num_groups(k)
        if tuple(scale.shape) != (n, groups):
            raise UnsupportedError(f"weight_scale shape {tuple(scale.shape)} does not match weight_shape "
                                   f"{(n, k)} with group size {spec.group_size} (expected {(n, groups)})")
        q = unpack_int32_rows_lsb(t["weight_packed"], spec.bits, k, packed_dim=1)
        zero = None
        if not spec.symmetric:
            zero = unpack_int32_rows_lsb(t[_ZP], spec.bits, n, packed_dim=0)
        conv = COMPRESSED_TENSORS.with_scale_dtype(scale.dtype)
        return QTensor(q=q, scale=scale.to(torch.float32), zero=zero, spec=spec, convention=conv)

    def decode(self, tensors: Mapping[str, torch.Tensor], spec_or_config: QuantSpec | dict) -> torch.Tensor:
        t = by_suffix(tensors)
        if "weight" in t and t["weight"].dtype == torch.float8_e4m3fn:
            return self._decode_fp8(t, spec_or_config)
        qt = self.to_qtensor(tensors, spec_or_config)
        return dequantize(qt, out_dtype=qt.convention.scale_dtype).to(torch.float32)

    def _decode_fp8(self, t: dict, spec_or_config: QuantSpec | dict) -> torch.Tensor:
        spec = spec_or_config if isinstance(spec_or_config, FP8BlockSpec) else FP8BlockSpec()
        _require(t, _FLOAT, "compressed-tensors float-quantized")
        q, scale = t["weight"], t["weight_scale"]
        grid = spec.grid(tuple(q.shape))
        if tuple(scale.shape) != grid:
            raise UnsupportedError(f"weight_scale shape {tuple(scale.shape)} does not match weight "
                                   f"{tuple(q.shape)} with block {spec.block} (expected {grid})")
        out = scale.dtype if scale.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        return dequantize_fp8_block(FP8BlockTensor(q, scale, spec), out).to(torch.float32)

    # --- metadata ---------------------------------------------------------------------------
    @staticmethod
    def fp8_block_args(spec: FP8BlockSpec) -> tuple[dict, dict]:
        """``(weights, input_activations)`` QuantizationArgs dicts of the FP8_BLOCK preset, as serialised."""
        weights = {"block_structure": list(spec.block), "dynamic": False, "group_size": None, "num_bits": 8,
                   "strategy": "block", "symmetric": True, "type": "float"}
        acts = {"dynamic": True, "group_size": 128, "num_bits": 8, "strategy": "group", "symmetric": True,
                "type": "float"}
        return weights, acts

    @staticmethod
    def weights_args(spec: QuantSpec) -> dict:
        """The ``weights`` QuantizationArgs dict as compressed-tensors 0.20.1 serialises it.

        Unset optional fields (``actorder``, ``block_structure``, ``scale_dtype``, ``observer``,
        ``zp_dtype``, ``observer_kwargs``) are omitted by the library's serializer, so they are here.
        """
        return {
            "dynamic": False,
            "group_size": None if spec.per_channel else spec.group_size,
            "num_bits": spec.bits,
            "strategy": "channel" if spec.per_channel else "group",
            "symmetric": spec.symmetric,
            "type": "int",
        }

    def quantization_config(self, spec: QuantSpec, ignore: Iterable[str] = ()) -> dict:
        """``quantization_config`` exactly as llm-compressor + compressed-tensors 0.20.1 write it.

        ``ignore`` entries are exact module names or ``re:`` regexes, written as given (sorted order
        is the caller's choice). Keys and nesting match ``ModelCompressor.update_config``.
        """
        if isinstance(spec, FP8BlockSpec):
            if spec.pow2:
                raise UsageError("compressed-tensors FP8_BLOCK has no power-of-two scale option",
                                 hint="use --format deepseek-fp8 for ue8m0 scales")
            fmt = "float-quantized"
            weights, acts = self.fp8_block_args(spec)
        else:
            fmt, weights, acts = "pack-quantized", self.weights_args(spec), None
        return {
            "config_groups": {
                "group_0": {
                    "format": fmt,
                    "input_activations": acts,
                    "output_activations": None,
                    "targets": ["Linear"],
                    "weights": weights,
                }
            },
            "format": fmt,
            "global_compression_ratio": None,
            "ignore": list(ignore),
            "kv_cache_scheme": None,
            "moe_sparsity_config": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_LAYOUT_VERSION,
        }

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        qc = quantization_config or {}
        if qc.get("quant_method") != "compressed-tensors":
            return False
        groups = qc.get("config_groups") or {}
        fmts = {(g or {}).get("format") or qc.get("format") for g in groups.values()} or {qc.get("format")}
        return bool(fmts) and fmts <= {"pack-quantized", "float-quantized"}

    def spec_from_config(self, quantization_config: dict) -> QuantSpec:
        qc = quantization_config
        if not self.detect(qc):
            raise UnsupportedError("quantization_config is not compressed-tensors pack-quantized")
        groups = qc.get("config_groups") or {}
        specs = set()
        for name, g in groups.items():
            w = (g or {}).get("weights") or {}
            if (g.get("format") or qc.get("format")) == "float-quantized":
                specs.add(self._fp8_spec_from_group(name, w))
                continue
            if w.get("type", "int") != "int" or g.get("input_activations") is not None:
                raise UnsupportedError(f"config group {name!r} is not weight-only integer quantization")
            strategy = w.get("strategy") or ("channel" if w.get("group_size") in (None, -1) else "group")
            if strategy not in ("group", "channel"):
                raise UnsupportedError(f"config group {name!r}: strategy {strategy!r} is not supported "
                                       "(expected group or channel)")
            if w.get("actorder") == "group":
                raise UnsupportedError(f"config group {name!r}: actorder 'group' (weight_g_idx) is not supported")
            gs = -1 if strategy == "channel" else int(w["group_size"])
            specs.add(QuantSpec(bits=int(w["num_bits"]), group_size=gs, symmetric=bool(w.get("symmetric", True))))
        if len(specs) != 1:
            raise UnsupportedError(f"expected one weight scheme in config_groups, found {len(specs)}",
                                   hint="pass the per-module QuantSpec to decode() instead of the config")
        return specs.pop()

    @staticmethod
    def _fp8_spec_from_group(name: str, w: dict) -> FP8BlockSpec:
        if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8 or w.get("strategy") != "block":
            raise UnsupportedError(f"config group {name!r}: float-quantized weights other than 8-bit block "
                                   f"(strategy {w.get('strategy')!r}) are not supported")
        bs = w.get("block_structure") or [128, 128]
        return FP8BlockSpec((int(bs[0]), int(bs[1])))
