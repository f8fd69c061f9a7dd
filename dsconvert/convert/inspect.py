"""``dsconvert inspect``: what a checkpoint holds and what converting it will cost, from headers only."""

from __future__ import annotations

from pathlib import Path

from ..errors import DsconvertError
from ..formats.checkpoint import scan
from ..formats.deepseek_v3 import layer_index
from ..formats.kind import checkpoint_kind
from ..formats.hf_config import FAMILIES, version_label
from ..report import base_report
from ..units import bytes_fields, count
from . import fp8_to_bf16



def _module_shape(fmt, spec, prefix: str, heads: dict[str, tuple]) -> tuple[int, int] | None:
    """The logical ``(M, N)`` of a quantized module, found from its stored tensor shapes alone: the candidate
    whose :meth:`plan` reproduces every stored shape (candidates from each packing's first tensor)."""
    names = fmt.tensor_names(prefix, spec)
    first = heads.get(names[0])
    if first is None or len(first) != 2:
        return None
    a, b = first
    bits = spec.bits
    cands = {(a, b * 32 // bits), (b * 8, a), (b, a * 32 // bits), (a, b)}
    for m, n in sorted(cands):
        try:
            plans = fmt.plan(prefix, (m, n), spec)
        except DsconvertError:
            continue
        if all(tuple(heads.get(p.name, ())) == tuple(p.shape) for p in plans):
            return m, n
    return None


def _int_summary(ck, fmt) -> tuple[dict, list[dict], int, set[str]]:
    """Scheme, quantized / kept linears, bits per weight and fused-group problems of a quantized checkpoint
    (integer formats, compressed-tensors int-/float-quantized, DeepSeek FP8). A module is quantized when it has
    the codec's marker tensor (``weight_packed``, ``qweight``, ``weight_scale``, ``weight_scale_inv``).

    Returns ``(summary, problems, logical parameters of the quantized modules, their tensor names)``.
    """
    from .policy import LayerPolicy, fused_group, module_of

    qc = ck.config.get("quantization_config") or {}
    problems: list[dict] = []
    try:
        fmt = fmt.from_config(qc)
        spec = fmt.spec_from_config(qc)
        desc = fmt.scheme_from_config(qc)
    except DsconvertError as e:
        return ({"format": fmt.name, "error": e.message},
                [{"kind": "quantization_config", "fatal": True, "file": "config.json", "message": e.message}], 0,
                set())
    heads = {n: tuple(e.shape) for n, (_, e) in ck.tensors.items()}
    prefixes = sorted({n.rsplit(".", 1)[0] for n in ck.tensors})
    quantized, kept, qnames = [], [], set()
    q_params = q_bytes = 0
    marker = fmt.marker_suffix
    for pre in prefixes:
        w = pre + ".weight"
        if f"{pre}.{marker}" in ck.unreadable:
            continue  # its marker sits in an unreadable shard (that shard's problem says so): precision unknown
        if f"{pre}.{marker}" not in ck.tensors:
            if w in ck.tensors and LayerPolicy.quantizable(w, heads[w]):
                kept.append(pre)
            continue
        shape = _module_shape(fmt, spec, pre, heads)
        if shape is None or not LayerPolicy.quantizable(w, shape):
            continue
        quantized.append(pre)
        for p in fmt.plan(pre, shape, spec):
            qnames.add(p.name)
            q_bytes += ck.tensors[p.name][1].nbytes
        q_params += shape[0] * shape[1]
    groups: dict[str, dict[bool, list[str]]] = {}
    for pre, q in [(p, True) for p in quantized] + [(p, False) for p in kept]:
        g = fused_group(pre + ".weight")
        if g is not None:
            groups.setdefault(g, {True: [], False: []})[q].append(module_of(pre))
    for g, d in groups.items():
        if d[True] and d[False]:
            problems.append({"kind": "fused_group_split", "fatal": True, "file": "",
                             "message": f"{g}: {d[True][0]} is quantized but {d[False][0]} is not "
                                        f"({len(d[True])} quantized, {len(d[False])} kept)",
                             "hint": "vLLM and SGLang load these as one fused layer and refuse mixed precision; "
                                     "quantize all members of the group or none"})
    dd = desc.to_dict()
    summary = {"format": fmt.name, "compression_format": getattr(fmt, "compression_format", None),
               "scheme": desc.name, "weights": dd["weights"], "input_activations": dd["input_activations"],
               "bits": spec.bits, "group_size": getattr(spec, "group_size", None),
               "symmetric": desc.weights.symmetric,
               "quantized_modules": len(quantized), "kept_linear_modules": len(kept),
               "kept_linear_examples": kept[:10],
               "bits_per_weight": round(8 * q_bytes / q_params, 4) if q_params else None}
    return summary, problems, q_params, qnames


def _v4_summary(ck) -> dict:
    """DeepSeek-V4: the layer schedule (attention and MoE kind per layer, MTP included), the FP8 / FP4 byte counts
    (weights and their ``.scale`` tensors) and what each conversion does with them (docs/checkpoint-layout.md §11-13).
    """
    from ..formats import deepseek_v4 as v4

    g = ck.v4
    sched = v4.layer_schedule(g)
    from .policy import LayerPolicy

    quantizable = sum(1 for n in ck.tensors if not ck.is_scale(n) and LayerPolicy.quantizable(n, ck.logical_shape(n)))
    counts = {"fp8": {"weights": 0, "bytes": 0, "scale_bytes": 0, "bf16_bytes": 0},
              "fp4": {"weights": 0, "bytes": 0, "scale_bytes": 0, "bf16_bytes": 0},
              "other": {"tensors": 0, "bytes": 0}}
    for name, (_, e) in ck.tensors.items():
        if ck.is_scale(name):
            continue
        if e.dtype == "F8_E4M3" or ck.is_fp4_weight(name):
            c = counts["fp4" if e.dtype == "I8" else "fp8"]
            c["weights"] += 1
            c["bytes"] += e.nbytes
            sn = ck.scale_of(name)
            c["scale_bytes"] += ck.entry(sn).nbytes if sn in ck.tensors else 0
            c["bf16_bytes"] += 2 * e.numel * (2 if e.dtype == "I8" else 1)
        else:
            counts["other"]["tensors"] += 1
            counts["other"]["bytes"] += e.nbytes

    def tally(key):
        out: dict[str, int] = {}
        for r in sched:
            out[r[key]] = out.get(r[key], 0) + 1
        return out

    return {
        "expert_dtype": g.expert_dtype if g.quantized else None,
        "schedule": sched,
        "attention_kinds": tally("attention"),
        "moe_kinds": tally("moe"),
        "quantized": counts,
        "conversions": {
            "fp8-to-bf16": ("a quantized output: dequantize it with the engine, or convert the release" if ck.quantized
                            else "nothing to dequantize (already unquantized)") if not g.quantized else
                           f"{counts['fp8']['weights']} FP8 and {counts['fp4']['weights']} FP4 weights -> BF16 "
                           f"exactly ({counts['fp8']['scale_bytes'] + counts['fp4']['scale_bytes']:,} scale bytes "
                           f"consumed); {counts['other']['tensors']} other tensors copied byte for byte; release "
                           "names kept",
            "quantize": f"{quantizable} linears (attention, indexer wq_b, shared and routed experts) dequantized "
                        "exactly, then RTN, --gptq or --awq to one --scheme (W4A16, W8A16, ...) in "
                        "compressed-tensors; the rest as fp8-to-bf16 writes it; --gptq/--awq with mixed recipes "
                        "refused (exit 2)"
                        if ck.quantized is False else "already quantized",
            "gguf": "not supported for DeepSeek-V4 yet (exit 3)",
        },
    }


def inspect_checkpoint(src: Path) -> dict:
    """Describe ``src`` as a JSON-able dict. Never raises for problems in the checkpoint: they are listed.

    A ``.gguf`` file (or the first file of a split set) is described by :func:`inspect_gguf`. An INT checkpoint
    (compressed-tensors, AutoAWQ, GPTQ) reports its scheme, the quantized and kept linears, bits per weight and
    counts logical parameters, not packed words.
    """
    if str(src).endswith(".gguf"):
        return inspect_gguf(Path(src))
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
            params += e.numel * (2 if ck.is_fp4_weight(name) else 1)  # FP4: two parameters per byte
        if (i := layer_index(name)) is not None:
            layers.add(i)
    # F8_E4M3 tensors of a compressed-tensors float-quantized checkpoint are not DeepSeek FP8 weights
    fp8_weights = [] if ck.quantized else [n for n, (_, e) in ck.tensors.items()
                                           if e.dtype == "F8_E4M3" or ck.is_fp4_weight(n)]
    paired = [n for n in fp8_weights if ck.scale_of(n) in ck.tensors]
    cross = [n for n in paired if ck.tensors[n][0] != ck.tensors[ck.scale_of(n)][0]]
    mtp = [n for n in ck.tensors if ck.is_mtp(n)]
    indexer = [n for n in ck.tensors if ".indexer." in n]
    problems = [p.to_dict() for p in ck.problems]
    kind = checkpoint_kind(ck.root)
    from ..formats.tokenizer_check import tokenizer_problems

    for p in tokenizer_problems(ck.root, ck.config):  # a swapped tokenizer is an error here; a missing one is not
        p.fatal = p.kind != "tokenizer_missing"
        problems.append(p.to_dict())
    qc = ck.config.get("quantization_config") or {}
    fmt = None
    if qc:
        from ..formats.registry import detect_format
        fmt = detect_format(qc)
    int_info = None
    if fmt is not None and hasattr(fmt, "inspect_summary"):  # per-config-group checkpoints (FP4, mixed recipes)
        int_info, int_problems, q_params, q_names = fmt.from_config(qc).inspect_summary(ck)
        problems += int_problems
        params = q_params + sum(e.numel for n, (_, e) in ck.tensors.items() if n not in q_names and not ck.is_scale(n))
    # a BF16 directory whose config still claims fp8 is reported below (stale_quantization_config), not as FP8_BLOCK
    elif fmt is not None and hasattr(fmt, "spec_from_config") and (ck.fp8 is None or fp8_weights) \
            and (ck.v4 is None or ck.quantized):
        int_info, int_problems, q_params, q_names = _int_summary(ck, fmt)
        problems += int_problems
        params = q_params + sum(e.numel for n, (_, e) in ck.tensors.items() if n not in q_names and not ck.is_scale(n))
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
        "format": "fp8-block" if fp8_weights else (int_info["format"] if int_info else "unquantized"),
        "kind": kind.to_dict(),
        "quantization": int_info,
        "fp8": None if ck.fp8 is None else {"block": list(ck.fp8.block), "scale_fmt": ck.fp8.scale_fmt,
                                            "activation_scheme": ck.fp8.activation_scheme},
        "layers": {"num_hidden_layers": ck.num_hidden_layers,
                   "mtp_layers": sorted(i for i in layers if i >= ck.num_hidden_layers) if ck.v4 is None else
                   [ck.num_hidden_layers + j for j in range(ck.v4.mtp)],
                   "mtp_tensors": len(mtp), "v32_indexer_tensors": len(indexer)},
        "shards": len(ck.shards),
        "tensors": len(ck.tensors),
        # the index's tensors in shards whose header cannot be read: not counted above, never silently dropped
        "tensors_unreadable": len(ck.unreadable),
        "parameters": params,
        "bytes": bytes_fields(total),
        "by_dtype": {k: {**v, **bytes_fields(v["bytes"])} for k, v in sorted(by_dtype.items())},
        "fp8_pairs": {"weights": len(fp8_weights), "with_scale": len(paired), "scale_in_other_shard": len(cross)},
        "problems": problems,
        "ok": not any(p.get("fatal", True) for p in problems),
    })
    if ck.v4 is not None:
        rep["format"] = "deepseek-v4-fp8-fp4" if fp8_weights else (int_info["format"] if int_info else "unquantized")
        rep["deepseek_v4"] = _v4_summary(ck)
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
    if rep.get("format") == "gguf":
        return _gguf_lines(rep)
    def gb(b):
        return f"{b['gb']:.3f} GB ({b['gib']:.3f} GiB)"

    lines = [f"[bold]{rep['path']}[/bold]",
             f"  model        {rep['family'] or rep['model_type']}  (model_type {rep['model_type']}, {rep['format']})",
             f"  layers       {rep['layers']['num_hidden_layers']} + MTP "
             f"{', '.join(f'layer {i}' for i in rep['layers']['mtp_layers']) or 'none'}",
             f"  shards       {rep['shards']}   tensors {rep['tensors']:,}"
             + (f" (+{rep['tensors_unreadable']:,} in unreadable shards, per the index)"
                if rep.get("tensors_unreadable") else "") + f"   parameters {rep['parameters']:,}",
             f"  bytes        {gb(rep['bytes'])}"]
    for k, v in rep["by_dtype"].items():
        lines.append(f"    {k:8s} {v['tensors']:>7,} tensors  {gb(v)}")
    q = rep.get("quantization")
    if q and "bits" in q:
        w, a = q["weights"], q["input_activations"]
        sym = "symmetric" if q["symmetric"] else "asymmetric"
        if w["strategy"] == "block":
            g = f"block {w['block'][0]}x{w['block'][1]}" + (" ue8m0 scales" if w["scale_rule"] == "pow2" else "")
        else:
            g = "per channel" if q["group_size"] == -1 else f"group_size {q['group_size']}"
        acts = "" if not a else f"; activations {a['type']}{a['bits']} {'dynamic' if a['dynamic'] else 'static'} " \
            f"per {'token' if a['strategy'] == 'token' else a['strategy'] + ' ' + str(a['group_size'])}"
        fmt = q["format"] + (f" {q['compression_format']}" if q.get("compression_format") else "")
        lines.append(f"  quantized    {fmt}: {q['scheme']}, {w['type']}{q['bits']} {sym}, {g}{acts}; "
                     f"{q['quantized_modules']:,} linears at {q['bits_per_weight']} bits/weight; "
                     f"{q['kept_linear_modules']:,} linears kept in float")
    fp = rep["fp8_pairs"]
    if "deepseek_v4" in rep:
        lines += _v4_lines(rep["deepseek_v4"], gb)
    elif fp["weights"]:
        lines.append(f"  fp8          {fp['weights']:,} weights, {fp['with_scale']:,} with weight_scale_inv "
                     f"({fp['scale_in_other_shard']} in another shard), block "
                     f"{'x'.join(map(str, rep['fp8']['block']))}, scale_fmt {rep['fp8']['scale_fmt'] or 'unset (F32)'}")
    if "fp8_to_bf16" in rep and "error" not in rep["fp8_to_bf16"]:
        p = rep["fp8_to_bf16"]
        lines.append(f"  fp8-to-bf16  reads {gb(p['bytes_read'])}, writes {gb(p['bytes_written'])}, "
                     f"peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB")
    if "deepseek_v4" in rep:
        for cmd, what in rep["deepseek_v4"]["conversions"].items():
            lines.append(f"  {cmd:12s} {what}")
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


def _v4_lines(d: dict, gb) -> list[str]:
    letter = {"sliding": "S", "csa": "C", "hca": "H"}
    main = [r for r in d["schedule"] if r["name"].startswith("layers.")]
    mtp = [r for r in d["schedule"] if r["name"].startswith("mtp.")]
    att = " ".join(letter[r["attention"]] for r in main) + (" | MTP " + " ".join(letter[r["attention"]] for r in mtp)
                                                            if mtp else "")
    hashed = [r["layer"] for r in main if r["moe"] == "hash"]
    kinds = ", ".join(f"{v} {k}" for k, v in d["attention_kinds"].items())
    lines = [f"  attention    {att}  (S sliding, C CSA m=4, H HCA m=128; {kinds})",
             f"  moe          hash-routed (tid2eid) layers {hashed[0]}-{hashed[-1]}, top-k routed the rest"
             if hashed else "  moe          top-k routed in every layer"]
    q = d["quantized"]
    for k, label in (("fp8", "fp8 e4m3"), ("fp4", "fp4 e2m1")):
        if q[k]["weights"]:
            lines.append(f"  {label:12s} {q[k]['weights']:,} weights, {q[k]['bytes']:,} B + {q[k]['scale_bytes']:,} B "
                         f"e8m0/f32 scales -> {q[k]['bf16_bytes']:,} B as BF16")
    return lines


def inspect_gguf(path: Path) -> dict:
    """Describe a GGUF file (or a split set, given its first file) from its header: architecture, the metadata
    dsconvert writes, tensor types with bytes per type, the MLA layout and whether an MTP block is present.

    Raises:
        BadInputError (exit 3): the file is missing or not a readable GGUF.
    """
    import re as _re

    from ..errors import BadInputError

    if not path.is_file():
        raise BadInputError(f"{path}: no such GGUF file", hint="check the path")
    from gguf import GGUFReader

    m = _re.match(r"^(.*)-00001-of-(\d{5})\.gguf$", path.name)
    files = [path.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(2)}.gguf") for i in range(1, int(m.group(2)) + 1)] \
        if m else [path]
    meta: dict = {}
    by_type: dict[str, dict] = {}
    names: list[str] = []
    for f in files:
        try:
            r = GGUFReader(str(f))
        except (OSError, ValueError) as e:
            raise BadInputError(f"{f}: not a readable GGUF file ({e})", hint="is the file complete?") from e
        for field in r.fields.values():
            if field.name.startswith("GGUF.") or field.name.startswith("tokenizer.ggml.") and \
                    field.name not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
                continue
            try:
                v = field.contents()
            except Exception:  # noqa: BLE001 - a value gguf-py cannot decode is shown as absent
                v = None
            meta.setdefault(field.name, v)
        for t in r.tensors:
            d = by_type.setdefault(t.tensor_type.name, {"tensors": 0, "bytes": 0})
            d["tensors"] += 1
            d["bytes"] += int(t.n_bytes)
            names.append(t.name)
    arch = meta.get("general.architecture")
    k_b = any(n.endswith("attn_k_b.weight") for n in names)
    kv_b = any(n.endswith("attn_kv_b.weight") for n in names)
    mla_keys = all(f"{arch}.attention.{k}" in meta for k in ("key_length_mla", "value_length_mla"))
    layout = ("mainline MLA (attn_k_b/attn_v_b)" if k_b and not kv_b else "legacy (attn_kv_b)" if kv_b and not k_b
              else "kv_b + k_b/v_b" if k_b and kv_b else "no MLA tensors")
    problems = []
    if k_b and not mla_keys:
        problems.append({"kind": "mla_keys", "fatal": True, "file": str(path),
                         "message": "attn_k_b/attn_v_b present but the *_mla metadata keys are missing",
                         "hint": "mainline llama.cpp will not load it; re-export with dsconvert gguf"})
    total = sum(d["bytes"] for d in by_type.values())
    rep = base_report("inspect")
    rep.update({
        "path": str(path), "format": "gguf", "files": [str(f) for f in files], "architecture": arch,
        "metadata": {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))},
        "tensors": len(names), "bytes": bytes_fields(total),
        "by_type": {k: {**v, **bytes_fields(v["bytes"])} for k, v in sorted(by_type.items())},
        "layout": layout, "mtp": any(".nextn." in n for n in names) or f"{arch}.nextn_predict_layers" in meta,
        "problems": problems, "ok": not problems,
    })
    return rep


def _gguf_lines(rep: dict) -> list[str]:
    md = rep["metadata"]
    arch = rep["architecture"]
    lines = [f"[bold]{rep['path']}[/bold]",
             f"  gguf         {arch}, {count(len(rep['files']), 'file')}, {rep['tensors']:,} tensors, "
             f"{rep['bytes']['gb']:.3f} GB ({rep['bytes']['gib']:.3f} GiB)",
             f"  layers       {md.get(f'{arch}.block_count')} (MTP {'present' if rep['mtp'] else 'not present'}); "
             f"layout {rep['layout']}",
             f"  file type    {md.get('general.file_type')}"]
    for k, v in rep["by_type"].items():
        lines.append(f"    {k:8s} {v['tensors']:>7,} tensors  {v['gb']:.3f} GB")
    for p in rep["problems"]:
        lines.append(f"  [red]error[/red]: {p['message']}")
    if not rep["problems"]:
        lines.append("  [green]no problems found[/green]")
    return lines


def registries(schemes: bool, formats: bool, types: bool) -> dict:
    """What the writers accept, from their registries: quantize schemes and formats (canonical name -> aliases),
    GGUF ``--type`` values (``gguf_types``: single ggml types; ``gguf_mixes``: llama-quantize mixes;
    ``gguf_unsupported``: file types dsconvert cannot write yet)."""
    out: dict = {}
    if schemes:
        from ..quant.schemes import SCHEMES
        out["schemes"] = {n: SCHEMES.aliases(n) for n in SCHEMES.names()}
    if formats:
        from ..formats.registry import FORMATS, registered_formats
        out["formats"] = {n: FORMATS.aliases(n) for n in registered_formats()}
    if types:
        from .gguf_export import type_names
        n = type_names()
        out.update({"gguf_types": n["types"], "gguf_mixes": n["mixes"], "gguf_unsupported": n["unsupported"]})
    return out


def registry_lines(reg: dict) -> list[str]:
    """Human rendering of :func:`registries`: one line per kind, aliases in parentheses."""
    labels = {"schemes": "schemes", "formats": "formats", "gguf_types": "gguf types", "gguf_mixes": "gguf mixes",
              "gguf_unsupported": "gguf types not supported yet"}
    lines = []
    for k, v in reg.items():
        items = [f"{n} (aliases: {', '.join(al)})" if al else n for n, al in v.items()] if isinstance(v, dict) else v
        lines.append(f"{labels.get(k, k)}: {', '.join(items)}")
    return lines
