"""Reading compressed-tensors checkpoints whose modules differ by config group (FP4, mixed recipes).

Which group a module belongs to follows vLLM's ``find_matched_target``: a module listed in ``ignore`` (exact
name or ``re:`` regex) has none; otherwise an exact-name or ``re:`` target wins over the class target
``Linear`` (every module this reader serves is a Linear). Each group's ``format`` says how its tensors decode:
``pack-quantized`` through :class:`~dsconvert.formats.compressed_tensors.CompressedTensorsFormat`,
``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` through :mod:`dsconvert.formats.ct_fp4`.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from dsconvert.errors import UnsupportedError
from dsconvert.formats.ct_fp4 import fp4_layout_from_group
from dsconvert.formats.int_format import by_suffix
from dsconvert.quant.rtn import QuantSpec

__all__ = ["CompressedTensorsGroupsReader", "match_target", "group_of"]

_FORMATS = {"pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized"}
_SUFFIXES = ["weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_global_scale",
             "input_global_scale"]


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

    @classmethod
    def detect(cls, qc: dict) -> bool:
        qc = qc or {}
        if qc.get("quant_method") != "compressed-tensors":
            return False
        fmts = {(g or {}).get("format") or qc.get("format") for g in (qc.get("config_groups") or {}).values()}
        return bool(fmts) and fmts <= _FORMATS and fmts != {"pack-quantized"}

    def spec_from_config(self, qc: dict) -> None:
        """Modules differ: there is no single spec (see :meth:`decode`)."""
        if not self.detect(qc):
            raise UnsupportedError("quantization_config is not a compressed-tensors FP4 / mixed-precision config")
        return None

    def tensor_names(self, prefix: str, spec=None) -> list[str]:
        return [f"{prefix}.{s}" if prefix else s for s in _SUFFIXES]

    def decode(self, tensors: Mapping[str, torch.Tensor], qc: dict) -> torch.Tensor:
        """float32 ``[M, N]`` weight of one module as the loader computes it (bf16 values, widened).

        Raises:
            UnsupportedError: the module has no config group, or its group's format is not read here.
        """
        names = list(tensors)
        module = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        g = group_of(qc, module)
        if g is None:
            raise UnsupportedError(f"module {module!r} has quantized tensors but no config group targets it")
        layout = fp4_layout_from_group(g)
        if layout is not None:
            return layout.decode(tensors, torch.bfloat16).to(torch.float32)
        if (g.get("format") or qc.get("format")) != "pack-quantized":
            raise UnsupportedError(f"module {module!r}: config group format {g.get('format')!r} is not read here")
        from dsconvert.formats.compressed_tensors import CompressedTensorsFormat

        w = g.get("weights") or {}
        gs = -1 if w.get("strategy") == "channel" else int(w["group_size"])
        spec = QuantSpec(bits=int(w["num_bits"]), group_size=gs, symmetric=bool(w.get("symmetric", True)))
        t = by_suffix(tensors)
        t.pop("input_global_scale", None)
        return CompressedTensorsFormat().decode(t, spec)
