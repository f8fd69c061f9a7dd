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
        from dsconvert.formats.compressed_tensors import CT_COMPRESSORS  # registers the compression formats

        fmts = {(g or {}).get("format") or qc.get("format") for g in (qc.get("config_groups") or {}).values()}
        known = _FP4_FORMATS | set(CT_COMPRESSORS.names())
        return bool(fmts) and fmts <= known and (len(fmts) > 1 or bool(fmts & _FP4_FORMATS))

    def spec_from_config(self, qc: dict) -> None:
        """Modules differ: there is no single spec (see :meth:`decode`)."""
        if not self.detect(qc):
            raise UnsupportedError("quantization_config is not a compressed-tensors FP4 / mixed-precision config")
        return None

    def scheme_from_config(self, qc: dict) -> None:
        """Modules differ: no single SchemeDescription (each config group carries its own args)."""
        return self.spec_from_config(qc)

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

    def inspect_summary(self, ck) -> tuple[dict, list[dict], int, set[str]]:
        """For ``inspect``, from headers (plus the tiny ``weight_shape`` tensors): per config group its format,
        modules, logical weights, bytes and bits per weight; the totals; and fused groups split across groups.

        Returns ``(summary, problems, logical parameters of the quantized modules, their tensor names)``.
        """
        from dsconvert.formats import deepseek_v3, deepseek_v4

        def fused_group(weight_name: str) -> str | None:
            return deepseek_v3.fused_group(weight_name) or deepseek_v4.fused_group(weight_name)

        qc = self.qc
        names = {n: e for n, (_, e) in ck.tensors.items()}
        mods = sorted({n.rsplit(".", 1)[0] for n in names if n.endswith("." + _SUFFIXES[0])})
        per: dict[str, dict] = {}
        key_of: dict[str, str] = {}
        qnames: set[str] = set()
        total_p = total_b = 0
        for m in mods:
            g = group_of(qc, m)
            gk = next((k for k, v in (qc.get("config_groups") or {}).items() if v is g), None)
            if gk is None:
                continue
            own = [n for n in names if n.rsplit(".", 1)[0] == m and n.rsplit(".", 1)[1] in _SUFFIXES]
            packed = names.get(m + ".weight_packed")
            if packed is not None and packed.dtype == "U8":
                params = packed.shape[0] * packed.shape[1] * 2
            elif packed is not None and m + ".weight_shape" in names:
                params = int(torch.prod(ck.read(m + ".weight_shape")).item())
            elif m + ".weight" in names:
                params = names[m + ".weight"].numel
            else:
                continue
            b = sum(names[n].nbytes for n in own)
            d = per.setdefault(gk, {"group": gk, "format": g.get("format") or qc.get("format"),
                                    "targets": g.get("targets"), "weights": g.get("weights"),
                                    "input_activations": g.get("input_activations"), "modules": 0,
                                    "parameters": 0, "bytes": 0})
            d["modules"] += 1
            d["parameters"] += params
            d["bytes"] += b
            total_p += params
            total_b += b
            qnames.update(own)
            key_of[m] = gk
        for d in per.values():
            d["bits_per_weight"] = round(8 * d["bytes"] / d["parameters"], 4) if d["parameters"] else None
        problems: list[dict] = []
        fused: dict[str, dict[str, list[str]]] = {}
        for n, e in names.items():
            if n.endswith(".weight") or n.endswith("." + _SUFFIXES[0]):
                m = n.rsplit(".", 1)[0]
                fg = fused_group(m + ".weight")
                if fg is not None:
                    fused.setdefault(fg, {}).setdefault(key_of.get(m, "BF16"), [])
                    if m not in fused[fg][key_of.get(m, "BF16")]:
                        fused[fg][key_of.get(m, "BF16")].append(m)
        for fg, by in fused.items():
            if len(by) > 1:
                (k1, m1), (k2, m2) = list(by.items())[:2]
                problems.append({"kind": "fused_group_split", "fatal": True, "file": "",
                                 "message": f"{fg}: {m1[0]} is {k1} but {m2[0]} is {k2}",
                                 "hint": "vLLM and SGLang load these as one fused layer; they must share a scheme"})
        summary = {"format": "compressed-tensors", "compression_format": qc.get("format"),
                   "config_groups": list(per.values()), "quantized_modules": sum(d["modules"] for d in per.values()),
                   "bits_per_weight": round(8 * total_b / total_p, 4) if total_p else None}
        return summary, problems, total_p, qnames
