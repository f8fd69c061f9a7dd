"""``dsconvert quantize``: INT8/INT4 and FP8 checkpoints (compressed-tensors, AutoAWQ GEMM, GPTQ, DeepSeek's own
FP8 layout) straight from the FP8 release or any BF16 checkpoint, streamed module by module.

The scheme (``--scheme`` with its options) is resolved to a
:class:`~dsconvert.quant.schemes.SchemeDescription`; the output format binds it (``IntFormat.bind``: refuses, exit
2, a scheme it cannot store, naming the module) to the codec that stores it. From here on the pipeline only calls
the scheme's kernel and the codec's plan/encode/config methods: it never looks at either name.

Each source weight is read (FP8 dequantized in memory by the exact fp8-to-bf16 rule: no BF16 copy on disk),
quantized by the scheme's math in :mod:`dsconvert.quant` (RTN here; AWQ/GPTQ through the calibration engine),
packed by the output format's module in :mod:`dsconvert.formats`, and written through the shared streaming
writer (temp name + rename, resume manifest, progress). Everything the policy keeps is copied bit-identical
(FP8 tensors that are kept become BF16, the only float form of them a loader takes).

Output shards are layer-aligned: embeddings/head first, then each decoder layer's tensors (packed together up
to ``--max-shard-size``), so calibrated methods can write layer ``i`` as soon as it is quantized.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import BadInputError, UsageError
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..formats.deepseek_v3 import layer_index
from ..formats.hf_config import unquantized_config, version_label
from ..formats.int_format import IntFormat
from ..formats.kind import require_kind
from ..formats.registry import FORMATS, describe_formats, get_format
from ..formats.tokenizer_check import tokenizer_problems
from ..quant.rtn import QuantSpec
from ..quant.schemes import SCHEMES, Scheme, SchemeDescription, get_scheme
from ..report import base_report
from ..units import bytes_fields, count
from .int_module import ModuleResult, read_weight
from .files import extra_files
from .job import NOT_FINGERPRINTED, DirectoryOutput, option_fingerprint, preflight, write_directory
from .manifest import check_paths
from .executor import Executor, Job, LocalExecutor, Rebuilt, shard_units
from .pipeline import OutShard, OutTensor, check_max_memory, copy_producer, dequant_producer, source_order
from .policy import LayerPolicy, check_fused_groups, default_ignore, module_of
from .calibration_data import SIDECAR as CALIB_SIDECAR
from .progress import ByteProgress
from .fp8_to_bf16 import resolve_device
from .calibrated import STATE_NAME, calibrated_compute

COMMAND = "quantize"
QUANTIZE_BASE_RSS = 288 * 2**20  # interpreter + torch + the plan (VmHWM 0.19-0.27 GiB net of the module terms, run to run)
#: What to do instead, by the kind of checkpoint given (:func:`dsconvert.formats.kind.require_kind`).
INPUT_HINTS = {
    "int": "it is already quantized; quantize the FP8 release (or its BF16 copy) it was made from",
    "gguf": "quantize reads safetensors checkpoints; pass the FP8 release or a BF16 folder",
    "other": "pass DeepSeek's FP8 release or a BF16 checkpoint",
}


@dataclass
class Options:
    scheme: str = "W4A16"
    group_size: int | None = None  # None: the scheme's default
    # mixed recipes (compressed-tensors config groups); scheme is then the scheme of unmatched modules
    preset: str | None = None
    recipe: str | None = None  # recipe file path
    scheme_for: list[str] = field(default_factory=list)
    scheme_given: bool = True  # False: --scheme not on the command line (a preset/recipe keeps the rest BF16)
    scale_fmt: str | None = None  # FP8_BLOCK: None (amax / 448) or "ue8m0" (power-of-two scales)
    format: str = "compressed-tensors"
    checkpoint_format: str | None = None  # gptq only: gptq (v1, default) | gptq_v2
    method: str = "rtn"  # rtn | awq | gptq | autoround
    ignore: list[str] = field(default_factory=list)
    strict: bool = field(default=False, metadata=NOT_FINGERPRINTED)  # warnings become errors: no byte changes
    mtp: str = "keep"
    max_shard_size: int = 5 * 10**9
    device: str = field(default="auto", metadata=NOT_FINGERPRINTED)
    workers: int = field(default=1, metadata=NOT_FINGERPRINTED)
    chunk_bytes: int = field(default=32 * 2**20, metadata=NOT_FINGERPRINTED)
    max_memory: int | None = field(default=None, metadata=NOT_FINGERPRINTED)
    # calibration (awq/gptq)
    calib_data: str | None = None
    num_samples: int = 8
    seq_len: int = 128
    calib_seed: int = 0  # which windows of the calibration text are drawn (calibration_data.select_windows)
    expert_policy: str = "all-tokens"  # experts with few calibration tokens: all-tokens | rtn | topk
    iters: int = 200  # autoround: SignRound iterations per stage
    lr: float | None = None  # autoround: learning rate (None: 1 / iters)

    def fingerprinted(self) -> dict:
        d = option_fingerprint(self)
        if self.method != "autoround":  # unchanged fingerprint for the other methods
            d.pop("iters")
            d.pop("lr")
        if not (self.preset or self.recipe or self.scheme_for):  # unchanged fingerprint for single-scheme runs
            for k in ("preset", "recipe", "scheme_for", "scheme_given"):
                d.pop(k)
        elif self.recipe:
            d["recipe_text"] = Path(self.recipe).read_text() if Path(self.recipe).is_file() else None
        return d

    @property
    def per_module(self) -> bool:
        """Schemes are chosen per module (a recipe, or an FP4 scheme): the :mod:`.mixed` path."""
        from ..quant.fp4_schemes import FP4Scheme

        if self.preset or self.recipe or self.scheme_for:
            return True
        try:
            return isinstance(get_scheme(self.scheme), FP4Scheme)
        except KeyError:
            return False


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
    except KeyError:
        flag = "--checkpoint-format" if opts.checkpoint_format else "--format"
        close = FORMATS.suggest(name)
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise UsageError(f"unknown {flag} {name!r}", hint=guess + "formats: " + describe_formats()) from None


def resolve_scheme(opts: Options) -> tuple[Scheme, SchemeDescription]:
    """The scheme of ``--scheme`` and its description with ``--group-size`` / ``--scale-fmt`` applied.

    Raises:
        UsageError: unknown scheme (listing the choices), an option the scheme does not take, or a ``--method``
            that cannot produce the scheme.
    """
    try:
        scheme = get_scheme(opts.scheme)
    except KeyError:
        close = SCHEMES.suggest(opts.scheme)
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise UsageError(f"unknown --scheme {opts.scheme!r}", hint=guess + "schemes: " + SCHEMES.describe()) from None
    if opts.method not in scheme.methods:
        def flag(m: str) -> str:
            return "RTN (no flag)" if m == "rtn" else "--method autoround" if m == "autoround" else f"--{m}"

        raise UsageError(f"scheme {scheme.name} cannot be produced with {flag(opts.method)}",
                         hint=f"{scheme.name} takes: " + ", ".join(flag(m) for m in scheme.methods))
    return scheme, scheme.describe(opts.group_size, scale_fmt=opts.scale_fmt)


def resolve_spec(opts: Options):
    """The kernel spec (:class:`QuantSpec` or ``FP8BlockSpec``) of ``--scheme`` with its options.

    Raises:
        UsageError: as :func:`resolve_scheme`.
    """
    return resolve_scheme(opts)[1].spec


def bind_format(ck: Checkpoint, fmt: IntFormat, desc: SchemeDescription, opts: Options) -> IntFormat:
    """``fmt.bind(desc, module)`` for the first module the policy quantizes (named in the refusal).

    Raises:
        UsageError (exit 2): the format cannot store the scheme; nothing has been written.
    """
    probe = LayerPolicy(desc.spec, list(opts.ignore))
    first = next((module_of(n) for n in source_order(ck)
                  if not ck.is_scale(n) and not (opts.mtp == "drop" and ck.is_mtp(n))
                  and probe(n, ck.logical_shape(n)) is not None), None)
    return fmt.bind(desc, first)


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
    groups: list[dict] | None = None  # per config group (mixed / FP4 path): scheme, modules, bytes, bits/weight

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
            **({"config_groups": self.groups} if self.groups is not None else {}),
        }


def _recipe_summary(opts: Options, assign) -> dict:
    return {"default": assign.canonical(assign.recipe.default), "preset": opts.preset, "file": opts.recipe,
            "rules": [{"targets": list(r.targets), "scheme": assign.canonical(r.scheme) or "BF16", "from": r.origin}
                      for r in assign.recipe.rules]}


def _natural_key(name: str) -> tuple:
    """``experts.2`` before ``experts.10``: digit runs compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _layer_key(name: str, ck: Checkpoint | None = None) -> int:
    """Grouping key: -1 for embeddings and other non-layer tensors, else the block index, MTP blocks numbered
    after the main layers (V3: :func:`~dsconvert.formats.deepseek_v3.layer_index`; V4:
    :meth:`~dsconvert.formats.deepseek_v4.V4Geometry.block_of`)."""
    i = ck.v4.block_of(name) if ck is not None and ck.v4 is not None else layer_index(name)
    return -1 if i is None else i


def _is_quantized_source(ck: Checkpoint, name: str) -> bool:
    """FP8 (any family) or V4 FP4: a tensor read with its scale partner and dequantized."""
    return ck.entry(name).dtype == "F8_E4M3" or ck.is_fp4_weight(name)


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
              device: torch.device, replaced: Callable[[str], torch.Tensor | None] | None = None,
              assign=None) -> tuple[Plan, _ModuleCache]:
    """Plan from headers only; ``compute(module) -> ModuleResult`` produces a quantized module's tensors;
    ``replaced(name)`` (calibrated methods) returns a float tensor to write instead of a kept source tensor.

    Raises:
        ShapeError / UsageError: a group size that does not divide K, a spec the format cannot hold, a mixed
            fused group, an ``--ignore`` pattern matching nothing under ``--strict``.
    """
    if opts.mtp not in ("keep", "drop"):
        raise UsageError(f"--mtp {opts.mtp!r}", hint="use keep or drop")
    if assign is None:
        spec = resolve_spec(opts)
        fmt.supports(spec)
        _check_group_size(ck, spec, opts)
        policy = LayerPolicy(spec, list(opts.ignore))
    else:  # per-module schemes (convert/mixed.py): the assignment decides and plans each module
        policy = assign.policy
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
        shape = ck.logical_shape(name)
        total_params += ent.numel * (2 if ck.is_fp4_weight(name) else 1)
        src_bytes = ent.nbytes + (ck.entry(ck.scale_of(name)).nbytes if _is_quantized_source(ck, name) else 0)
        bytes_read += src_bytes
        s = policy(name, shape) if assign is None else assign(name, shape)
        if LayerPolicy.quantizable(name, shape):
            decisions[name] = s is not None
        outs: list[OutTensor]
        if s is not None:
            mod = module_of(name)
            # raises ShapeError with the module name
            plans = fmt.plan(mod, shape, spec) if assign is None else s.plan(mod, shape)
            outs = [OutTensor(p.name, p.safetensors_dtype, tuple(p.shape),
                              (lambda mod=mod, tn=p.name: iter([cache.take(mod, tn)])), "quantize", [name],
                              src_bytes if i == 0 else 0) for i, p in enumerate(plans)]
            quantized.append(mod)
            q_params += math.prod(shape)
            q_bytes += sum(p.nbytes for p in plans)
        elif _is_quantized_source(ck, name):
            outs = [OutTensor(name, "BF16", shape,
                              dequant_producer(ck, name, torch.bfloat16, device, opts.chunk_bytes), "dequant",
                              [name, ck.scale_of(name)], src_bytes)]
            kept.append(name)
        else:
            outs = [OutTensor(name, ent.dtype, ent.shape, copy_producer(ck, name, opts.chunk_bytes), "copy", [name],
                              src_bytes)]
            kept.append(name)
        if replaced is not None and s is None:
            outs[0].produce = _with_override(name, outs[0].produce, replaced, outs[0].dtype)
        units.setdefault(_layer_key(name, ck), []).append((name, outs))
    if assign is None:
        check_fused_groups(decisions)
    else:
        assign.check()
    # Canonical order inside a layer (natural name order), not the source's file order: the same weights give
    # the same bytes whether they come from the FP8 release or a re-sharded BF16 copy. A module's tensors stay
    # together, in the format's order.
    groups = {k: [t for _, outs in sorted(v, key=lambda u: _natural_key(u[0])) for t in outs]
              for k, v in units.items()}
    unmatched = policy.unmatched()
    if unmatched and opts.strict:
        what = "pattern" if len(unmatched) == 1 else "patterns"
        raise UsageError(f"--ignore {what} matched no quantizable module: {', '.join(unmatched)}",
                         hint="patterns match module names: the weight name without .weight, e.g. "
                              "model.layers.0.self_attn.kv_b_proj or re:.*kv_b_proj$ (the names are in "
                              "model.safetensors.index.json); or drop --strict")
    shards = _layer_aligned_shards(groups, opts.max_shard_size)
    cfg = unquantized_config(ck.config, "bfloat16")
    if ck.v4 is not None:
        cfg.pop("expert_dtype", None)  # the FP4/FP8 expert storage of the release, as fp8-to-bf16 drops it
    ignore_default = default_ignore(ck.v4 is not None)
    if opts.mtp == "drop":
        cfg["num_nextn_predict_layers"] = 0
    if assign is not None:
        from .mixed import mixed_quantization_config

        if not any(decisions.values()):
            raise UsageError("the recipe quantizes no module (every quantizable module would stay BF16)",
                             hint="check the --preset / --recipe / --scheme-for patterns against the module names")
        cfg["quantization_config"] = mixed_quantization_config(
            assign.groups(), ignore_default + sorted({module_of(n) for n, q in decisions.items() if not q}))
    else:
        cfg["quantization_config"] = fmt.model_quantization_config(
            spec, default_ignore=ignore_default, kept=sorted({module_of(n) for n, q in decisions.items() if not q}),
            modules=[module_of(n) for n in decisions])
    written = sum(s.nbytes for s in shards)
    largest = max((math.prod(ck.logical_shape(n)) for n in decisions), default=0)
    # one module resident: its BF16 form (2 B/element; the kernel widens row chunks of ~256k elements to fp32),
    # the int codes and their packed form (~1.5 B), the source bytes while dequantizing; plus the write queue.
    # Measured (the process's own VmHWM) at V4-Flash's real dimensions (wq_b, 33.5M elements): 0.37 GiB peak,
    # 0.37-0.44 GiB over runs (fresh-clone CI: 0.43-0.44), estimated 0.47 GiB (was 1.21 GiB); tiny fixture 0.27.
    peak = QUANTIZE_BASE_RSS + 4 * largest + 2 * opts.chunk_bytes
    plan = Plan(shards, dropped, extra_files(ck.root), cfg, quantized, kept, bytes_read, written, q_params, q_bytes,
                total_params, peak, unmatched)
    if assign is not None:
        from .mixed import describe_groups, passes_through

        numel = {module_of(n): math.prod(ck.logical_shape(n)) for n in decisions}
        mbytes: dict[str, int] = {}
        for outs in units.values():
            for _, ts in outs:
                for t in ts:
                    if t.action == "quantize":
                        m = t.name.rsplit(".", 1)[0]
                        mbytes[m] = mbytes.get(m, 0) + t.nbytes
        plan.groups = describe_groups(assign.groups(), numel.__getitem__, lambda m: mbytes.get(m, 0),
                                      lambda m: passes_through(ck, m, assign.module_codec[m]))
    return plan, cache


def _check_group_size(ck: Checkpoint, spec, opts: Options) -> None:
    """Refuse a group size that does not divide the in_features N of every tensor to quantize, naming the first
    such tensor and the largest group size that divides them all.

    Raises:
        ShapeError (exit 2).
    """
    from ..errors import ShapeError

    if not isinstance(spec, QuantSpec):
        return  # FP8 blocks take any shape: edge blocks are partial
    g = spec.group_size
    if g <= 0:
        return
    probe = LayerPolicy(spec, list(opts.ignore))
    ks: dict[str, int] = {}
    for name in source_order(ck):
        if not ck.is_scale(name) and not (opts.mtp == "drop" and ck.is_mtp(name)) \
                and probe(name, ck.logical_shape(name)):
            ks[module_of(name)] = int(ck.logical_shape(name)[1])
    bad = [(m, k) for m, k in ks.items() if k % g]
    if not bad:
        return
    fits = [c for c in (256, 128, 64, 32, 16, 8) if all(k % c == 0 for k in ks.values())]
    hint = (f"--group-size {fits[0]} divides the in_features of every tensor to quantize" if fits
            else "--group-size -1 (per channel)") + "; or --ignore the tensors whose N it does not divide"
    m, k = bad[0]
    raise ShapeError(f"group size {g} does not divide in_features N={k} of tensor {m!r} "
                     f"({count(len(bad), 'tensor')} affected)", hint=hint)


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


def rtn_compute(ck: Checkpoint, fmt: IntFormat, scheme: Scheme, desc: SchemeDescription, device: torch.device
                ) -> Callable[[str], ModuleResult]:
    """RTN: read (and dequantize) one weight, quantize with the scheme's kernel in the codec's storage, pack.

    ``fmt`` is the codec bound to ``desc`` (:func:`bind_format`). An FP8 source weight is dequantized first (the
    exact fp8-to-bf16 rule), so FP8_BLOCK from an FP8 source re-derives its scales from the dequantized weight
    instead of reusing (or re-rounding) the source's scales under its payload.
    """
    spec, storage = desc.spec, fmt.storage(desc)

    def compute(module: str) -> ModuleResult:
        name = module + ".weight"
        w = read_weight(ck, name).to(device)  # BF16 (FP8 dequantized), widened per chunk inside the kernel
        payload, err = scheme.quantize_with_error(w, spec, storage, name=module)
        return ModuleResult({k: v.cpu() for k, v in fmt.encode_qtensor(module, payload).items()}, err)

    return compute


FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn magnitude


def check_scale_overflow(ck: Checkpoint, modules: list[str], spec, fmt: IntFormat, *,
                         progress: bool | None = None, chunk_rows: int = 1024) -> None:
    """Refuse, before anything is written, a quantization whose group scale overflows the format's scale dtype
    (fp16 in the AutoAWQ and GPTQ layouts: a scale >= 65520 rounds to inf). A no-op for bf16-scale formats.

    FP8 source: ``|w| <= 448 * scale_inv`` of its 128x128 block (times ``1 + 2^-8`` for the bf16 rounding of the
    product), so :func:`~dsconvert.quant.rtn.scale_bound` over the largest ``scale_inv`` proves most tensors safe
    from their scales alone; only the others are dequantized and their exact group scales computed. BF16/F32
    source: every weight's exact group scales are computed, reading each weight once (progress on stderr).
    The check is exact for RTN; ``--awq``/``--gptq`` change the weights while calibrating, and a scale that
    overflows only after that is still refused by the kernel, naming the module.

    Raises:
        BadInputError (exit 3): naming the first tensor and its source file, the largest scale, how many tensors
            overflow; the hint names ``--format compressed-tensors`` (bf16 scales) and ``--ignore``.
    """
    from ..formats.safetensors_io import read_tensor
    from ..quant.fp8_block import dequant_fp8_block
    from ..quant.rtn import raw_group_scales, scale_bound, scale_overflows

    conv = getattr(fmt, "convention", None)
    if conv is None or conv.scale_dtype != torch.float16 or not isinstance(spec, QuantSpec):
        return  # bf16/fp8 scales, or a mixed recipe (its groups use compressed-tensors' bf16/fp8 scales)
    sdt = conv.scale_dtype
    names = [m + ".weight" for m in modules]
    need: list[str] = []
    for n in names:
        if ck.entry(n).dtype == "F8_E4M3":
            s_max = float(ck.read(ck.scale_of(n)).max())
            bound = scale_bound(FP8_E4M3_MAX * s_max * (1 + 2 ** -8), spec.bits)
            if not bool(scale_overflows(torch.tensor([bound]), sdt)):
                continue  # proven safe by the scales alone
        need.append(n)
    bad: list[tuple[str, int, float]] = []  # (weight, groups overflowing, largest scale)
    with ByteProgress(sum(ck.entry(n).nbytes for n in need), f"{COMMAND}: fp16 scale check",
                      enabled=progress if need else False) as bar:
        for n in need:
            ent = ck.entry(n)
            m = int(ent.shape[0])
            bm = ck.fp8.block[0] if ck.fp8 is not None else 1
            step = max(bm, chunk_rows // bm * bm)  # whole FP8 block-rows per chunk
            count, top = 0, 0.0
            scale = ck.read(ck.scale_of(n)) if ent.dtype == "F8_E4M3" else None
            bar.describe(n, boundary=False)
            with open(ck.path_of(n), "rb") as f:
                for r0 in range(0, m, step):
                    r1 = min(m, r0 + step)
                    w = read_tensor(f, ent, (r0, r1))
                    if scale is not None:
                        w = dequant_fp8_block(w, scale[r0 // bm: -(-r1 // bm)], ck.fp8.block)
                    sc = raw_group_scales(w, spec, conv)
                    over = scale_overflows(sc, sdt)
                    count += int(over.sum())
                    top = max(top, float(sc.max()))
                    bar.advance(ent.nbytes * (r1 - r0) // m)
            if count:
                bad.append((n, count, top))
    if not bad:
        return
    n, count, top = bad[0]
    more = f"; {len(bad) - 1} more tensors overflow too" if len(bad) > 1 else ""
    pats: list[str] = []
    for b in bad:
        for p in _ignore_patterns(module_of(b[0]), modules):
            if p not in pats:
                pats.append(p)
    ignore = " ".join(f"--ignore '{p}'" if p.startswith("re:") else f"--ignore {p}" for p in pats[:3]) \
        + (" ..." if len(pats) > 3 else "")
    raise BadInputError(f"{ck.path_of(n)}: tensor {n!r}: {count} group scales overflow float16 in the {fmt.name} "
                        f"layout (largest {top:.6g}; float16 holds at most 65504){more}",
                        hint=f"use --format compressed-tensors (bfloat16 scales), or keep the module in BF16 with "
                             f"{ignore}")


def _ignore_patterns(module: str, modules: list[str]) -> list[str]:
    """The ``--ignore`` patterns that keep ``module`` in BF16 together with the members of its fused group (a
    group must share one precision: :func:`~.policy.check_fused_groups`): all routed experts of a layer as one
    regex, else the members by name."""
    from .policy import fused_group

    g = fused_group(module + ".weight")
    if g is None:
        return [module]
    if "routed experts" in g:
        prefix = module.split(".experts.", 1)[0] + ".experts."
        return ["re:" + re.escape(prefix) + r"\d+\."]
    return [m for m in modules if fused_group(m + ".weight") == g]


def _error_summary(errors: dict[str, float]) -> dict:
    if not errors:
        return {}
    vals = sorted(errors.values())
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:10]
    return {"modules": len(vals), "mean": sum(vals) / len(vals), "median": vals[len(vals) // 2], "max": vals[-1],
            "worst": [{"module": m, "rel_rms_error": e} for m, e in worst]}


def rebuild(src: str, opts: Options, input_amax: dict[str, float] | None = None) -> Rebuilt:
    """The RTN plan's output shards for ``src``, rebuilt where a remote unit runs (a Ray worker: same SRC path,
    same options, hence the same plan), with each shard's per-module relative RMS errors as its extras.
    Per-module schemes (a recipe, FP4) rebuild the same :mod:`.mixed` assignment; ``input_amax`` is the
    driver's NVFP4 W4A4 input calibration (module -> absmax), which workers do not recompute."""
    ck = open_checkpoint(Path(src), check_values=False)
    device = resolve_device(opts.device)
    if opts.per_module:
        from .mixed import mixed_setup

        fmt = resolve_format(opts)
        assign, compute = mixed_setup(ck, opts, fmt, device, read_weight)
        plan, cache = make_plan(ck, opts, fmt, compute, device, assign=assign)  # makes the codecs
        if input_amax is not None:
            assign.set_input_amax(input_amax)
    else:
        scheme, desc = resolve_scheme(opts)
        fmt = bind_format(ck, resolve_format(opts), desc, opts)
        plan, cache = make_plan(ck, opts, fmt, rtn_compute(ck, fmt, scheme, desc, device), device)

    def extras(shard: OutShard) -> dict:
        mods = {module_of(t.sources[0]) for t in shard.tensors if t.action == "quantize"}
        return {m: cache.errors[m] for m in sorted(mods) if m in cache.errors}

    return shard_units(plan.shards, extras)


def _refuse_v4_options(ck: Checkpoint, opts: Options) -> None:
    """What ``quantize`` does not do for a DeepSeek-V4 release yet: AWQ/GPTQ with a recipe or FP4 scheme,
    formats other than compressed-tensors (and, checked after the recipe is built, NVFP4 W4A4's input
    calibration). ``--gptq`` / ``--awq`` with one integer scheme run :class:`~.calibrate_v4.V4CalibrationEngine`.

    Raises:
        UsageError (exit 2): naming what works for V4 (RTN or GPTQ W4A16/W8A16 and the other single schemes in
            compressed-tensors).
    """
    works = ("V4 quantizes with RTN to one --scheme (W4A16, W8A16, ...) or a recipe (--preset experts-mxfp4 "
             "keeps the release's FP4 experts as MXFP4 byte for byte) in --format compressed-tensors")
    if opts.method == "autoround":
        raise UsageError("--method autoround on a DeepSeek-V4 checkpoint is not supported (its SignRound forward "
                         "is the DeepSeek-V2/V3 decoder layer)", hint="use --gptq or --awq for V4, or RTN")
    if opts.method != "rtn" and opts.per_module:
        raise UsageError(f"--{opts.method} on a DeepSeek-V4 checkpoint takes one integer --scheme (W4A16, W8A16)",
                         hint=f"drop the recipe / FP4 scheme, or drop --{opts.method} for RTN")
    if FORMATS.canonical(opts.format) != "compressed-tensors":
        raise UsageError(f"--format {opts.format} on a DeepSeek-V4 checkpoint is not supported", hint=works)


def run(src: Path, out: Path | None, opts: Options, *, dry_run: bool = False, overwrite: bool = False,
        resume: bool = True, progress: bool | None = None, verify: str = "full",
        executor: Executor | None = None) -> dict:
    """Quantize ``src`` into ``out``; returns the JSON report (also ``out/report.json``). ``verify`` (``full`` |
    ``size``) is how a rerun checks the files already finished (docs/cli-conventions.md, Resume).

    ``executor`` runs the shard units (default: ``opts.workers`` threads here; :mod:`.executor` for Ray). A
    calibrated method quantizes layer after layer on the driver and writes the shards there; with a Ray
    executor each MoE layer's routed expert groups run as units on the cluster (:mod:`.calib_ray`).

    Raises:
        BadInputError / UnsupportedError (exit 3), UsageError / ShapeError / OutputExistsError (exit 2).
    """
    t0 = time.perf_counter()
    src = Path(src)
    if opts.method not in ("rtn", "awq", "gptq", "autoround"):
        raise UsageError(f"--method {opts.method!r}", hint="use rtn, awq, gptq or autoround")
    if opts.method == "autoround" and (opts.iters < 0 or (opts.lr is not None and opts.lr <= 0)):
        raise UsageError(f"--method autoround with --iters {opts.iters} --lr {opts.lr}",
                         hint="--iters >= 0 and --lr > 0 (default 1 / iters)")
    executor = executor or LocalExecutor(opts.workers)
    calib_remote = None  # calibrated on Ray: the expert groups are the units, the shards are written here
    if opts.method != "rtn":
        if executor.remote:
            calib_remote = executor
        executor = LocalExecutor(1)  # layer by layer: one shard at a time
    if out is not None:
        check_paths(src, Path(out))
    device = resolve_device(opts.device)
    base_fmt = resolve_format(opts)
    scheme, desc = resolve_scheme(opts)  # an unknown scheme is a usage error before SRC is read
    # canonical names from here on (report, manifest, messages): --format awq is reported as autoawq
    opts = replace(opts, format=FORMATS.canonical(opts.format), scheme=SCHEMES.canonical(opts.scheme),
                   checkpoint_format=FORMATS.canonical(opts.checkpoint_format) if opts.checkpoint_format else None)
    require_kind(src, COMMAND, ("fp8", "float"), "DeepSeek's FP8 release or an unquantized (BF16) checkpoint",
                 INPUT_HINTS)
    ck = open_checkpoint(src, check_values=not dry_run)
    if ck.v4 is not None:
        _refuse_v4_options(ck, opts)
    engine = assign = None
    if opts.per_module:  # FP4 schemes and mixed recipes: a codec per module (convert/mixed.py)
        from .mixed import mixed_setup

        assign, compute = mixed_setup(ck, opts, base_fmt, device, read_weight)
        fmt, spec = base_fmt, None
    else:
        fmt = bind_format(ck, base_fmt, desc, opts)
        spec = desc.spec
        if opts.method == "rtn":
            compute = rtn_compute(ck, fmt, scheme, desc, device)
        else:
            compute, engine = calibrated_compute(ck, fmt, spec, opts, device)
            if calib_remote is not None:  # the MoE layers' expert groups as units (convert/calib_ray.py)
                engine.use_ray(calib_remote, str(src.resolve()))
    plan, cache = make_plan(ck, opts, fmt, compute, device, engine.replaced if engine is not None else None,
                            assign=assign)
    if ck.v4 is not None and assign is not None and assign.needs_input_calibration():  # codecs exist from here
        raise UsageError("NVFP4 W4A4 on a DeepSeek-V4 checkpoint: its input scales are calibrated with the "
                         "DeepSeek-V3 forward only", hint="use NVFP4A16, MXFP4 or an integer scheme for V4")
    if engine is not None:  # which calibration data: in the output's config (docs/int-formats.md §16)
        plan.config["quantization_config"] = fmt.record_calibration(plan.config["quantization_config"],
                                                                    engine.record)
    if engine is not None:  # calibration holds activations and a layer's working set, not one module
        engine.fit_memory(None if opts.max_memory is None else opts.max_memory - plan.peak_memory)
        plan.peak_memory += engine.peak_memory_estimate()
    report = base_report(COMMAND)
    report.update({
        "source": {"path": str(src), "family": version_label(ck.config), "format": "fp8-block" if ck.fp8 else "float",
                   "tensors": len(ck.tensors)},
        "options": {**asdict(opts), "device": str(device)},
        "scheme": ({"name": desc.name, "bits": desc.weights.bits,
                    "group_size": spec.group_size if isinstance(spec, QuantSpec) else None,
                    "symmetric": desc.weights.symmetric, **desc.to_dict()}
                   if assign is None else {"name": assign.canonical(assign.recipe.default),
                                           "recipe": _recipe_summary(opts, assign)}),
        "format": fmt.name,
        "quantization_config": plan.config["quantization_config"],
        "dry_run": dry_run,
        "plan": plan.summary(),
    })
    if plan.ignore_unmatched:
        report["warnings"] = [f"--ignore {p!r} matched no quantizable module" for p in plan.ignore_unmatched]
    if assign is not None:
        for r in assign.recipe.unmatched_rules([module_of(n) for n in assign.decisions]):
            report.setdefault("warnings", []).append(f"recipe rule {list(r.targets)} -> {r.scheme or 'BF16'} "
                                                     f"({r.origin}) matched no quantizable module")
    report.setdefault("warnings", []).extend(p.to_dict() for p in tokenizer_problems(ck.root, ck.config))
    if not report["warnings"]:
        del report["warnings"]
    check_max_memory(plan.peak_memory, opts.max_memory,
                     hint="the largest module is quantized in float32 (calibrated methods: one layer's "
                          "activations and working set; lower --num-samples/--seq-len); raise --max-memory")
    preflight(out, plan.shards, report, dry_run=dry_run)  # also on --dry-run: before OUT/manifest.json exists
    if dry_run:
        return report
    if assign is not None and assign.needs_input_calibration():
        from .calib_data import calibration_ids
        from .mixed import input_absmax

        seqs, _ = calibration_ids(ck, opts.calib_data, opts.num_samples, opts.seq_len)
        targets = {m for m, c in assign.module_codec.items() if getattr(c, "layout", None) is not None
                   and c.layout.static_input_scale}
        assign.set_input_amax(input_absmax(ck, targets, seqs))
        report["calibration"] = {"purpose": "NVFP4 input_global_scale", "sequences": len(seqs),
                                 "tokens": sum(len(q) for q in seqs),
                                 "modules_observed": sum(1 for m in targets if m in assign.input_amax),
                                 "modules_unobserved": sorted(m for m in targets if m not in assign.input_amax)[:20]}
    if out is None:
        raise UsageError("missing -o/--output", hint="dsconvert quantize SRC -o OUT --scheme W4A16")
    check_scale_overflow(ck, plan.quantized_modules, spec, fmt, progress=progress)  # before OUT/manifest.json
    out = Path(out)
    qcfg = plan.config["quantization_config"]
    sidecars = {name: (json.dumps(doc, indent=2) + "\n").encode() for name, doc in fmt.sidecar_files(qcfg).items()}
    if engine is not None:  # the calibration windows' span hashes, for validate's overlap check
        sidecars[CALIB_SIDECAR] = lambda: (json.dumps(engine.sidecar()) + "\n").encode()

    def add_errors(report: dict) -> dict:
        report["quantization_error"] = _error_summary(cache.errors)
        if engine is not None:
            report["calibration"] = engine.report()
        if calib_remote is not None:  # where the expert groups ran (the shards were written here)
            report["executor"] = {**calib_remote.report(), "shards_written_by": "driver"}
        return {"module_errors": dict(sorted(cache.errors.items(), key=lambda kv: _natural_key(kv[0])))}

    with calib_remote.session() if calib_remote is not None else contextlib.nullcontext():
        report = write_directory(
            COMMAND, src, out, DirectoryOutput(plan.shards, plan.config, plan.files, sidecars, owned=(CALIB_SIDECAR,)), opts.fingerprinted(),
            report, executor=executor, job=Job(rebuild, (str(src.resolve()), opts, assign.input_amax if assign is not None else None)), t0=t0, overwrite=overwrite,
            resume=resume, verify=verify, progress=progress, on_extras=cache.errors.update,
            on_resume=None if engine is None else (lambda d: engine.resume(out, d.done, plan.shards)),
            on_finally=None if engine is None else engine.close,  # spilled expert results, finished or interrupted
            on_report=add_errors)
    (out / STATE_NAME).unlink(missing_ok=True)  # calibration resume state is only needed until completion
    return report

