"""Reading compressed-tensors checkpoints whose modules differ by config group (FP4, mixed recipes).

Which group a module belongs to follows vLLM's ``find_matched_target``: a module listed in ``ignore`` (exact
name or ``re:`` regex) has none; otherwise an exact-name or ``re:`` target wins over the class target
``Linear`` (every module this reader serves is a Linear). Each group's ``format`` says how its tensors decode:
``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` through :mod:`dsconvert.formats.ct_fp4`, every other
format through its registered compressed-tensors codec (pack-, int-, float-quantized).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from dsconvert.errors import UnsupportedError
from dsconvert.formats.ct_fp4 import fp4_layout_from_group

__all__ = ["CompressedTensorsGroupsReader", "match_target", "group_of"]

_FP4_FORMATS = {"nvfp4-pack-quantized", "mxfp4-pack-quantized"}
# the first is the marker every quantized module has (QuantizedReader finds modules by it)
_SUFFIXES = ["weight_scale", "weight_packed", "weight_shape", "weight_zero_point", "weight_global_scale",
             "input_global_scale", "weight"]


def match_target(target: str, module: str) -> bool:
    """``re:REGEX`` matches from the start of the name (``re.match``); anything else must equal it."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def group_of(qc: dict, module: str) -> dict | None:
    """The config group dict serving ``module`` (a Linear), or None if it is ignored or targeted by no group."""
    if any(match_target(p, module) for p in qc.get("ignore") or []):
        return None
    groups = qc.get("config_groups") or {}
    for g in groups.values():
        if any(t != "Linear" and match_target(t, module) for t in g.get("targets") or []):
            return g
    for g in groups.values():
        if "Linear" in (g.get("targets") or []):
            return g
    return None


class CompressedTensorsGroupsReader:
    """Decoder for compressed-tensors checkpoints with FP4 groups or several formats (``mixed-precision``).

    The single-format ``pack-quantized`` case stays with the registered compressed-tensors format.
    """

    name = "compressed-tensors"

    def __init__(self, qc: dict | None = None):
        self.qc = qc or {}

    def from_config(self, qc: dict) -> "CompressedTensorsGroupsReader":
        """A reader bound to ``qc`` (modules find their group in it)."""
        return CompressedTensorsGroupsReader(qc)

    @property
    def marker_suffix(self) -> str:
        return _SUFFIXES[0]

    @classmethod
    def detect(cls, qc: dict) -> bool:
        qc = qc or {}
        if qc.get("quant_method") != "compressed-tensors":
            return False
        from dsconvert.formats.compressed_tensors import CT_COMPRESSORS, CompressedTensorsFormat

        CompressedTensorsFormat.codecs()  # registers the compression formats
        fmts = {(g or {}).get("format") or qc.get("format") for g in (qc.get("config_groups") or {}).values()}
        known = _FP4_FORMATS | set(CT_COMPRESSORS.names())
        return bool(fmts) and fmts <= known and (len(fmts) > 1 or bool(fmts & _FP4_FORMATS))

    def spec_from_config(self, qc: dict) -> None:
        """Modules differ: there is no single spec (see :meth:`decode`)."""
        if not self.detect(qc):
            raise UnsupportedError("quantization_config is not a compressed-tensors FP4 / mixed-precision config")
        return None

    def tensor_names(self, prefix: str, spec=None) -> list[str]:
        return [f"{prefix}.{s}" if prefix else s for s in _SUFFIXES]

    def decode(self, tensors: Mapping[str, torch.Tensor], qc: dict | None = None) -> torch.Tensor:
        """float32 ``[M, N]`` weight of one module as the loader computes it (bf16 values, widened); ``qc``
        defaults to the config this reader is bound to.

        Raises:
            UnsupportedError: the module has no config group, or its group's format is not read here.
        """
        qc = qc if isinstance(qc, dict) else self.qc
        names = list(tensors)
        module = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        g = group_of(qc, module)
        if g is None:
            raise UnsupportedError(f"module {module!r} has quantized tensors but no config group targets it")
        layout = fp4_layout_from_group(g)
        if layout is not None:
            return layout.decode(tensors, torch.bfloat16).to(torch.float32)
        # any other group: the registered compressed-tensors codec of its format, on a one-group config
        from dsconvert.formats.compressed_tensors import CT_COMPRESSORS

        fmt = g.get("format") or qc.get("format")
        if fmt not in CT_COMPRESSORS:
            raise UnsupportedError(f"module {module!r}: config group format {fmt!r} is not read here")
        sub = {**qc, "config_groups": {"group_0": g}, "format": fmt}
        t = {k: v for k, v in tensors.items() if not k.endswith(".input_global_scale")}
        return CT_COMPRESSORS.get(fmt)().decode(t, sub)
