"""``dsconvert quantize``: INT8/INT4 checkpoints (compressed-tensors, AutoAWQ GEMM, GPTQ) straight from the
FP8 release or any BF16 checkpoint, streamed module by module.

Each source weight is read (FP8 dequantized in memory by the exact fp8-to-bf16 rule: no BF16 copy on disk),
quantized by the scheme's math in :mod:`dsconvert.quant` (RTN here; AWQ/GPTQ through the calibration engine),
packed by the output format's module in :mod:`dsconvert.formats`, and written through the shared streaming
writer (temp name + rename, resume manifest, progress). Everything the policy keeps is copied bit-identical
(FP8 tensors that are kept become BF16, the only float form of them a loader takes).

Output shards are layer-aligned: embeddings/head first, then each decoder layer's tensors (packed together up
to ``--max-shard-size``), so calibrated methods can write layer ``i`` as soon as it is quantized.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import BadInputError, UsageError
from ..formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from ..formats.hf_config import dump_config, unquantized_config, version_label
from ..formats.int_format import IntFormat
from ..formats.registry import get_format, registered_formats
from ..quant.rtn import QTensor, dequantize, quantize, quantize_with_error
from ..quant.schemes import get_scheme, registered_schemes
from ..report import base_report, peak_rss_bytes
from ..units import bytes_fields
from .files import REPORT_NAME, copy_files, extra_files
from .preflight import check_free_disk, check_output_writable
from .manifest import check_paths, fingerprint, prepare_output, source_fingerprint_parts, write_atomic
from .pipeline import (OutShard, OutTensor, check_max_memory, copy_producer, dequant_producer, source_order,
                       write_shards)
from .policy import DEFAULT_IGNORE_PATTERNS, LayerPolicy, check_fused_groups, module_of
from .calibration_data import SIDECAR as CALIB_SIDECAR
from .progress import ByteProgress
from .fp8_to_bf16 import BASE_RSS, resolve_device

COMMAND = "quantize"
_LAYER_PREFIX = "model.layers."


@dataclass
class Options:
    scheme: str = "W4A16"
    group_size: int | None = None  # None: the scheme's default
    format: str = "compressed-tensors"
    checkpoint_format: str | None = None  # gptq only: gptq (v1, default) | gptq_v2
    method: str = "rtn"  # rtn | awq | gptq
    ignore: list[str] = field(default_factory=list)
    strict: bool = False
    mtp: str = "keep"
    max_shard_size: int = 5 * 10**9
    device: str = "auto"
    workers: int = 1
    chunk_bytes: int = 32 * 2**20
    max_memory: int | None = None
    # calibration (awq/gptq)
    calib_data: str | None = None
    num_samples: int = 8
    seq_len: int = 128
    calib_seed: int = 0  # which windows of the calibration text are drawn (calibration_data.select_windows)
    expert_policy: str = "all-tokens"  # experts with few calibration tokens: all-tokens | rtn | topk

    def fingerprinted(self) -> dict:
        d = asdict(self)
        for k in ("device", "workers", "chunk_bytes", "max_memory", "strict"):
            d.pop(k)
        return d


def resolve_format(opts: Options) -> IntFormat:
    """The output format instance (``--format`` plus ``--checkpoint-format`` for GPTQ).

    Raises:
        UsageError: unknown format, or ``--checkpoint-format`` with a non-GPTQ format.
    """
    name = opts.format
    if opts.checkpoint_format:
        if get_format(name).name not in ("gptq", "gptq_v2"):
            raise UsageError("--checkpoint-format applies to --format gptq only")
        name = opts.checkpoint_format
    try:
        return get_format(name)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown format {name!r}",
                         hint="formats: " + ", ".join(registered_formats())) from None


def resolve_spec(opts: Options):
    """The :class:`QuantSpec` of ``--scheme`` with ``--group-size``.

    Raises:
        UsageError: unknown scheme (listing the choices), or a group size the scheme does not take.
    """
    try:
        scheme = get_scheme(opts.scheme)
    except KeyError as e:
        raise UsageError(str(e.args[0]) if e.args else f"unknown scheme {opts.scheme!r}",
                         hint="schemes: " + ", ".join(registered_schemes())) from None
    return scheme.spec(opts.group_size)


@dataclass
class ModuleResult:
    tensors: dict[str, torch.Tensor]
    rel_error: float


@dataclass
class Plan:
    shards: list[OutShard]
    dropped: list[dict]
    files: list[str]
    config: dict
    quantized_modules: list[str]
    kept: list[str]
    bytes_read: int
    bytes_written: int
    quantized_params: int
    quantized_bytes: int
    total_params: int
    peak_memory: int
    ignore_unmatched: list[str]

    def summary(self) -> dict:
        return {
            "output_shards": [{"name": s.name, "tensors": len(s.tensors), **bytes_fields(s.nbytes)} for s in self.shards],
            "quantized_modules": len(self.quantized_modules),
            "kept_tensors": len(self.kept),
            "dropped": self.dropped,
            "files_copied": self.files,
            "bytes_read": bytes_fields(self.bytes_read),
            "bytes_written": bytes_fields(self.bytes_written),
            "bits_per_weight_quantized": round(8 * self.quantized_bytes / self.quantized_params, 4)
            if self.quantized_params else None,
            "bits_per_weight_overall": round(8 * self.bytes_written / self.total_params, 4) if self.total_params else None,
            "peak_memory_estimate": bytes_fields(self.peak_memory),
            "ignore_patterns_unmatched": self.ignore_unmatched,
        }


def _natural_key(name: str) -> tuple:
    """``experts.2`` before ``experts.10``: digit runs compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _layer_key(name: str) -> int:
    """Grouping key: -1 for embeddings and other non-layer tensors, else the layer index."""
    if name.startswith(_LAYER_PREFIX):
        return int(name[len(_LAYER_PREFIX):].split(".", 1)[0])
    return -1


class _ModuleCache:
    """Computes each quantized module once and hands out its tensors one by one.

    Shards are written by several worker threads at once (``--workers``), each taking its modules in file
    order, so the cache keeps one entry per module in flight: the first thread to ask computes it, a thread
    asking for the same module meanwhile waits for that result, and the entry is dropped once every tensor of
    the module has been taken. (A single "current module" slot was clobbered by the other worker's shard.)
    """

    class _Entry:
        def __init__(self):
            self.ready = threading.Event()
            self.result: ModuleResult | None = None
            self.error: BaseException | None = None
            self.taken: set[str] = set()

    def __init__(self, compute: Callable[[str], ModuleResult]):
        self.compute = compute
        self.errors: dict[str, float] = {}
        self._entries: dict[str, _ModuleCache._Entry] = {}
        self._lock = threading.Lock()

    def take(self, module: str, tensor_name: str) -> torch.Tensor:
        with self._lock:
            ent = self._entries.get(module)
            owner = ent is None
            if owner:
                ent = self._entries[module] = self._Entry()
        if owner:
            try:
                ent.result = self.compute(module)
            except BaseException as e:
                ent.error = e
                with self._lock:
                    self._entries.pop(module, None)
                raise
            finally:
                ent.ready.set()
            with self._lock:
                self.errors[module] = ent.result.rel_error
        else:
            ent.ready.wait()
            if ent.error is not None:
                raise ent.error
        t = ent.result.tensors[tensor_name]
        with self._lock:
            ent.taken.add(tensor_name)
            if ent.taken >= ent.result.tensors.keys():
                self._entries.pop(module, None)
        return t


def _with_override(name: str, producer, replaced: Callable[[str], torch.Tensor | None], st_dtype: str):
    """Producer that writes ``replaced(name)`` (cast to the planned dtype) when calibration changed the tensor."""
    from ..formats.safetensors_io import DTYPES

    def produce():
        r = replaced(name)
        if r is None:
            yield from producer()
        else:
            yield r.to(DTYPES[st_dtype][0]).contiguous()

    return produce


def make_plan(ck: Checkpoint, opts: Options, fmt: IntFormat, compute: Callable[[str], ModuleResult],
              device: torch.device, replaced: Callable[[str], torch.Tensor | None] | None = None
              ) -> tuple[Plan, _ModuleCache]:
    """Plan from headers only; ``compute(module) -> ModuleResult`` produces a quantized module's tensors;
    ``replaced(name)`` (calibrated methods) returns a float tensor to write instead of a kept source tensor.

    Raises:
        ShapeError / UsageError: a group size that does not divide K, a spec the format cannot hold, a mixed
            fused group, an ``--ignore`` pattern matching nothing under ``--strict``.
    """
    spec = resolve_spec(opts)
    fmt.supports(spec)
    if opts.mtp not in ("keep", "drop"):
        raise UsageError(f"--mtp {opts.mtp!r}", hint="use keep or drop")
    _check_group_size(ck, spec, opts)
    policy = LayerPolicy(spec, list(opts.ignore))
    cache = _ModuleCache(compute)
    decisions: dict[str, bool] = {}
    units: dict[int, list[tuple[str, list[OutTensor]]]] = {}  # layer -> (source name, its output tensors)
    dropped, kept, quantized = [], [], []
    bytes_read = q_params = q_bytes = total_params = 0
    for name in source_order(ck):
        if ck.is_scale(name):
            continue
        ent = ck.entry(name)
        if opts.mtp == "drop" and ck.is_mtp(name):
            dropped.append({"name": name, "reason": "--mtp drop: multi-token-prediction layer", "bytes": ent.nbytes})
            continue
        total_params += ent.numel
        src_bytes = ent.nbytes + (ck.entry(ck.scale_of(name)).nbytes if ent.dtype == "F8_E4M3" else 0)
        bytes_read += src_bytes
        s = policy(name, ent.shape)
        if LayerPolicy.quantizable(name, ent.shape):
            decisions[name] = s is not None
        outs: list[OutTensor]
        if s is not None:
            mod = module_of(name)
            plans = fmt.plan(mod, tuple(ent.shape), spec)  # raises ShapeError with the module name
            outs = [OutTensor(p.name, p.safetensors_dtype, tuple(p.shape),
                              (lambda mod=mod, tn=p.name: iter([cache.take(mod, tn)])), "quantize", [name],
                              src_bytes if i == 0 else 0) for i, p in enumerate(plans)]
            quantized.append(mod)
            q_params += ent.numel
            q_bytes += sum(p.nbytes for p in plans)
        elif ent.dtype == "F8_E4M3":
            outs = [OutTensor(name, "BF16", ent.shape,
                              dequant_producer(ck, name, torch.bfloat16, device, opts.chunk_bytes), "dequant",
                              [name, ck.scale_of(name)], src_bytes)]
            kept.append(name)
        else:
            outs = [OutTensor(name, ent.dtype, ent.shape, copy_producer(ck, name, opts.chunk_bytes), "copy", [name],
                              src_bytes)]
            kept.append(name)
        if replaced is not None and s is None:
            outs[0].produce = _with_override(name, outs[0].produce, replaced, outs[0].dtype)
        units.setdefault(_layer_key(name), []).append((name, outs))
    check_fused_groups(decisions)
    # Canonical order inside a layer (natural name order), not the source's file order: the same weights give
    # the same bytes whether they come from the FP8 release or a re-sharded BF16 copy. A module's tensors stay
    # together, in the format's order.
    groups = {k: [t for _, outs in sorted(v, key=lambda u: _natural_key(u[0])) for t in outs]
              for k, v in units.items()}
    unmatched = policy.unmatched()
    if unmatched and opts.strict:
        raise UsageError(f"--ignore pattern(s) matched no quantizable module: {', '.join(unmatched)}",
                         hint="patterns match module names: the weight name without .weight, e.g. "
                              "model.layers.0.self_attn.kv_b_proj or re:.*kv_b_proj$ (the names are in "
                              "model.safetensors.index.json); or drop --strict")
    shards = _layer_aligned_shards(groups, opts.max_shard_size)
    cfg = unquantized_config(ck.config, "bfloat16")
    if opts.mtp == "drop":
        cfg["num_nextn_predict_layers"] = 0
    ignore_out = DEFAULT_IGNORE_PATTERNS + sorted({module_of(n) for n, q in decisions.items() if not q})
    if fmt.name == "autoawq":
        user_ignored = sorted({module_of(n) for n, q in decisions.items() if not q})
        cfg["quantization_config"] = fmt.quantization_config(spec, user_ignored,
                                                             module_names=[module_of(n) for n in decisions]
                                                             ) if user_ignored else fmt.quantization_config(spec)
    else:
        cfg["quantization_config"] = fmt.quantization_config(spec, ignore_out)
    written = sum(s.nbytes for s in shards)
    largest = max((ck.entry(n).numel for n in decisions), default=0)
    # one module in fp32 plus its quantized form and temporaries (~4x), plus the write queue
    peak = BASE_RSS + 4 * 4 * largest + 4 * opts.chunk_bytes
    plan = Plan(shards, dropped, extra_files(ck.root), cfg, quantized, kept, bytes_read, written, q_params, q_bytes,
                total_params, peak, unmatched)
    return plan, cache


def _check_group_size(ck: Checkpoint, spec, opts: Options) -> None:
    """Refuse a group size that does not divide the in_features K of every tensor to quantize, naming the first
    such tensor and the largest group size that divides them all.

    Raises:
        ShapeError (exit 2).
    """
    from ..errors import ShapeError

    g = spec.group_size
    if g <= 0:
        return
    probe = LayerPolicy(spec, list(opts.ignore))
    ks: dict[str, int] = {}
    for name in source_order(ck):
        ent = ck.entry(name)
        if not ck.is_scale(name) and not (opts.mtp == "drop" and ck.is_mtp(name)) and probe(name, ent.shape):
            ks[module_of(name)] = int(ent.shape[1])
    bad = [(m, k) for m, k in ks.items() if k % g]
    if not bad:
        return
    fits = [c for c in (256, 128, 64, 32, 16, 8) if all(k % c == 0 for k in ks.values())]
    hint = (f"--group-size {fits[0]} divides the in_features of every tensor to quantize" if fits
            else "--group-size -1 (per channel)") + "; or --ignore the tensors whose K does not divide"
    m, k = bad[0]
    raise ShapeError(f"group size {g} does not divide in_features K={k} of tensor {m!r} "
                     f"({len(bad)} tensor(s) affected)", hint=hint)


def _layer_aligned_shards(groups: dict[int, list[OutTensor]], max_bytes: int) -> list[OutShard]:
    """Pack layer groups (in layer order, non-layer tensors first) into shards of at most ``max_bytes``;
    a group larger than that is split between tensors (never inside a module's tensors)."""
    packed: list[list[OutTensor]] = [[]]
    size = 0
    for key in sorted(groups):
        g = groups[key]
        gbytes = sum(t.nbytes for t in g)
        if packed[-1] and size + gbytes > max_bytes:
            packed.append([])
            size = 0
        for t in g:
            starts_module = t.action != "quantize" or t.source_bytes > 0
            if packed[-1] and size + t.nbytes > max_bytes and starts_module and size > 0:
                packed.append([])
                size = 0
            packed[-1].append(t)
            size += t.nbytes
    packed = [p for p in packed if p]
    n = len(packed)
    return [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", p, keep_order=True) for i, p in enumerate(packed)]


def rtn_compute(ck: Checkpoint, fmt: IntFormat, spec_of: Callable[[str], object], device: torch.device
                ) -> Callable[[str], ModuleResult]:
    """RTN: read (and dequantize) one weight, quantize with the format's convention, pack."""

    def compute(module: str) -> ModuleResult:
        name = module + ".weight"
        w = _read_weight(ck, name).to(device)  # BF16 (FP8 dequantized), widened per chunk inside the kernel
        qt, err = quantize_with_error(w, spec_of(name), fmt.convention, name=module)
        return ModuleResult({k: v.cpu() for k, v in fmt.encode_qtensor(module, qt).items()}, err)

    return compute


def _read_weight(ck: Checkpoint, name: str) -> torch.Tensor:
    """``[N, K]`` of a weight in its float form: FP8 dequantized to BF16 exactly as fp8-to-bf16, else as stored."""
    from ..quant.fp8_block import dequant_fp8_block

    t = ck.read(name)
    if t.dtype == torch.float8_e4m3fn:
        t = dequant_fp8_block(t, ck.read(ck.scale_of(name)), ck.fp8.block)
    return t


def _read_float(ck: Checkpoint, name: str) -> torch.Tensor:
    """float32 ``[N, K]`` of a weight: FP8 dequantized to BF16 exactly as fp8-to-bf16, then widened."""
    from ..quant.fp8_block import dequant_fp8_block

    t = ck.read(name)
    if t.dtype == torch.float8_e4m3fn:
        t = dequant_fp8_block(t, ck.read(ck.scale_of(name)), ck.fp8.block)
    return t.to(torch.float32)


def _rel_error(w: torch.Tensor, qt: QTensor) -> float:
    """Relative RMS error ``||w - deq(q)|| / ||w||`` (float64 norms)."""
    d = dequantize(qt).to(w.device, torch.float64)
    w64 = w.to(torch.float64)
    n = float(torch.linalg.vector_norm(w64))
    return float(torch.linalg.vector_norm(w64 - d)) / n if n > 0 else 0.0


def _index(shards: list[OutShard]) -> dict:
    wm = {t.name: s.name for s in shards for t in s.tensors}
    return {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": dict(sorted(wm.items()))}


def _error_summary(errors: dict[str, float]) -> dict:
    if not errors:
        return {}
    vals = sorted(errors.values())
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:10]
    return {"modules": len(vals), "mean": sum(vals) / len(vals), "median": vals[len(vals) // 2], "max": vals[-1],
            "worst": [{"module": m, "rel_rms_error": e} for m, e in worst]}


def run(src: Path, out: Path | None, opts: Options, *, dry_run: bool = False, overwrite: bool = False,
        resume: bool = True, progress: bool | None = None) -> dict:
    """Quantize ``src`` into ``out``; returns the JSON report (also ``out/report.json``).

    Raises:
        BadInputError / UnsupportedError (exit 3), UsageError / ShapeError / OutputExistsError (exit 2).
    """
    t0 = time.perf_counter()
    src = Path(src)
    if opts.method not in ("rtn", "awq", "gptq"):
        raise UsageError(f"--method {opts.method!r}", hint="use rtn, awq or gptq")
    if out is not None:
        check_paths(src, Path(out))
    device = resolve_device(opts.device)
    fmt = resolve_format(opts)
    ck = open_checkpoint(src, check_values=not dry_run)
    if ck.config.get("quantization_config") and ck.fp8 is None:
        raise BadInputError(f"{src}: already quantized ({ck.config['quantization_config'].get('quant_method')})",
                            hint="quantize from the FP8 release or a BF16 checkpoint")
    spec = resolve_spec(opts)
    engine = None
    if opts.method == "rtn":
        compute = rtn_compute(ck, fmt, lambda name: spec, device)
    else:
        from .calibrated import calibrated_compute

        compute, engine = calibrated_compute(ck, fmt, spec, opts, device)
    plan, cache = make_plan(ck, opts, fmt, compute, device, engine.replaced if engine is not None else None)
    if engine is not None:  # which calibration data: in the output's config (docs/int-formats.md §8)
        plan.config["quantization_config"] = fmt.record_calibration(plan.config["quantization_config"],
                                                                    engine.record)
    if engine is not None:  # calibration holds activations and a layer's working set, not one module
        plan.peak_memory += engine.peak_memory_estimate()
    report = base_report(COMMAND)
    report.update({
        "source": {"path": str(src), "family": version_label(ck.config), "format": "fp8-block" if ck.fp8 else "float",
                   "tensors": len(ck.tensors)},
        "options": {**asdict(opts), "device": str(device)},
        "scheme": {"name": opts.scheme, "bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric},
        "format": fmt.name,
        "quantization_config": plan.config["quantization_config"],
        "dry_run": dry_run,
        "plan": plan.summary(),
    })
    if plan.ignore_unmatched:
        report["warnings"] = [f"--ignore {p!r} matched no quantizable module" for p in plan.ignore_unmatched]
    check_max_memory(plan.peak_memory, opts.max_memory,
                     hint="the largest module is quantized in float32 (calibrated methods: one layer's "
                          "activations and working set; lower --num-samples/--seq-len); raise --max-memory")
    if out is not None:  # pre-flight, also on --dry-run: before OUT/manifest.json exists
        check_output_writable(Path(out))
        report["disk"] = check_free_disk(Path(out), {s.name: s.nbytes for s in plan.shards}, refuse=not dry_run)
        if "problem" in report["disk"]:
            report.setdefault("warnings", []).append(report["disk"]["problem"])
    if dry_run:
        return report
    if out is None:
        raise UsageError("missing -o/--output", hint="dsconvert quantize SRC -o OUT --scheme W4A16")
    out = Path(out)
    fp = fingerprint({"source": source_fingerprint_parts(src, [INDEX_NAME, "config.json"]),
                      "options": opts.fingerprinted(), "command": COMMAND})
    decision = prepare_output(out, COMMAND, fp, opts.fingerprinted(), overwrite=overwrite, resume=resume,
                              owned_patterns=("*.safetensors", INDEX_NAME, "config.json", REPORT_NAME, CALIB_SIDECAR,
                                              *plan.files,
                                              *fmt.sidecar_files(plan.config["quantization_config"])))
    from .calibrated import STATE_NAME
    if engine is not None:
        engine.resume(out, decision.done, plan.shards)
    written_now: list[str] = []
    if not decision.already_complete:
        todo = sum(s.nbytes for s in plan.shards if s.name not in decision.done)
        with ByteProgress(todo, COMMAND, enabled=progress) as bar:
            written_now = write_shards(out, plan.shards, decision.manifest, bar,
                                       workers=1 if engine is not None else opts.workers)
        write_atomic(out / INDEX_NAME, (json.dumps(_index(plan.shards), indent=2) + "\n").encode())
        write_atomic(out / "config.json", dump_config(plan.config))
        for name, doc in fmt.sidecar_files(plan.config["quantization_config"]).items():
            write_atomic(out / name, (json.dumps(doc, indent=2) + "\n").encode())
        if engine is not None:  # the calibration windows' span hashes, for validate's overlap check
            write_atomic(out / CALIB_SIDECAR, (json.dumps(engine.sidecar()) + "\n").encode())
        copy_files(src, out, plan.files)
    seconds = time.perf_counter() - t0
    report.update({
        "output": {"path": str(out), "shards": len(plan.shards), "total_size": plan.bytes_written},
        "resumed": decision.resumed,
        "already_complete": decision.already_complete,
        "shards_written": len(written_now),
        "quantization_error": _error_summary(cache.errors),
        "seconds": round(seconds, 3),
        "peak_rss": bytes_fields(peak_rss_bytes()),
    })
    if engine is not None:
        report["calibration"] = engine.report()
    full = dict(report, module_errors=dict(sorted(cache.errors.items(), key=lambda kv: _natural_key(kv[0]))))
    write_atomic(out / REPORT_NAME, (json.dumps(full, indent=2, default=str) + "\n").encode())
    decision.manifest.complete = True
    decision.manifest.save(out)
    (out / STATE_NAME).unlink(missing_ok=True)  # calibration resume state is only needed until completion
    report["report_path"] = str(out / REPORT_NAME)
    return report

