"""``dsconvert inspect``: what a checkpoint holds and what converting it will cost, from headers only."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DsconvertError
from ..formats.checkpoint import scan
from ..formats.hf_config import FAMILIES, version_label
from ..report import base_report
from ..units import bytes_fields
from . import fp8_to_bf16

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def inspect_checkpoint(src: Path) -> dict:
    """Describe ``src`` as a JSON-able dict. Never raises for problems in the checkpoint: they are listed."""
    ck = scan(src)
    rep = base_report("inspect")
    by_dtype: dict[str, dict] = {}
    params = 0
    layers = set()
    for name, (_, e) in ck.tensors.items():
        d = by_dtype.setdefault(e.dtype, {"tensors": 0, "bytes": 0, "elements": 0})
        d["tensors"] += 1
        d["bytes"] += e.nbytes
        d["elements"] += e.numel
        if not ck.is_scale(name):
            params += e.numel
        m = _LAYER.match(name)
        if m:
            layers.add(int(m.group(1)))
    fp8_weights = [n for n, (_, e) in ck.tensors.items() if e.dtype == "F8_E4M3"]
    paired = [n for n in fp8_weights if ck.scale_of(n) in ck.tensors]
    cross = [n for n in paired if ck.tensors[n][0] != ck.tensors[ck.scale_of(n)][0]]
    mtp = [n for n in ck.tensors if ck.is_mtp(n)]
    indexer = [n for n in ck.tensors if ".indexer." in n]
    problems = [p.to_dict() for p in ck.problems]
    if not fp8_weights and ck.fp8 is not None:
        problems.append({"kind": "stale_quantization_config", "fatal": False, "file": "config.json",
                         "message": "config.json declares quantization_config fp8 but no tensor is F8_E4M3",
                         "hint": "loaders will fail with 'Unknown quantization type'; remove quantization_config"})
    total = sum(d["bytes"] for d in by_dtype.values())
    rep.update({
        "path": str(src),
        "model_type": ck.config.get("model_type"),
        "family": version_label(ck.config) if ck.config.get("model_type") in FAMILIES else None,
        "supported": ck.config.get("model_type") in FAMILIES,
        "format": "fp8-block" if fp8_weights else "unquantized",
        "fp8": None if ck.fp8 is None else {"block": list(ck.fp8.block), "scale_fmt": ck.fp8.scale_fmt,
                                            "activation_scheme": ck.fp8.activation_scheme},
        "layers": {"num_hidden_layers": ck.num_hidden_layers,
                   "mtp_layers": sorted(i for i in layers if i >= ck.num_hidden_layers),
                   "mtp_tensors": len(mtp), "v32_indexer_tensors": len(indexer)},
        "shards": len(ck.shards),
        "tensors": len(ck.tensors),
        "parameters": params,
        "bytes": bytes_fields(total),
        "by_dtype": {k: {**v, **bytes_fields(v["bytes"])} for k, v in sorted(by_dtype.items())},
        "fp8_pairs": {"weights": len(fp8_weights), "with_scale": len(paired), "scale_in_other_shard": len(cross)},
        "problems": problems,
        "ok": not any(p.get("fatal", True) for p in problems),
    })
    if fp8_weights and not ck.fatal_problems():
        try:
            plan = fp8_to_bf16.make_plan(ck, fp8_to_bf16.Options())
            rep["fp8_to_bf16"] = {k: plan.summary()[k] for k in ("bytes_read", "bytes_written",
                                                                  "peak_memory_estimate",
                                                                  "time_estimate_s_at_0_5_gb_s")}
            rep["fp8_to_bf16"]["output_tensors"] = sum(len(s.tensors) for s in plan.shards)
        except DsconvertError as e:
            rep["fp8_to_bf16"] = {"error": e.message}
    return rep


def human_lines(rep: dict) -> list[str]:
    """The human-readable rendering of an inspect report (rich markup)."""
    def gb(b):
        return f"{b['gb']:.3f} GB ({b['gib']:.3f} GiB)"

    lines = [f"[bold]{rep['path']}[/bold]",
             f"  model        {rep['family'] or rep['model_type']}  (model_type {rep['model_type']}, {rep['format']})",
             f"  layers       {rep['layers']['num_hidden_layers']} + MTP {rep['layers']['mtp_layers'] or 'none'}",
             f"  shards       {rep['shards']}   tensors {rep['tensors']:,}   parameters {rep['parameters']:,}",
             f"  bytes        {gb(rep['bytes'])}"]
    for k, v in rep["by_dtype"].items():
        lines.append(f"    {k:8s} {v['tensors']:>7,} tensors  {gb(v)}")
    fp = rep["fp8_pairs"]
    if fp["weights"]:
        lines.append(f"  fp8          {fp['weights']:,} weights, {fp['with_scale']:,} with weight_scale_inv "
                     f"({fp['scale_in_other_shard']} in another shard), block {rep['fp8']['block']}, "
                     f"scale_fmt {rep['fp8']['scale_fmt']}")
    if "fp8_to_bf16" in rep and "error" not in rep["fp8_to_bf16"]:
        p = rep["fp8_to_bf16"]
        lines.append(f"  fp8-to-bf16  reads {gb(p['bytes_read'])}, writes {gb(p['bytes_written'])}, "
                     f"peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB")
    if rep["problems"]:
        lines.append(f"  [red]problems ({len(rep['problems'])})[/red]")
        for p in rep["problems"][:50]:
            tag = "error" if p.get("fatal", True) else "warning"
            lines.append(f"    {tag}: {p.get('file', '') + ': ' if p.get('file') else ''}{p['message']}")
        if len(rep["problems"]) > 50:
            lines.append(f"    ... {len(rep['problems']) - 50} more (see --json)")
    else:
        lines.append("  [green]no problems found[/green]")
    return lines



def registries(schemes: bool, formats: bool, types: bool) -> dict:
    """Names (with aliases) the writers accept: quantize schemes and formats, GGUF types."""
    out = {}
    if schemes:
        from ..quant.schemes import registered_schemes
        out["schemes"] = registered_schemes()
    if formats:
        from ..formats.registry import registered_formats
        out["formats"] = registered_formats()
    if types:
        from ..quant.ggml_quants import registered_types
        out["gguf_types"] = registered_types()
    return out
