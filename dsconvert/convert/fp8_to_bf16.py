"""``dsconvert fp8-to-bf16``: DeepSeek's block-FP8 release -> a complete BF16 Hugging Face directory.

Plan (shapes only) -> pre-flight (every header, partner, grid and scale value) -> stream (one chunk of rows at
a time, read + dequant overlapped with write + hash) -> index, config, copied files -> manifest complete.

Output rules (docs/checkpoint-layout.md §6):
* each FP8 weight -> BF16 of the same name and shape, byte-identical to ``weight_dequant`` + bf16 cast;
* DeepSeek-V4 (docs/checkpoint-layout.md §13): FP8 weights with E8M0 (or F32) ``.scale`` and FP4 e2m1 routed
  experts (``I8 [M, N/2]``, per-32 E8M0 scales) -> BF16 ``[M, N]`` by one float32 multiply and one RNE cast
  (exact for every normal result); release names kept; ``expert_dtype`` dropped from the config;
* every other tensor copied bit-identical in its own dtype (the F32 router bias stays F32);
* no ``*_scale_inv`` in the shards or the index; index ``metadata.total_size`` = sum of tensor bytes;
* shard headers carry ``{"format": "pt"}``; ``config.json`` without ``quantization_config``, ``torch_dtype``
  bfloat16; every other file of SRC copied, never executed;
* the MTP block (layers >= num_hidden_layers) kept by default; ``mtp="drop"`` removes it and sets
  ``num_nextn_predict_layers`` to 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import BadInputError, UsageError
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..formats.kind import require_kind
from ..formats.hf_config import unquantized_config, version_label
from ..formats.safetensors_io import dtype_size
from ..formats.tokenizer_check import tokenizer_problems
from ..report import base_report
from ..units import bytes_fields
from .files import extra_files
from .job import NOT_FINGERPRINTED, DirectoryOutput, option_fingerprint, preflight, write_directory
from .manifest import check_paths
from .pipeline import OutShard, OutTensor, check_max_memory, copy_producer, dequant_producer, source_order
from .executor import Executor, Job, LocalExecutor, Rebuilt, shard_units

COMMAND = "fp8-to-bf16"
OUT_DTYPES = {"bf16": ("BF16", torch.bfloat16, "bfloat16"), "f16": ("F16", torch.float16, "float16"),
              "f32": ("F32", torch.float32, "float32")}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "f16", "fp16": "f16", "float32": "f32", "fp32": "f32"}
BASE_RSS = 200 * 2**20  # interpreter + torch + the plan (VmHWM 0.19-0.22 GiB net of the chunk terms)
#: What to do instead, by the kind of checkpoint given (:func:`dsconvert.formats.kind.require_kind`).
INPUT_HINTS = {
    "float": "it is already unquantized: use it as it is (quantize and gguf take it as SRC)",
    "int": "dsconvert does not dequantize INT checkpoints; run fp8-to-bf16 on the FP8 release it was made from",
    "gguf": "fp8-to-bf16 reads safetensors checkpoints; pass the FP8 release folder the GGUF was made from",
    "other": "pass DeepSeek's FP8 release folder (config.json with quantization_config.quant_method fp8)",
}


@dataclass
class Options:
    """Options that change the output bytes (fingerprinted) and those that do not."""

    mtp: str = "keep"  # keep | drop
    dtype: str = "bf16"  # bf16 | f16 | f32
    max_shard_size: int | None = None  # bytes; None keeps the source's shard boundaries
    device: str = field(default="auto", metadata=NOT_FINGERPRINTED)  # auto | cpu | cuda | cuda:N
    # shards in flight: overlaps one shard's hashing and fsync with the next one's dequant
    workers: int = field(default=2, metadata=NOT_FINGERPRINTED)
    chunk_bytes: int = field(default=32 * 2**20, metadata=NOT_FINGERPRINTED)  # output bytes per chunk
    max_memory: int | None = field(default=None, metadata=NOT_FINGERPRINTED)

    def fingerprinted(self) -> dict:
        return option_fingerprint(self)


def normalize_dtype(name: str) -> str:
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in OUT_DTYPES:
        raise UsageError(f"unknown --dtype {name!r}", hint="use bf16, f16 or f32")
    return key


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Raises UsageError for CUDA without a device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available", hint="use --device cpu or auto")
    if d.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return d


@dataclass
class Plan:
    """Everything the run will do, from shapes only."""

    shards: list[OutShard]
    dropped: list[dict]
    files: list[str]
    config: dict
    bytes_read: int
    bytes_written: int
    peak_memory: int
    counts: dict = field(default_factory=dict)
    mtp: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "output_shards": [{"name": s.name, "tensors": len(s.tensors), **bytes_fields(s.nbytes)} for s in self.shards],
            "tensors": self.counts,
            "dropped": self.dropped,
            "files_copied": self.files,
            "bytes_read": bytes_fields(self.bytes_read),
            "bytes_written": bytes_fields(self.bytes_written),
            "peak_memory_estimate": bytes_fields(self.peak_memory),
            "disk_needed": bytes_fields(self.bytes_written),
            "time_estimate_s_at_0_5_gb_s": estimate_seconds(self.bytes_read + self.bytes_written),
            "mtp": self.mtp,
        }


def make_plan(ck: Checkpoint, opts: Options, device: torch.device | None = None) -> Plan:
    """Plan the conversion of ``ck`` from headers only.

    Raises:
        BadInputError: SRC holds no FP8 weights (nothing to dequantize).
        UsageError: bad option values.
    """
    if opts.mtp not in ("keep", "drop"):
        raise UsageError(f"--mtp {opts.mtp!r}", hint="use keep or drop")
    st_dtype, torch_dtype, cfg_dtype = OUT_DTYPES[normalize_dtype(opts.dtype)]
    device = device or torch.device("cpu")
    if ck.fp8 is None or not any(e.dtype == "F8_E4M3" for _, e in ck.tensors.values()):
        raise BadInputError(f"{ck.root}: not an FP8 checkpoint (no quantization_config.quant_method fp8 or no "
                            "F8_E4M3 tensors)", hint="fp8-to-bf16 reads DeepSeek's FP8 release; this one is already "
                                                     "unquantized")
    dropped, outs = [], []
    bytes_read = 0
    counts = {"dequantized": 0, "copied": 0, "dropped": 0, "scales_consumed": 0}
    for name in source_order(ck):
        ent = ck.entry(name)
        if opts.mtp == "drop" and ck.is_mtp(name):  # scales included: every input tensor is accounted for
            dropped.append({"name": name, "reason": "--mtp drop: multi-token-prediction layer", "bytes": ent.nbytes})
            counts["dropped"] += 1
            continue
        if ck.is_scale(name):
            counts["scales_consumed"] += 1
            continue
        if ent.dtype == "F8_E4M3" or ck.is_fp4_weight(name):
            sent = ck.entry(ck.scale_of(name))
            shape = (ent.shape[0], 2 * ent.shape[1]) if ent.dtype == "I8" else ent.shape  # FP4: two per byte
            t = OutTensor(name, st_dtype, shape, dequant_producer(ck, name, torch_dtype, device, opts.chunk_bytes),
                          "dequant", [name, ck.scale_of(name)], ent.nbytes + sent.nbytes)
            counts["dequantized"] += 1
        else:
            t = OutTensor(name, ent.dtype, ent.shape, copy_producer(ck, name, opts.chunk_bytes), "copy", [name],
                          ent.nbytes)
            counts["copied"] += 1
        bytes_read += t.source_bytes
        outs.append((ck.tensors[name][0], t))

    shards: list[OutShard] = []
    if opts.max_shard_size is None:
        by_src: dict[str, list[OutTensor]] = {}
        for src_shard, t in outs:
            by_src.setdefault(src_shard, []).append(t)
        shards = [OutShard(Path(s).name, ts) for s, ts in by_src.items() if ts]
    else:
        groups: list[list[OutTensor]] = [[]]
        size = 0
        for _, t in outs:
            if groups[-1] and size + t.nbytes > opts.max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        shards = [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups) if g]

    cfg = unquantized_config(ck.config, cfg_dtype)
    if ck.v4 is not None:
        cfg.pop("expert_dtype", None)  # describes the FP4/FP8 expert storage, gone with quantization_config
    if opts.mtp == "drop":
        cfg["num_nextn_predict_layers"] = 0
    files = extra_files(ck.root)
    written = sum(s.nbytes for s in shards)
    # Per worker: queue_depth + 2 output chunks, plus the kernel's fp32 temporaries (one output chunk in fp32); a
    # chunk is at most the largest output tensor. Measured (own VmHWM, 2 workers): 0.49-0.51 GiB at the real V3
    # and V4-Flash dimensions (estimate 0.57), 0.30 GiB on a hidden-1024 fixture (estimate 0.38).
    out_esz = dtype_size(st_dtype)
    largest = max((t.nbytes for s in shards for t in s.tensors), default=0)
    chunk = max(1, min(opts.chunk_bytes, largest))
    per_worker = (2 + 2) * chunk + chunk * 4 // out_esz
    peak = BASE_RSS + max(1, opts.workers) * per_worker
    # V3: model.layers.{N}.* with N >= num_hidden_layers; V4: mtp.{j}.* (layer num_hidden_layers + j)
    mtp_layers = sorted({int(n.split(".")[1]) + ck.num_hidden_layers if n.startswith("mtp.") else int(n.split(".")[2])
                         for n in ck.tensors if ck.is_mtp(n)})
    mtp = {"layers": mtp_layers, "kept": opts.mtp == "keep" and bool(mtp_layers),
           "tensors": sum(1 for s in shards for t in s.tensors if ck.is_mtp(t.name))}
    return Plan(shards, dropped, files, cfg, bytes_read, written, peak, counts, mtp)


def rebuild(src: str, opts: Options) -> Rebuilt:
    """The output shards of :func:`make_plan` for ``src``, rebuilt where a remote unit runs (a Ray worker: same
    SRC path, same options, hence the same plan; the driver has already pre-flighted SRC)."""
    ck = open_checkpoint(Path(src), check_values=False)
    return shard_units(make_plan(ck, opts, resolve_device(opts.device)).shards)


def run(src: Path, out: Path | None, opts: Options, *, dry_run: bool = False, overwrite: bool = False,
        resume: bool = True, progress: bool | None = None, verify: str = "full",
        executor: Executor | None = None) -> dict:
    """Convert ``src`` into ``out``; return the JSON report (also written to ``out/report.json``).
    ``verify`` (``full`` | ``size``) is how a rerun checks the files already finished (docs/cli-conventions.md,
    Resume).

    ``executor`` runs the shard units (default: ``opts.workers`` threads here; :mod:`.executor` for Ray).

    Raises:
        BadInputError / UnsupportedError (exit 3): anything wrong with SRC, found before writing.
        UsageError / OutputExistsError (exit 2): bad options, or an ``out`` that cannot be used.
    """
    t0 = time.perf_counter()
    src = Path(src)
    executor = executor or LocalExecutor(opts.workers)
    if out is not None:
        check_paths(src, Path(out))
    device = resolve_device(opts.device)
    require_kind(src, COMMAND, ("fp8",), "DeepSeek's block-FP8 release (F8_E4M3 weights with weight_scale_inv)",
                 INPUT_HINTS)
    ck = open_checkpoint(src, check_values=not dry_run)
    plan = make_plan(ck, opts, device)
    report = base_report(COMMAND)
    report.update({
        "source": {"path": str(src), "family": version_label(ck.config), "shards": len(ck.shards),
                   "tensors": len(ck.tensors), **bytes_fields(sum(e.nbytes for _, e in ck.tensors.values())),
                   "fp8_block": list(ck.fp8.block), "scale_fmt": ck.fp8.scale_fmt},
        "options": {**asdict(opts), "device": str(device)},
        "dry_run": dry_run,
        "plan": plan.summary(),
        "warnings": [p.to_dict() for p in ck.problems if not p.fatal]
                    + [p.to_dict() for p in tokenizer_problems(ck.root, ck.config)],
    })
    check_max_memory(plan.peak_memory, opts.max_memory,
                     hint="lower --workers (each shard in flight holds a few 32 MiB chunks)")
    preflight(out, plan.shards, report, dry_run=dry_run)  # also on --dry-run: before OUT/manifest.json exists
    if dry_run:
        report["output"] = {"path": str(out) if out else None}
        return report
    if out is None:
        raise UsageError("missing -o/--output", hint="dsconvert fp8-to-bf16 SRC -o OUT")
    out = Path(out)

    def per_tensor(report: dict) -> dict:
        return {"tensors": [{"name": t.name, "action": t.action, "dtype_out": t.dtype,
                             "dtype_in": ck.entry(t.name).dtype, "bytes_in": t.source_bytes, "bytes_out": t.nbytes,
                             "shard": s.name} for s in plan.shards for t in s.tensors]}

    return write_directory(COMMAND, src, out, DirectoryOutput(plan.shards, plan.config, plan.files),
                           opts.fingerprinted(), report, executor=executor,
                           job=Job(rebuild, (str(src.resolve()), opts)), t0=t0, overwrite=overwrite, resume=resume,
                           verify=verify, progress=progress, self_check=lambda o: verify_output(o, plan),
                           on_report=per_tensor)


def verify_output(out: Path, plan: Plan) -> dict:
    """Re-read what was written (headers, index, config) and check it is a complete, loadable BF16 directory:
    every planned tensor present once with its dtype and shape, no scale and no FP8 tensor left, config with
    ``model_type`` and ``architectures`` and without ``quantization_config``.

    Raises:
        RuntimeError: the output does not match the plan (a dsconvert bug; exit 1).
    """
    from ..formats.checkpoint import scan

    ck = scan(out)
    fatal = ck.fatal_problems()
    expected = {t.name: (t.dtype, tuple(t.shape)) for s in plan.shards for t in s.tensors}
    got = {n: (e.dtype, tuple(e.shape)) for n, (_, e) in ck.tensors.items()}
    problems = [p.message for p in fatal]
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        problems.append(f"tensors differ from the plan (missing {missing}, unexpected {extra})")
    if any(n.endswith("_scale_inv") or d in ("F8_E4M3", "F8_E8M0", "I8") for n, (d, _) in got.items()):
        problems.append("FP8/FP4 tensors or scales left in the output")
    cfg = ck.config
    if "quantization_config" in cfg or not cfg.get("model_type") or not cfg.get("architectures"):
        problems.append("config.json must have model_type and architectures and no quantization_config")
    if problems:
        raise RuntimeError(f"{out}: output self-check failed: " + "; ".join(problems))
    return {"ok": True, "tensors": len(got), "shards": len(ck.shards)}


def estimate_seconds(nbytes: int, gbps: float = 0.5) -> float:
    """A conservative time estimate at ``gbps`` GB/s of output."""
    return math.ceil(nbytes / (gbps * 1e9))
