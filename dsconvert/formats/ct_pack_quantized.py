"""compressed-tensors ``pack-quantized`` (weight-only INT4/INT8), as llm-compressor writes it: the codec the
other compression formats' codecs subclass (:class:`CompressedTensorsFormat` also picks the codec of a scheme or
a config among those registered in :data:`~dsconvert.formats.ct_registry.CT_COMPRESSORS`). Import it through
:mod:`dsconvert.formats.compressed_tensors`, which registers every codec and the format.

Per module, M = out_features, N = in_features, g = group size (N for per-channel), b = bits:

=====================  =======  ==========================  =========================================
tensor                 dtype    shape                       content
=====================  =======  ==========================  =========================================
``weight_packed``      int32    [M, ceil(N*b/32)]           signed q + 2^(b-1), LSB first along N
``weight_scale``       bf16     [M, N/g]                    multiplier (model dtype)
``weight_shape``       int64    [2]                         (M, N)
``weight_zero_point``  int32    [ceil(M*b/32), N/g]         asymmetric only; signed zp packed along dim 0
=====================  =======  ==========================  =========================================

Dequant: ``w = (q - zp) * scale`` computed in the scale dtype.
Sources: compressed-tensors 0.20.1 ``compressors/pack_quantized/{base,helpers}.py``,
``quantization/quant_config.py``, ``compressors/model_compressors/model_compressor.py::update_config``.
The layout and the config dict are verified against the installed library in tests/formats/test_int_formats.py
(its ``PackedQuantizationCompressor.decompress`` reads our tensors bit-exactly).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from dsconvert.errors import UnsupportedError, UsageError
from dsconvert.formats.ct_registry import CT_COMPRESSORS, ct_quantization_config, register_ct_compressor
from dsconvert.formats.int_format import IntFormat, TensorPlan, _require, by_suffix, join_name
from dsconvert.quant.pack import pack_int32_rows_lsb, unpack_int32_rows_lsb
from dsconvert.quant.rtn import COMPRESSED_TENSORS, QTensor, QuantSpec, dequantize

__all__ = ["CompressedTensorsFormat"]


_WEIGHT = ("weight_packed", "weight_scale", "weight_shape")
_ZP = "weight_zero_point"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class CompressedTensorsFormat(IntFormat):
    """``pack-quantized`` writer/reader; registered as the format ``compressed-tensors`` by
    :mod:`dsconvert.formats.compressed_tensors`.

    Args:
        scale_dtype: ``weight_scale`` dtype = the model dtype (bf16 for DeepSeek-V3; fp16 allowed).
    """

    compression_format = "pack-quantized"

    def __init__(self, scale_dtype: torch.dtype = torch.bfloat16):
        if scale_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"compressed-tensors scale dtype must be bfloat16 or float16, got {scale_dtype}")
        self.scale_dtype = scale_dtype
        self.convention = COMPRESSED_TENSORS.with_scale_dtype(scale_dtype)

    def supports(self, spec: QuantSpec) -> bool:
        return True  # any QuantSpec (int4/int8, sym/asym, group/channel)

    # --- the scheme contract: one codec per compression format ------------------------------
    @classmethod
    def accepts(cls, scheme) -> bool:
        """``pack-quantized`` stores integer weight-only schemes (W4A16, W4A16_ASYM, W8A16)."""
        return scheme.weights.type == "int" and scheme.input_activations is None

    @staticmethod
    def codecs() -> list[tuple[str, type]]:
        """Every registered compression format and its codec class, in registration order (all of them once
        :mod:`dsconvert.formats.compressed_tensors` is imported)."""
        return CT_COMPRESSORS.items()

    def check_scheme(self, scheme, module: str | None = None) -> None:
        """Accept a scheme some registered compression format stores.

        Raises:
            UsageError: none does; names the scheme, the module and what each compression format stores.
        """
        if not any(c.accepts(scheme) for _, c in self.codecs()):
            where = f" for module {module}" if module else ""
            raise UsageError(f"format compressed-tensors cannot store scheme {scheme.name}{where}",
                             hint="compressed-tensors here stores " + "; ".join(
                                 f"{n}: {(c.__doc__ or '').strip().splitlines()[0]}" for n, c in self.codecs()))

    def bind(self, scheme, module: str | None = None) -> "CompressedTensorsFormat":
        """The codec (an instance with this scale dtype) of the first compression format accepting ``scheme``.

        Raises:
            UsageError: as :meth:`check_scheme`.
        """
        self.check_scheme(scheme, module)
        cls = next(c for _, c in self.codecs() if c.accepts(scheme))
        codec = cls(self.scale_dtype)
        codec.check_codec(scheme, module)
        return codec

    def check_codec(self, scheme, module: str | None = None) -> None:
        """Codec-specific refusals beyond :meth:`accepts` (none for pack-quantized)."""
        self.supports(scheme.spec)

    def from_config(self, quantization_config: dict) -> "CompressedTensorsFormat":
        """The codec of the config's compression format.

        Raises:
            UnsupportedError: not a single registered compression format.
        """
        fmts = self._config_formats(quantization_config)
        if len(fmts) != 1 or next(iter(fmts)) not in CT_COMPRESSORS:
            raise UnsupportedError(f"compressed-tensors format(s) {sorted(map(str, fmts))} are not one that "
                                   f"dsconvert reads ({', '.join(n for n, _ in self.codecs())})")
        return CT_COMPRESSORS.get(next(iter(fmts)))(self.scale_dtype)

    def scheme_from_config(self, quantization_config: dict):
        """The :class:`~dsconvert.quant.schemes.SchemeDescription` of the config's single group (weights and
        input activations as declared); named after the matching registered scheme.

        Raises:
            UnsupportedError: not exactly one config group, or no weights in it.
        """
        from dsconvert.quant.schemes import ActivationArgs, SchemeDescription, WeightArgs, match_scheme_name

        groups = (quantization_config or {}).get("config_groups") or {}
        if len(groups) != 1:
            raise UnsupportedError(f"expected one compressed-tensors config group, found {len(groups)}")
        (gname, g), = groups.items()
        w, a = (g or {}).get("weights"), (g or {}).get("input_activations")
        if not w:
            raise UnsupportedError(f"config group {gname!r} has no weights args")
        strategy = w.get("strategy") or ("channel" if w.get("group_size") in (None, -1) else "group")
        block = tuple(int(b) for b in w["block_structure"]) if w.get("block_structure") else None
        wa = WeightArgs(type=w.get("type", "int"), bits=int(w["num_bits"]), strategy=strategy,
                        symmetric=bool(w.get("symmetric", True)),
                        group_size=int(w["group_size"]) if strategy == "group" and w.get("group_size") else None,
                        block=block)
        aa = None if not a else ActivationArgs(type=a.get("type", "int"), bits=int(a["num_bits"]),
                                               strategy=a.get("strategy") or "token",
                                               dynamic=bool(a.get("dynamic", False)),
                                               symmetric=bool(a.get("symmetric", True)),
                                               group_size=int(a["group_size"]) if a.get("group_size") else None)
        return SchemeDescription(match_scheme_name(wa, aa) or self.compression_format, wa, aa)

    @staticmethod
    def _config_formats(quantization_config: dict) -> set:
        qc = quantization_config or {}
        groups = qc.get("config_groups") or {}
        return {(g or {}).get("format") or qc.get("format") for g in groups.values()} or {qc.get("format")}

    def tensor_names(self, prefix: str, spec: QuantSpec | None = None) -> list[str]:
        suffixes = list(_WEIGHT)
        if spec is None or not spec.symmetric:
            suffixes.append(_ZP)
        return [join_name(prefix, s) for s in suffixes]

    def plan(self, prefix: str, shape: tuple[int, int], spec: QuantSpec) -> list[TensorPlan]:
        n, k = self._check_2d(shape, prefix)
        groups = spec.num_groups(k, prefix or None)
        out = [
            TensorPlan(join_name(prefix, "weight_packed"), torch.int32, (n, _ceil_div(k * spec.bits, 32))),
            TensorPlan(join_name(prefix, "weight_scale"), self.scale_dtype, (n, groups)),
            TensorPlan(join_name(prefix, "weight_shape"), torch.int64, (2,)),
        ]
        if not spec.symmetric:
            out.append(TensorPlan(join_name(prefix, _ZP), torch.int32, (_ceil_div(n * spec.bits, 32), groups)))
        return out

    def encode_qtensor(self, prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
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
        qt = self.to_qtensor(tensors, spec_or_config)
        return dequantize(qt, out_dtype=qt.convention.scale_dtype).to(torch.float32)

    # --- metadata ---------------------------------------------------------------------------
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

    def group_args(self, spec) -> tuple[dict, dict | None]:
        """``(weights, input_activations)`` QuantizationArgs dicts of a config group for ``spec``."""
        return self.weights_args(spec), None

    def quantization_config(self, spec: QuantSpec, ignore: Iterable[str] = ()) -> dict:
        """``quantization_config`` exactly as llm-compressor + compressed-tensors 0.20.1 write it.

        ``ignore`` entries are exact module names or ``re:`` regexes, written as given (sorted order
        is the caller's choice). Keys and nesting match ``ModelCompressor.update_config``.
        """
        weights, acts = self.group_args(spec)
        group = {"format": self.compression_format, "input_activations": acts, "output_activations": None,
                 "targets": ["Linear"], "weights": weights}
        return ct_quantization_config({"group_0": group}, self.compression_format, ignore)

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        qc = quantization_config or {}
        if qc.get("quant_method") != "compressed-tensors":
            return False
        fmts = cls._config_formats(qc)
        return len(fmts) == 1 and isinstance(next(iter(fmts)), str) and next(iter(fmts)) in CT_COMPRESSORS

    def spec_from_config(self, quantization_config: dict) -> QuantSpec:
        qc = quantization_config
        if not self.detect(qc) or self._config_formats(qc) != {self.compression_format}:
            raise UnsupportedError(f"quantization_config is not compressed-tensors {self.compression_format}")
        groups = qc.get("config_groups") or {}
        specs = set()
        for name, g in groups.items():
            w = (g or {}).get("weights") or {}
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


register_ct_compressor("pack-quantized")(CompressedTensorsFormat)
