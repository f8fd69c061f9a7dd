"""compressed-tensors ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized`` modules (docs/int-formats.md §12).

Per module (M = out_features, N = in_features):

=========================  ==========  ===========  ==================================================
tensor                     dtype       shape        content
=========================  ==========  ===========  ==================================================
``weight_packed``          U8          [M, N/2]     e2m1 codes, column 2j low nibble, 2j+1 high nibble
``weight_scale``           F8_E4M3     [M, N/16]    NVFP4: e4m3 group scale
``weight_scale``           U8          [M, N/32]    MXFP4: e8m0 exponent (bias 127)
``weight_global_scale``    F32         [1]          NVFP4 only
``input_global_scale``     F32         [1]          NVFP4 W4A4 only: 448 * 6 / calibration absmax of the input
=========================  ==========  ===========  ==================================================

The math is :mod:`dsconvert.quant.fp4`; this module only names, plans and describes. The config-group dicts
are what compressed-tensors 0.20.1 serialises for its ``NVFP4``, ``NVFP4A16``, ``MXFP4`` and ``MXFP4A16``
presets (``quantization/quant_scheme.py``), checked against ``ModelCompressor.update_config`` in
tests/convert/test_quantize_fp4.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from dsconvert.errors import BadInputError, ShapeError
from dsconvert.formats.int_format import TensorPlan, by_suffix, join_name
from dsconvert.quant import fp4

__all__ = ["FP4Layout", "FP4_LAYOUTS", "fp4_layout_from_group"]

_FP8_NAME = "torch.float8_e4m3fn"
_U8_NAME = "torch.uint8"


@dataclass(frozen=True)
class FP4Layout:
    """One FP4 scheme's on-disk module layout and config group.

    Attributes:
        scheme: compressed-tensors preset name (``NVFP4``, ``NVFP4A16``, ``MXFP4``, ``MXFP4A16``).
        kind: ``"nvfp4"`` or ``"mxfp4"``.
        activations: the preset also quantizes input activations (W4A4).
    """

    scheme: str
    kind: str
    activations: bool

    @property
    def group_size(self) -> int:
        return fp4.NVFP4_GROUP if self.kind == "nvfp4" else fp4.MXFP4_GROUP

    @property
    def format(self) -> str:
        return f"{self.kind}-pack-quantized"

    @property
    def static_input_scale(self) -> bool:
        """NVFP4 W4A4 stores a calibrated ``input_global_scale`` per module (local scales stay dynamic)."""
        return self.kind == "nvfp4" and self.activations

    def bits_per_weight(self) -> float:
        return 4 + 8 / self.group_size

    # --- names and plan -------------------------------------------------------------------------
    def suffixes(self) -> list[str]:
        s = ["weight_packed", "weight_scale"]
        if self.kind == "nvfp4":
            s.append("weight_global_scale")
        if self.static_input_scale:
            s.append("input_global_scale")
        return s

    def plan(self, prefix: str, shape: tuple[int, ...]) -> list[TensorPlan]:
        """``[(name, dtype, shape)]`` for a ``[M, N]`` weight.

        Raises:
            ShapeError: not 2-D, or N not a multiple of the group size (16 or 32), naming the module.
        """
        if len(shape) != 2:
            raise ShapeError(f"tensor {prefix!r}: {self.scheme} needs a 2-D [out, in] weight, got {tuple(shape)}")
        m, n = int(shape[0]), int(shape[1])
        g = self.group_size
        if n % g:
            raise ShapeError(f"{self.scheme} needs in_features divisible by {g}, but module {prefix!r} has "
                             f"N={n} (N % {g} = {n % g})",
                             hint="--ignore this module or give it an integer scheme with --scheme-for")
        out = [TensorPlan(join_name(prefix, "weight_packed"), torch.uint8, (m, n // 2)),
               TensorPlan(join_name(prefix, "weight_scale"),
                          torch.float8_e4m3fn if self.kind == "nvfp4" else torch.uint8, (m, n // g))]
        if self.kind == "nvfp4":
            out.append(TensorPlan(join_name(prefix, "weight_global_scale"), torch.float32, (1,)))
        if self.static_input_scale:
            out.append(TensorPlan(join_name(prefix, "input_global_scale"), torch.float32, (1,)))
        return out

    # --- encode / decode ------------------------------------------------------------------------
    def encode(self, prefix: str, w: torch.Tensor, global_amax: torch.Tensor | None = None,
               input_absmax: float | None = None) -> dict[str, torch.Tensor]:
        """Quantize and name one module's tensors, in :meth:`plan` order.

        Args:
            w: ``[M, N]`` weight in the dtype the scales are computed in (bf16 for DeepSeek).
            global_amax: NVFP4: absmax of the module's fused group (None: its own).
            input_absmax: NVFP4 W4A4: absmax of the module's calibration inputs (0 or None: global scale 1.0,
                compressed-tensors' value for an input it never saw).
        """
        if self.kind == "nvfp4":
            t = fp4.nvfp4_quantize(w, global_amax=global_amax, name=prefix)
        else:
            t = fp4.mxfp4_quantize(w, name=prefix)
        out = {join_name(prefix, "weight_packed"): t.packed, join_name(prefix, "weight_scale"): t.scale}
        if self.kind == "nvfp4":
            out[join_name(prefix, "weight_global_scale")] = t.global_scale
        if self.static_input_scale:
            out[join_name(prefix, "input_global_scale")] = fp4.nvfp4_global_scale(
                torch.tensor(float(input_absmax or 0.0), dtype=w.dtype))
        return out

    def to_fp4(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> fp4.FP4Tensor:
        t = by_suffix(tensors)
        missing = [s for s in self.suffixes() if s not in t and s != "input_global_scale"]
        if missing:
            raise BadInputError(f"{self.format} module is missing tensor(s) {missing}; has {sorted(t)}",
                                hint="check that every partner tensor of the module was read")
        return fp4.FP4Tensor(t["weight_packed"], t["weight_scale"], t.get("weight_global_scale"), dtype)

    def decode(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The loader's weight ``[M, N]`` (``dtype``, bf16 by default) from one module's stored tensors."""
        t = self.to_fp4(tensors, dtype)
        return fp4.nvfp4_dequantize(t, dtype) if self.kind == "nvfp4" else fp4.mxfp4_dequantize(t, dtype)

    # --- metadata -------------------------------------------------------------------------------
    def weights_args(self) -> dict:
        """The ``weights`` QuantizationArgs as compressed-tensors serialises the preset (unset keys omitted)."""
        if self.kind == "nvfp4":
            return {"dynamic": False, "group_size": 16, "num_bits": 4, "scale_dtype": _FP8_NAME,
                    "strategy": "tensor_group", "symmetric": True, "type": "float"}
        return {"dynamic": False, "group_size": 32, "num_bits": 4, "scale_dtype": _U8_NAME,
                "strategy": "group", "symmetric": True, "type": "float"}

    def input_args(self) -> dict | None:
        if not self.activations:
            return None
        if self.kind == "nvfp4":
            return {"dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "static_minmax",
                    "scale_dtype": _FP8_NAME, "strategy": "tensor_group", "symmetric": True, "type": "float"}
        return {"dynamic": True, "group_size": 32, "num_bits": 4, "scale_dtype": _U8_NAME,
                "strategy": "group", "symmetric": True, "type": "float"}

    def config_group(self, targets: list[str]) -> dict:
        return {"format": self.format, "input_activations": self.input_args(), "output_activations": None,
                "targets": list(targets), "weights": self.weights_args()}


FP4_LAYOUTS: dict[str, FP4Layout] = {
    "NVFP4": FP4Layout("NVFP4", "nvfp4", True),
    "NVFP4A16": FP4Layout("NVFP4A16", "nvfp4", False),
    "MXFP4": FP4Layout("MXFP4", "mxfp4", True),
    "MXFP4A16": FP4Layout("MXFP4A16", "mxfp4", False),
}


def fp4_layout_from_group(group: dict) -> FP4Layout | None:
    """The :class:`FP4Layout` a ``config_groups`` entry describes, or None if it is not FP4.

    Raises:
        BadInputError: a float 4-bit group with an FP4 format this reader does not know (group size, strategy).
    """
    w = (group or {}).get("weights") or {}
    if w.get("type") != "float" or int(w.get("num_bits") or 0) != 4:
        return None
    kind = {16: "nvfp4", 32: "mxfp4"}.get(int(w.get("group_size") or 0))
    if kind is None:
        raise BadInputError(f"FP4 config group with group_size {w.get('group_size')!r} is not NVFP4 (16) or MXFP4 (32)")
    return FP4Layout(kind.upper() + ("" if group.get("input_activations") else "A16"), kind,
                     group.get("input_activations") is not None)
