"""``dsconvert gguf``: a DeepSeek-V3/R1 checkpoint (FP8 release or BF16) -> llama.cpp ``deepseek2`` GGUF, a
DeepSeek-V4 release -> ``deepseek4`` GGUF.

The architecture is a registry entry (:mod:`dsconvert.formats.gguf_arch`: tensor plan, types, KV pairs, file
type, refused options); everything below is shared by both.

Plan (headers only: GGUF tensor plan, per-tensor ggml type, bytes, splits, header bytes) -> pre-flight ->
stream one output tensor at a time, one row chunk at a time -> ``*.tmp`` + fsync + rename per file.

Numerics (docs/gguf-deepseek2.md §4, docs/known-failures.md item 16/17):

* an FP8 weight is dequantized to the exact float32 product ``fp32(w) * scale`` (``fp8-to-bf16``'s producer,
  stopped before its bf16 rounding), as llama.cpp's converter does; BF16 sources are read as stored;
* BF16 output rounds that product to bf16 once (RNE: the bytes ``fp8-to-bf16`` writes) or writes a BF16
  source's bytes unchanged; F32/F16/quantized outputs take the float32 values to the type's quantizer
  (:mod:`dsconvert.quant.ggml`, byte-compatible with ``ggml-quants.c``), which is what ``convert_hf_to_gguf.py``
  + ``llama_model_quantize`` do from the same checkpoint. So a quantized file from the FP8 release differs from
  one made from its BF16 conversion: rounding the product to bf16 first measurably hurts (docs/gguf-deepseek2.md
  §4);
* norms, 1-D tensors, ``ffn_gate_inp`` and ``exp_probs_b.bias`` are F32 whatever the type.

File layout: gguf-py's ``GGUFWriter`` serializes the header, KV pairs and tensor infos of each file (with
llama.cpp's split keys ``split.no``/``split.count``/``split.tensors.count`` when split); the data section is
written here, tensor by tensor in row chunks, each tensor padded to ``general.alignment`` (32), exactly as
``GGUFWriter.write_tensor_data`` lays it out. Peak memory is one row chunk plus the quantizer's temporaries
(and one ``kv_b_proj``), never one whole stacked expert tensor and never the model.

Splits (``--split-max-size``, decimal units) follow ``GGUFWriter``'s rule (a new file when the next tensor
would push the current one's tensor bytes over the limit) and llama.cpp's names ``STEM-00001-of-0000N.gguf``.
Finished files are recorded (size + sha256) in ``FILE.dsconvert-manifest.json`` (beside the file, or in
``--state-dir DIR``, with the report ``FILE.dsconvert-report.json``), so an interrupted run resumes with the
files it has not finished; a manifest for another source or other options is refused, naming what differs. The
file in flight resumes from its last complete tensor: its ``.tmp`` is kept with a sidecar
``NAME.gguf.dsconvert-partial.json`` (the tensors complete so far and their sha256), verified on resume.

The MTP block (layers >= ``num_hidden_layers``) is dropped, as llama.cpp's converter does, and reported.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from ..errors import BadInputError, OutputExistsError, UnsupportedError, UsageError
from ..formats import gguf_deepseek2 as g2
from ..formats import gguf_deepseek4 as g4
from ..formats.gguf_arch import DEEPSEEK2, GGUFArch, arch_for
from ..formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from ..formats.gguf_imatrix import read_imatrix as load_imatrix
from ..formats.gguf_recipes import get_recipe
from ..formats.gguf_types import (FTYPE_NAMES, default_type, normalize_ftype, parse_tensor_type_override,
                                  requires_imatrix, tensor_allows_quantization)
from ..formats.hf_config import version_label
from ..formats.kind import require_kind
from ..formats.safetensors_io import read_tensor, sha256_file
from ..formats.tokenizer_check import tokenizer_problems
from ..quant import ggml
from ..quant.ggml.native import NativeGGML
from ..report import base_report, peak_rss_bytes
from ..units import bytes_fields, fmt_bytes
from .fp8_to_bf16 import resolve_device
from .pipeline import check_max_memory, dequant_producer
from ..quant.fp4_decode import dequant_fp4
from . import cancel
from .preflight import check_free_disk, check_output_writable
from .manifest import (Manifest, OutputLocation, ResumeDecision, check_paths, commit_tmp, decide_resume,
                       fingerprint, source_fingerprint_parts, write_atomic)
from .executor import Executor, Job, LocalExecutor, Rebuilt
from .progress import ByteProgress
from .gguf_encode import PIECE_CHUNKS, encode, rows as _rows  # noqa: F401  (PIECE_CHUNKS: re-export)

log = logging.getLogger(__name__)

COMMAND = "gguf"
LAYOUT = DEEPSEEK2.layout
MANIFEST_SUFFIX = ".dsconvert-manifest.json"
REPORT_SUFFIX = ".dsconvert-report.json"
SPLIT_NAME = "{stem}-{i:05d}-of-{n:05d}.gguf"  # gguf-py SHARD_NAME_FORMAT / llama_split_path
BASE_RSS = 288 * 2**20  # interpreter + torch + the plan (VmHWM, net of the vocab and chunk terms)
VOCAB_ENTRY_RSS = 1280  # bytes per token while the vocab is built and serialized (129,280 tokens: ~0.15 GiB)

#: What to do instead, by the kind of checkpoint given (:func:`dsconvert.formats.kind.require_kind`).
INPUT_HINTS = {
    "int": "export the FP8 release (or its BF16 copy) the INT checkpoint was made from; for 4 bits use "
           "--type Q4_K_M",
    "gguf": "it is already a GGUF; to change its type use llama-quantize, or export from the FP8/BF16 source",
    "other": "pass DeepSeek's FP8 release or a BF16 checkpoint",
}


@dataclass
class GGUFOptions:
    """Options of one export; :meth:`fingerprinted` lists those that change the output bytes."""

    type: str | None = None  # None: the recipe's file type, else BF16
    tensor_types: list[str] = field(default_factory=list)  # "PATTERN=TYPE", first match wins
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    imatrix: Path | None = None
    split_max_size: int | None = None  # bytes of tensor data per file (decimal units on the CLI)
    split_max_tensors: int | None = None
    device: str = "auto"
    chunk_bytes: int = 32 * 2**20  # float32 input bytes quantized at once (two halves in flight on CPU)
    threads: int | None = None  # torch threads while writing (--threads); None: every core; not fingerprinted
    kernel: str = "auto"  # block quantizer on CPU (--kernel): "auto", "ggml" or "torch"; same bytes, not fingerprinted
    max_memory: int | None = None
    state_dir: Path | None = None  # where the manifest and report go (default: beside the .gguf); not fingerprinted
    recipe: str | None = None  # a named recipe (formats/gguf_recipes.py), expanded by :meth:`resolved`
    target_size: int | None = None  # bytes of tensor data: per-tensor types chosen by sensitivity (_budget_types)
    sensitivity: str = "forward"  # with target_size: "forward" (gguf_sensitivity) or "weights" (sampled weight error)
    sensitivity_samples: int = 4  # calibration windows of the forward measurement
    sensitivity_seq_len: int = 128  # tokens per window

    def resolved(self) -> "GGUFOptions":
        """These options with the recipe spelled out (idempotent): its file type unless ``type`` is given, its
        ``--tensor-type`` rules after the user's (so the user's win). What is fingerprinted and reported is the
        expanded form.

        Raises:
            UsageError (exit 2): unknown recipe.
        """
        if self.recipe is None:  # --target-size alone: a Q4_K_M file (its general.file_type) of chosen types
            return self if self.type is not None else replace(self, type="Q4_K_M" if self.target_size else "BF16")
        r = get_recipe(self.recipe)
        return replace(self, recipe=None, type=self.type or r.type, tensor_types=[*self.tensor_types, *r.tensor_types])

    def fingerprinted(self) -> dict:
        return {"type": self.type, "tensor_types": list(self.tensor_types),
                "output_tensor_type": self.output_tensor_type, "token_embedding_type": self.token_embedding_type,
                "pure": self.pure, "imatrix": sha256_file(self.imatrix) if self.imatrix else None,
                "split_max_size": self.split_max_size, "split_max_tensors": self.split_max_tensors,
                **({"target_size": self.target_size, "sensitivity": self.sensitivity,
                    "sensitivity_samples": self.sensitivity_samples, "sensitivity_seq_len": self.sensitivity_seq_len}
                   if self.target_size is not None else {}),
                # what an FP8 weight is quantized from; files of earlier versions (bf16-rounded) are not resumed
                "fp8_input": "float32"}


def type_names() -> dict[str, list[str]]:
    """The ``--type`` values, from the registries: ``types`` (ggml types dsconvert has a quantizer for and that
    ``--type`` takes alone), ``mixes`` (llama-quantize file-type mixes whose default type dsconvert can write:
    Q2_K_S, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M), ``unsupported`` (file types llama-quantize
    knows but dsconvert has no quantizer for yet: TQ1_0, TQ2_0, MXFP4_MOE). Sources: ``FTYPE_NAMES`` of
    :mod:`dsconvert.formats.gguf_types` and :func:`dsconvert.quant.ggml.registered_types`."""
    have = ggml.registered_types()
    pure = pure_types()
    ok = {n for n in FTYPE_NAMES if default_type(n) in have and _mix_types(n) <= set(have)}
    return {"types": [t for t in have if (t in ok if t in FTYPE_NAMES else t in pure)],
            "mixes": [n for n in FTYPE_NAMES if n not in have and n in ok],
            "unsupported": [n for n in FTYPE_NAMES if n not in ok]}


def _v3_probe() -> list[tuple[str, tuple[int, ...]]]:
    """One tensor of every kind a DeepSeek-V3 deepseek2 GGUF holds, at the real shapes, on the layers where
    llama.cpp's mix rules differ (first, early, middle, late, last)."""
    D, V, E, I, Id, H = 7168, 129280, 256, 2048, 18432, 128
    out = [("token_embd.weight", (V, D)), ("output.weight", (V, D)), ("output_norm.weight", (D,))]
    for b in (0, 1, 2, 3, 7, 30, 52, 59, 60):
        p = f"blk.{b}."
        out += [(p + "attn_norm.weight", (D,)), (p + "attn_q_a.weight", (1536, D)), (p + "attn_q_b.weight", (H * 192, 1536)),
                (p + "attn_kv_a_mqa.weight", (576, D)), (p + "attn_k_b.weight", (H, 512, 128)),
                (p + "attn_v_b.weight", (H, 128, 512)), (p + "attn_output.weight", (D, H * 128))]
        if b < 3:
            out += [(p + "ffn_gate.weight", (Id, D)), (p + "ffn_up.weight", (Id, D)), (p + "ffn_down.weight", (D, Id))]
        else:
            out += [(p + "ffn_gate_exps.weight", (E, I, D)), (p + "ffn_up_exps.weight", (E, I, D)),
                    (p + "ffn_down_exps.weight", (E, D, I)), (p + "ffn_gate_shexp.weight", (I, D)),
                    (p + "ffn_up_shexp.weight", (I, D)), (p + "ffn_down_shexp.weight", (D, I))]
    return out


@functools.lru_cache(maxsize=None)
def _mix_types(ftype: str) -> frozenset[str]:
    """Every ggml type llama.cpp's rules give a DeepSeek-V3 tensor in an ``ftype`` file, with or without an
    imatrix (:func:`_v3_probe`): a mix is writable only when dsconvert has a quantizer for all of them (IQ2_M puts
    IQ3_S on some tensors)."""
    got: set[str] = set()
    for imx in (False, True):
        got |= set(g2.plan_types(_v3_probe(), ftype, n_layer=61, n_expert=256, n_gqa=128, fallback_f16=True,
                                 has_imatrix=imx).values())
    return frozenset(got)


def pure_types() -> dict[str, str]:
    """``--type`` values that name one ggml type without a llama-quantize file type of that name: the ``_M`` mix
    with that default type under ``--pure`` (``Q4_K`` = ``Q4_K_M --pure``: every quantizable tensor gets Q4_K,
    shape fallbacks still apply)."""
    return {t: f"{t}_M" for t in ggml.registered_types()
            if t not in FTYPE_NAMES and f"{t}_M" in FTYPE_NAMES and default_type(f"{t}_M") == t}


def type_help() -> str:
    """``--type``'s help text, built from :func:`type_names`."""
    n = type_names()
    pure = ", ".join(f"{t} = {m} --pure" for t, m in pure_types().items())
    return (f"a ggml type ({' '.join(n['types'])}) or a llama-quantize mix ({' '.join(n['mixes'])}), "
            f"case-insensitive; {pure}; not supported yet: {' '.join(n['unsupported'])}")


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def resolve_type(name: str) -> tuple[str, bool]:
    """``--type`` -> (llama-quantize ftype name, forced pure). ``Q4_K`` is ``Q4_K_M --pure``, ...

    Raises:
        UsageError: a file type dsconvert cannot write yet (names it and the missing quantizer), or an
            unknown name (lists every type and mix, with the closest names as "did you mean").
    """
    import difflib

    key = name.strip().upper().replace("-", "_")
    pure = pure_types()
    if key in pure:
        return pure[key], True
    n = type_names()
    choices = f"types: {', '.join(n['types'])}; mixes: {', '.join(n['mixes'])}"
    try:
        ftype = normalize_ftype(key)
    except UsageError:
        close = difflib.get_close_matches(key, n["types"] + n["mixes"] + n["unsupported"], n=3, cutoff=0.6)
        guess = f"did you mean {_either(close)}? " if close else ""
        raise UsageError(f"unknown --type {name!r}", hint=guess + choices) from None
    if ftype in n["unsupported"]:
        family = "IQ" if ftype.startswith("IQ") else "TQ" if ftype.startswith("TQ") else "MXFP4"
        imx = " --imatrix FILE" if family == "IQ" else ""
        have = [t for t in n["types"] if t.startswith(family)]
        which = f"{family} types other than {', '.join(have)}" if have else f"{family} types"
        lacking = sorted(t for t in _mix_types(ftype) | {default_type(ftype)} if t not in ggml.registered_types())
        raise UsageError(f"--type {ftype}: {which} are not supported yet (dsconvert has no "
                         f"{', '.join(lacking)} quantizer)",
                         hint=f"write a BF16 or Q8_0 GGUF with dsconvert, then `llama-quantize{imx} IN.gguf OUT.gguf "
                              f"{ftype}`; dsconvert writes {choices}")
    return ftype, False


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


@dataclass
class OutFile:
    """One output file: its tensors (file order), the serialized header (magic .. tensor infos)."""

    path: Path
    tensors: list[g2.GGUFTensorPlan]
    header: bytes
    tensor_bytes: int  # unpadded
    size: int  # exact file size, padding included

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class ExportPlan:
    """Everything the export does, computed from headers, config and tokenizer only."""

    ck: Checkpoint
    ftype: str
    pure: bool
    gguf_plan: g2.GGUFPlan
    types: dict[str, str]  # gguf name -> ggml type
    nbytes: dict[str, int]  # gguf name -> tensor bytes
    files: list[OutFile]
    vocab: dict
    imatrix: dict  # what the report says about --imatrix
    peak_memory: int
    #: gguf name -> float32 ``[n_mat, n_per_row]`` importance weights for the tensors whose type uses them
    importance: dict = field(default_factory=dict, repr=False)
    #: ``--target-size``: what was chosen and why (:func:`_budget_types`); None without it
    budget: dict | None = None
    arch: GGUFArch = DEEPSEEK2

    @property
    def tensor_bytes(self) -> int:
        return sum(self.nbytes.values())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def type_summary(self) -> dict:
        out: dict[str, dict] = {}
        for t in self.gguf_plan:
            d = out.setdefault(self.types[t.name], {"tensors": 0, "elements": 0, "bytes": 0})
            d["tensors"] += 1
            d["elements"] += t.n_elements
            d["bytes"] += self.nbytes[t.name]
        return dict(sorted(out.items()))

    def dropped_summary(self) -> dict:
        """MTP & co.: tensor count, bytes (their FP8 scales included) and the reasons, docs/known-failures.md item 18."""
        rows = []
        for d in self.gguf_plan.dropped:
            scale = self.ck.scale_of(d.hf_name)
            sbytes = self.ck.entry(scale).nbytes if scale in self.ck.tensors else 0
            rows.append({"name": d.hf_name, "shape": list(d.shape), "dtype": d.dtype, "bytes": d.nbytes + sbytes,
                         "scale_inv": scale if sbytes else None, "reason": d.reason})
        reasons = Counter(r["reason"] for r in rows)
        return {"tensors": len(rows), "scales": sum(1 for r in rows if r["scale_inv"]),
                **bytes_fields(sum(r["bytes"] for r in rows)),
                "reasons": [{"reason": k, "tensors": v} for k, v in reasons.items()], "list": rows}

    def summary(self) -> dict:
        n_el = self.gguf_plan.n_elements
        return {
            "layout": self.arch.layout,
            "architecture": self.arch.name,
            "type": self.ftype + (" (pure)" if self.pure else ""),
            "file_type": self.arch.file_type(self.ftype),
            "tensors": len(self.gguf_plan),
            "elements": n_el,
            "types": self.type_summary(),
            "tensor_bytes": bytes_fields(self.tensor_bytes),
            "total_size": bytes_fields(self.total_size),
            "bpw": round(8 * self.tensor_bytes / n_el, 4) if n_el else None,
            "files": [{"name": f.name, "tensors": len(f.tensors), "header_bytes": len(f.header),
                       **bytes_fields(f.size)} for f in self.files],
            "dropped": self.dropped_summary(),
            "vocab": self.vocab,
            "imatrix": self.imatrix,
            "peak_memory_estimate": bytes_fields(self.peak_memory),
            "disk_needed": bytes_fields(self.total_size),
            **({"target_size": self.budget} if self.budget is not None else {}),
        }


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _source_format(ck: Checkpoint) -> str:
    return "FP8" if ck.fp8 is not None and any(e.dtype == "F8_E4M3" for _, e in ck.tensors.values()) else "BF16"


def _split(tensors: list[g2.GGUFTensorPlan], nbytes: dict[str, int], max_size: int | None,
           max_tensors: int | None) -> list[list[g2.GGUFTensorPlan]]:
    """GGUFWriter.add_tensor_info's rule: a new file when the current one is non-empty and adding the next
    tensor would exceed ``max_tensors`` tensors or ``max_size`` tensor bytes (unpadded)."""
    groups: list[list[g2.GGUFTensorPlan]] = [[]]
    size = 0
    for t in tensors:
        cur = groups[-1]
        if cur and ((max_tensors and len(cur) >= max_tensors) or (max_size and size + nbytes[t.name] > max_size)):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes[t.name]
    return groups


def file_names(output: Path, n: int) -> list[Path]:
    """``[FILE]`` or llama.cpp's split names ``STEM-00001-of-0000N.gguf`` next to FILE."""
    if n == 1:
        return [output]
    return [output.with_name(SPLIT_NAME.format(stem=output.stem, i=i + 1, n=n)) for i in range(n)]


def _serialize_header(w: gguf.GGUFWriter) -> bytes:
    """Header + KV + tensor infos exactly as ``GGUFWriter`` writes them (its public ``write_*_to_file`` calls,
    into a scratch file in a private temporary directory), returned as bytes."""
    with tempfile.TemporaryDirectory(prefix="dsconvert-gguf-header-") as d:
        scratch = Path(d) / "header.gguf"
        w.write_header_to_file(scratch)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return scratch.read_bytes()


def _writer_for(i: int, n: int, files: list[list[g2.GGUFTensorPlan]], types: dict[str, str],
                nbytes: dict[str, int], meta_fn, arch: str = g2.ARCH_NAME) -> gguf.GGUFWriter:
    """A GGUFWriter holding file ``i``'s KV pairs and tensor infos (split keys as gguf-py's
    ``add_shard_kv_data``: the model KV only in the first file)."""
    w = gguf.GGUFWriter(None, arch)
    if i == 0:
        meta_fn(w)
    else:
        w.kv_data[0].clear()  # gguf-py writes only the split keys into later files
    if n > 1:
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, i)
        w.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, n)
        w.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, sum(len(f) for f in files))
    for t in files[i]:
        qt = gguf.GGMLQuantizationType[types[t.name]]
        # byte shape: numpy shape with ne0 replaced by its row bytes (GGUFWriter converts it back)
        byte_shape = (*t.shape[:-1], nbytes[t.name] // max(1, math.prod(t.shape[:-1])))
        w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes[t.name], raw_dtype=qt)
    return w


def make_plan(ck: Checkpoint, opts: GGUFOptions, output: Path | None, progress: bool | None = False) -> ExportPlan:
    """Plan the export of ``ck`` from headers, config and tokenizer only (no tensor data read), except with
    ``--target-size``, whose measurement reads samples (``--sensitivity weights``) or runs the reference forward
    on the calibration windows (``forward``, progress on stderr when ``progress``; :func:`_budget_types`).

    Raises:
        UnsupportedError (exit 3): deepseek_v32, an unmappable tensor, no tokenizer.json.
        BadInputError (exit 3): incomplete experts, bad imatrix file.
        UsageError (exit 2): unknown types, types dsconvert cannot quantize.
    """
    cfg = ck.config
    arch = arch_for(ck)
    arch.check(cfg)
    opts = opts.resolved()
    ftype, forced_pure = resolve_type(opts.type)
    pure = opts.pure or forced_pure
    overrides = [parse_tensor_type_override(s) for s in opts.tensor_types]
    plan = arch.plan(ck)
    types = arch.types(plan, ftype, cfg, overrides=overrides, output_type=opts.output_tensor_type,
                       embd_type=opts.token_embedding_type, pure=pure, has_imatrix=opts.imatrix is not None)
    entries = load_imatrix(opts.imatrix) if opts.imatrix is not None else None  # read once, used twice
    budget = None
    if opts.target_size is not None:
        types, budget = _budget_types(ck, plan, types, opts, overrides, entries or {}, progress)
    have = set(ggml.registered_types())
    missing = sorted({types[t.name] for t in plan
                      if types[t.name] not in have and not _stored_as_is(t, types[t.name])})
    if missing:
        who = sorted(n for n, t in types.items() if t in missing)
        raise UsageError(f"dsconvert has no quantizer for {', '.join(missing)} (needed by {len(who)} tensors, "
                         f"e.g. {who[0]})",
                         hint="supported types: " + ", ".join(sorted(have)) + "; quantize a BF16 GGUF with "
                              "llama-quantize for IQ types")
    if opts.imatrix is None:
        need = [n for n, t in types.items() if requires_imatrix(n, t, ftype)]
        if need:
            no_imatrix = any(f == "imatrix" for f, _, _ in arch.refused)
            raise UsageError(f"--type {opts.type}: {len(need)} tensors (e.g. {need[0]} as {types[need[0]]}) need an "
                             "importance matrix, as llama-quantize requires for this type",
                             hint=f"a {arch.name} GGUF takes no --imatrix yet; choose a type that needs none "
                                  "(Q4_K_M, IQ4_XS, ...)" if no_imatrix else
                                  "compute one on the original with `dsconvert imatrix SRC -o imatrix.gguf`, then "
                                  "add --imatrix imatrix.gguf")
    nbytes = {t.name: g2.tensor_nbytes(t.shape, types[t.name]) for t in plan}
    imatrix, importance = _imatrix_plan(opts.imatrix, entries, plan, types, arch.imatrix_optional, ftype)

    if not (ck.root / "tokenizer.json").is_file():
        raise BadInputError(f"{ck.root}: no tokenizer.json; a {arch.name} GGUF needs the tokenizer to load",
                            hint="copy the release's tokenizer.json and tokenizer_config.json into SRC")
    vocab_holder: dict = {}

    def meta(w: gguf.GGUFWriter) -> None:
        arch.write_metadata(w, cfg, arch.file_type(ftype))
        vocab_holder["v"] = g2.write_vocab(w, ck.root, cfg)

    groups = _split(plan.tensors, nbytes, opts.split_max_size, opts.split_max_tensors)
    paths = file_names(output or Path("model.gguf"), len(groups))
    files = []
    for i, g in enumerate(groups):
        w = _writer_for(i, len(groups), groups, types, nbytes, meta, arch.name)
        header = _serialize_header(w)
        align = w.data_alignment
        size = _pad(len(header), align) + sum(_pad(nbytes[t.name], align) for t in g)
        files.append(OutFile(paths[i], g, header, sum(nbytes[t.name] for t in g), size))

    # Peak: the vocab, the largest kv_b_proj (read whole for the split) or one row chunk in bf16 + f32 + the
    # quantizer's output and temporaries, plus the serialized header of file 1. Measured (own VmHWM): 0.46-0.48 GiB
    # for Q8_0 at the real V3 (16 experts) and V4-Flash dimensions, 0.44 GiB for V4-Flash Q4_K_M (estimate 0.50
    # for both); 0.31-0.33 GiB on a hidden-1024, 8k-vocab fixture (estimate 0.35).
    kv_b = max((t.src_nbytes * 2 for t in plan if t.kind.startswith("kv_b")), default=0)
    work = max(kv_b, opts.chunk_bytes // 2) * 4
    vocab = int(cfg.get("vocab_size", 0) or 0) * VOCAB_ENTRY_RSS
    peak = BASE_RSS + vocab + work + max(len(f.header) for f in files)
    if budget is not None and "peak_memory_estimate" in budget:  # --sensitivity forward runs before the write
        peak = max(peak, budget["peak_memory_estimate"]["bytes"])
    return ExportPlan(ck, ftype, pure, plan, types, nbytes, files, vocab_holder["v"].summary(), imatrix, peak,
                      importance, budget, arch)


def _stored_as_is(t: g2.GGUFTensorPlan, qtype: str) -> bool:
    """Whether tensor ``t`` is written as ``qtype`` without a quantizer: deepseek4's FP4 experts as MXFP4 (a
    repack) and its tid2eid table as I32."""
    return (t.kind, qtype) in (("experts_mxfp4", "MXFP4"), ("tid2eid", "I32"))


# --------------------------------------------------------------------------------------------------
# imatrix
# --------------------------------------------------------------------------------------------------


#: the types ``--target-size`` chooses among, each with the tensor's shape fallback applied (llama.cpp's
#: ``tensor_type_fallback``: ne0 = 128 makes Q4_K a Q5_0, ...)
BUDGET_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
#: the sample a tensor's sensitivity is measured on: rows spread over one chunk of the first and the middle
#: matrix (expert, or kv_b head)
SAMPLE_ROWS = 32
SAMPLE_CHUNK = 4 * 2**20


def _sample(ck: Checkpoint, t: g2.GGUFTensorPlan) -> list[tuple[int, torch.Tensor]]:
    """``[(matrix index, float32 rows [R, ne0])]`` of output tensor ``t``, as the file would hold them (the
    dequantized source; kv_b halves split per head; deepseek4's FP4 experts decoded exactly)."""
    if t.kind in ("kv_b_k", "kv_b_v"):
        kv = torch.cat(list(_rows(ck, t.sources[0], SAMPLE_CHUNK)))
        built = g2.build_tensor(t, [kv], ck.config)
        return [(h, built[h].to(torch.float32)) for h in sorted({0, built.shape[0] // 2})]
    out = []
    for i in sorted({0, len(t.sources) // 2}):
        if t.kind == "experts_mxfp4":
            packed, scale = ck.read(t.sources[i]), ck.read(ck.scale_of(t.sources[i]))
            n = max(1, SAMPLE_CHUNK // (8 * packed.shape[1]))  # the rows of one float32 chunk
            x = _mxfp4_as_ggml(packed[:n], scale[:n])
        else:
            gen = _rows(ck, t.sources[i], SAMPLE_CHUNK)
            x = next(gen)
            gen.close()
        x = x.reshape(-1, x.shape[-1])
        out.append((i, x[:: max(1, x.shape[0] // SAMPLE_ROWS)][:SAMPLE_ROWS].to(torch.float32)))
    return out


#: ``--sensitivity``: how ``--target-size`` measures each candidate's error
SENSITIVITIES = ("forward", "weights")


def _budget_types(ck: Checkpoint, plan: g2.GGUFPlan, types: dict[str, str], opts: GGUFOptions,
                  overrides: list[tuple[str, str]], entries: dict, progress: bool | None = False
                  ) -> tuple[dict[str, str], dict]:
    """``--target-size``: the type of every quantizable tensor chosen from :data:`BUDGET_LADDER` so the tensor
    data fits ``opts.target_size`` bytes with the least summed sensitivity (:mod:`dsconvert.quant.bit_alloc`).

    ``opts.sensitivity`` says how each candidate type's error is measured, both with the quantizer the export
    runs, weighted by ``--imatrix`` when given:

    * ``forward`` (default): the relative change of the layer's output hidden state when only this tensor is
      quantized, from the reference forward on the original over ``opts.sensitivity_samples`` windows of
      ``opts.sensitivity_seq_len`` tokens of the bundled calibration text (:mod:`.gguf_sensitivity`: the exact
      definition; routed experts from a sample of experts; ``token_embd`` the first layer's input, ``output`` the
      logits). DeepSeek-V4 sources are measured by ``weights`` (the V4 forward is not driven this way yet); the
      report says so;
    * ``weights``: the relative weight error of a sample of the tensor's rows (:func:`_sample`: up to 2 x 32
      rows of the dequantized FP8/BF16 source), with the imatrix's ``E[x_j^2]`` per input column as weights
      (:func:`~dsconvert.quant.bit_alloc.weighted_rel_error`). Reads about 0.5 MB per tensor.

    Tensors a user rule names (``--tensor-type``, ``--output-tensor-type``, ``--token-embedding-type``) and those
    never quantized (norms, router) keep their type and count against the budget.

    Args:
        overrides: the parsed ``--tensor-type`` rules (the tensors they match stay fixed).
        entries: the ``--imatrix`` file's entries (:func:`~dsconvert.formats.gguf_imatrix.read_imatrix`), or ``{}``.
        progress: stderr progress of the forward measurement.

    Returns:
        (types, report: target, planned bytes, the smallest and largest possible, the method and (forward) the
        calibration record and sampled experts, per-tensor choice with its measured error at each candidate).

    Raises:
        UsageError (exit 2): the target is below what the smallest types need (the message gives that size); an
            unknown ``sensitivity``; fewer than 1 window or 2 tokens per window.
    """
    from ..quant.bit_alloc import Choice, allocate, weighted_rel_error

    if opts.sensitivity not in SENSITIVITIES:
        raise UsageError(f"--sensitivity {opts.sensitivity!r}: unknown", hint=f"use {_either(list(SENSITIVITIES))}")
    if opts.sensitivity_samples < 1 or opts.sensitivity_seq_len < 2:
        raise UsageError(f"--sensitivity-samples {opts.sensitivity_samples} --sensitivity-seq-len "
                         f"{opts.sensitivity_seq_len}: need at least 1 window of at least 2 tokens")
    cfg = ck.config
    arch = arch_for(ck)
    ladder = {q: arch.types(plan, "Q8_0", cfg, overrides=[(".", q)], pure=True) for q in BUDGET_LADDER}
    def fixed(n: str) -> bool:
        return (any(re.search(p, n) for p, _ in overrides) or (opts.token_embedding_type and n == "token_embd.weight")
                or (opts.output_tensor_type and n == "output.weight"))

    cands: dict[str, list[str]] = {}  # tensor -> candidate types, by bytes
    exact: dict[str, set[str]] = {}  # types that hold the released values (no error)
    imps: dict[str, np.ndarray] = {}  # tensor -> float32 [n_mat, ne0] imatrix weights
    for t in plan:
        if (not tensor_allows_quantization(t.name, t.shape) or ladder["Q8_0"][t.name] in ("F32", "F16", "BF16")
                or fixed(t.name)):
            continue
        exact[t.name] = {"MXFP4"} if t.kind == "experts_mxfp4" else set()  # the released FP4 values
        cands[t.name] = sorted({ladder[q][t.name] for q in BUDGET_LADDER} | exact[t.name],
                               key=lambda q: g2.tensor_nbytes(t.shape, q))
        e = entries.get(t.name)
        if e is not None:
            imps[t.name] = np.asarray(e, np.float32).reshape(-1, t.shape[-1])
    by_name = {t.name: t for t in plan}
    rest = sum(g2.tensor_nbytes(t.shape, types[t.name]) for t in plan if t.name not in cands)
    lo = rest + sum(g2.tensor_nbytes(by_name[n].shape, c[0]) for n, c in cands.items())
    hi = rest + sum(g2.tensor_nbytes(by_name[n].shape, c[-1]) for n, c in cands.items())
    if opts.target_size < lo:  # before measuring anything
        raise UsageError(f"--target-size {fmt_bytes(opts.target_size)} is below the smallest this plan can be: "
                         f"{fmt_bytes(lo)} of tensor data ({BUDGET_LADDER[0]} everywhere it applies)",
                         hint=f"give at least --target-size {lo}")
    method = "forward" if opts.sensitivity == "forward" and ck.v4 is None else "weights"
    info: dict = {"sensitivity": method}
    if method != opts.sensitivity:
        info["sensitivity_note"] = ("DeepSeek-V4: --sensitivity forward is not implemented for the V4 forward yet; "
                                    "the sampled weight error was used")
    if method == "forward":
        from .gguf_sensitivity import forward_sensitivity

        measure = {n: [q for q in c if q not in exact[n]] for n, c in cands.items()}
        measured, rec = forward_sensitivity(
            ck, plan, measure, imps, num_samples=opts.sensitivity_samples, seq_len=opts.sensitivity_seq_len,
            progress=progress, native=resolve_kernel(opts.kernel, torch.device("cpu")),
            threads=opts.threads or os.cpu_count() or 1)
        for n in cands:
            measured[n].update(dict.fromkeys(exact[n], 0.0))
        kinds = rec.pop("measure")
        info.update(rec)
    else:
        measured, kinds = {}, {}
        for n, c in cands.items():
            imp = imps.get(n)
            samples = _sample(ck, by_name[n])
            errs = dict.fromkeys(exact[n], 0.0)
            for q in (q for q in c if q not in exact[n]):
                num = den = 0.0
                for i, x in samples:
                    w = None if imp is None else imp[i]
                    xq = ggml.dequantize(torch.from_numpy(encode(x, q, torch.device("cpu"), w)), q, tuple(x.shape))
                    a, b = weighted_rel_error(x, xq, None if w is None else torch.from_numpy(w))
                    num, den = num + a, den + b
                errs[q] = num / den if den > 0 else 0.0
            measured[n] = errs
    options = {n: [Choice(q, g2.tensor_nbytes(by_name[n].shape, q), measured[n][q]) for q in c]
               for n, c in cands.items()}
    chosen = allocate(options, opts.target_size - rest)
    out = dict(types)
    out.update({n: c.type for n, c in chosen.items()})
    planned = rest + sum(c.nbytes for c in chosen.values())
    return out, {"target": bytes_fields(opts.target_size), "planned": bytes_fields(planned),
                 "smallest": bytes_fields(lo), "largest": bytes_fields(hi), "tensors_chosen": len(chosen),
                 "weighted_by_imatrix": bool(entries), **info,
                 "sum_rel_error": sum(c.rel_error for c in chosen.values()),
                 "choices": {n: {"type": chosen[n].type, "rel_error": measured[n],
                                 **({"measure": kinds[n]} if method == "forward" else {})} for n in chosen}}


def _imatrix_plan(path: Path | None, entries: dict | None, plan: g2.GGUFPlan, types: dict[str, str],
                  optional: tuple[str, ...], ftype: str) -> tuple[dict, dict]:
    """Check ``--imatrix`` against the planned tensors, as ``llama_model_quantize`` does.

    ``entries`` is ``path`` as read by :func:`~dsconvert.formats.gguf_imatrix.read_imatrix`.

    llama.cpp ignores importance weights for F32/F16/BF16/Q8_0 (accepted and ignored here too) and for what is
    copied (deepseek4's MXFP4 experts, its I32 ``tid2eid``); every other type uses them (``quantize_row_*_impl``).
    Each tensor that uses them needs an entry of ``ne0 * n_mat`` values (``n_mat`` = experts, or heads of
    ``attn_k_b``/``attn_v_b``). The names matching ``optional`` (the architecture's
    :attr:`~dsconvert.formats.gguf_arch.GGUFArch.imatrix_optional`: ``token_embd``, a lookup; ``output``,
    collected only with llama-imatrix ``--process-output``; deepseek4's ``*_ape`` and ``output_hc_fn``) may lack
    one: llama.cpp quantizes them without weights, and so does this export (the report lists them), unless their
    type needs weights (:func:`~dsconvert.formats.gguf_types.requires_imatrix`), where llama-quantize bails out.

    Returns:
        (report dict, ``{gguf name: float32 [n_mat, ne0]}`` for the tensors that use the weights).

    Raises:
        BadInputError: the file cannot be read as an imatrix, lacks entries for tensors that would use it, or an
            entry's size differs from the tensor's (an imatrix of another model or layout).
    """
    if path is None:
        return {"used": False}, {}
    quantizers = set(ggml.registered_types())  # not MXFP4 / I32: deepseek4's experts and tid2eid pass through
    users = {t: ggml.get_type(t) for t in set(types.values()) if t in quantizers}
    need = sorted(t for t, c in users.items() if not c.ignores_imatrix)
    importance, missing, wrong, without = {}, [], [], []
    for t in plan:
        if types[t.name] not in need:
            continue
        e = entries.get(t.name)
        if e is None:
            (without if any(re.search(p, t.name) for p in optional) else missing).append(t.name)
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        if e.size != t.shape[-1] * n_mat:
            wrong.append(f"{t.name} ({e.size} values, the tensor needs {t.shape[-1]} x {n_mat})")
            continue
        if not np.isfinite(e).all():
            raise BadInputError(f"--imatrix {path}: {t.name} holds non-finite values",
                                hint="recompute the imatrix (llama.cpp refuses such a file too)")
        importance[t.name] = e.reshape(n_mat, t.shape[-1])
    bare = [n for n in without if requires_imatrix(n, types[n], ftype)]
    if bare:
        raise UsageError(f"--imatrix {path} has no entry for {', '.join(bare)} (an imatrix never has one), and "
                         f"{types[bare[0]]} needs importance weights: llama-quantize bails out here too",
                         hint="give them a type that needs none: " + " ".join(
                             f"--tensor-type {f}=q4_k" for f in sorted({re.sub(r"^blk\.\d+\.|\.weight$", "", n)
                                                                        for n in bare})))
    if missing:
        raise BadInputError(f"--imatrix {path}: no entries for {len(missing)} tensors that need them: "
                            + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
                            hint="an imatrix computed on a kv_b-layout file lacks attn_k_b/attn_v_b "
                                 "(docs/known-failures.md item 26); recompute it on a current-layout GGUF")
    if wrong:
        raise BadInputError(f"--imatrix {path}: entries of the wrong size for {len(wrong)} tensors: "
                            + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""),
                            hint="the imatrix belongs to another model or tensor layout")
    return {"used": bool(importance), "path": str(path), "entries": len(entries),
            "tensors_weighted": len(importance), "tensors_without_entry": without,
            "ignored_by_types": sorted(t for t, c in users.items() if c.ignores_imatrix)}, importance


# --------------------------------------------------------------------------------------------------
# tensor data
# --------------------------------------------------------------------------------------------------


#: ``--kernel`` choices: the block quantizer used on CPU (every one gives the same bytes).
KERNELS = ("auto", "ggml", "torch")


def resolve_kernel(kernel: str, device: torch.device) -> "NativeGGML | None":
    """The ggml library to quantize with (:mod:`dsconvert.quant.ggml.native`), or ``None`` for the torch kernels.

    ``"auto"``: the library when one is found and the device is the CPU, else torch; ``"ggml"``: the library,
    required; ``"torch"``: never the library. The bytes are the same either way (the tests compare them).

    Raises:
        UsageError (exit 2): an unknown name; ``"ggml"`` on an accelerator, or with no usable library.
    """
    from ..quant.ggml import native

    if kernel not in KERNELS:
        raise UsageError(f"--kernel {kernel!r}: unknown", hint=f"use one of {', '.join(KERNELS)}")
    if kernel == "torch" or (kernel == "auto" and device.type != "cpu"):
        return None
    if kernel == "ggml" and device.type != "cpu":
        raise UsageError(f"--kernel ggml runs on the CPU, not on {device}", hint="drop --kernel or --device")
    lib = native.load()
    if lib is None and kernel == "ggml":
        tried = ", ".join(str(p) for p in native.library_candidates()) or "no llama_cpp package installed"
        raise UsageError(f"--kernel ggml: no usable ggml library ({tried})",
                         hint=f"install llama-cpp-python, or set {native.ENV_LIB} to a libggml-base shared "
                              f"library of a llama.cpp build, or use --kernel torch")
    return lib


def _mxfp4_as_ggml(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 ``[M, N]`` values of FP4 e2m1 ``packed`` ``[M, N/2]`` with e8m0 ``scale`` ``[M, N/32]`` as ggml
    dequantizes MXFP4 (``dequantize_row_mxfp4``): exact, except that code 8 (e2m1 -0) is +0, because ggml's
    ``kvalues_mxfp4`` table is integers. Matters for the F16/BF16/F32 bytes only (a quantizer sees 0 either way)."""
    return dequant_fp4(packed, scale, torch.float32).add_(0.0)


def tensor_chunks(ck: Checkpoint, t: g2.GGUFTensorPlan, qtype: str, device: torch.device,
                  chunk_bytes: int, importance: np.ndarray | None = None, encode=encode) -> Iterator[np.ndarray]:
    """Bytes of output tensor ``t`` in file order: experts in id order, each in row chunks; kv_b halves whole;
    deepseek4's FP4 experts one expert at a time (MXFP4: the release bytes repacked, :func:`repack_mxfp4`; another
    type: decoded exactly to float32, then quantized), its tid2eid as I32.

    ``importance`` (float32 ``[n_mat, ne0]``) weights matrix ``i`` (expert ``i``, or head ``i`` of a kv_b half)
    with row ``i``, as ``llama_tensor_quantize_impl`` slices the imatrix per expert. ``encode`` (same signature
    as :func:`encode`) turns each read chunk into bytes; :class:`_Pipeline` passes one that returns futures.
    """
    def w(i: int) -> np.ndarray | None:
        return None if importance is None else importance[i]

    if t.kind == "experts_mxfp4":  # deepseek4: per expert, repacked as released, or decoded and quantized
        for i, src in enumerate(t.sources):
            packed, scale = ck.read(src), ck.read(ck.scale_of(src))
            if qtype == "MXFP4":
                yield g4.repack_mxfp4(packed, scale).numpy().reshape(-1)
                continue
            rows = max(1, chunk_bytes // (4 * 2 * packed.shape[1]))  # float32 rows of one chunk
            for r0 in range(0, packed.shape[0], rows):
                yield encode(_mxfp4_as_ggml(packed[r0:r0 + rows], scale[r0:r0 + rows]), qtype, device, w(i))
        return
    if t.kind == "tid2eid":
        yield ck.read(t.sources[0]).to(torch.int32).contiguous().view(torch.uint8).numpy().reshape(-1)
        return
    if t.kind in ("kv_b_k", "kv_b_v"):
        kv = torch.cat(list(_rows(ck, t.sources[0], chunk_bytes)))
        built = g2.build_tensor(t, [kv], ck.config)
        if importance is None:
            yield encode(built, qtype, device)
        else:
            for h in range(built.shape[0]):
                yield encode(built[h], qtype, device, w(h))
        return
    for i, src in enumerate(t.sources):  # one for "copy", n_expert for "stack_experts" (expert-major bytes)
        for x in _rows(ck, src, chunk_bytes):
            yield encode(x, qtype, device, w(i))


class _Pipeline:
    """Quantize the chunks of :func:`tensor_chunks` in one worker thread while this thread reads the next chunk
    and writes the previous one.

    :meth:`encode` submits :func:`encode` to the worker, which runs torch with ``threads`` intra-op threads;
    :meth:`run` yields the results in file order with one chunk in flight, so reading (FP8 decoding), quantizing
    and writing + hashing overlap and memory stays near two chunks. Several quantizing Python threads were
    measured slower here (the block quantizers are many small torch ops, and their threads queue on the GIL).
    ``threads`` also sets torch's thread count for the run (restored on exit). Not on an accelerator: there
    :meth:`encode` is a plain call. Used as a context manager (the worker is shut down on exit, also on errors
    and cancellation).
    """

    def __init__(self, threads: int, overlap: bool = True, native: "NativeGGML | None" = None):
        self.threads = max(1, int(threads))
        self.native = native
        self.torch_threads = torch.get_num_threads()  # restored on exit: torch's setting is process-wide
        torch.set_num_threads(self.threads)
        self.pool = None
        if overlap:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="dsconvert-gguf")

    def __enter__(self) -> "_Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self.torch_threads)

    def encode(self, *args):
        kw = {"native": self.native, "threads": self.threads}
        return encode(*args, **kw) if self.pool is None else self.pool.submit(encode, *args, **kw)

    def run(self, chunks: Iterator) -> Iterator[np.ndarray]:
        from collections import deque
        from concurrent.futures import Future

        if self.pool is None:
            yield from chunks
            return
        window: deque = deque()
        for c in chunks:
            window.append(c)
            while len(window) > 1 or (window and not isinstance(window[0], Future)):
                head = window.popleft()
                yield head.result() if isinstance(head, Future) else head
        while window:
            head = window.popleft()
            yield head.result() if isinstance(head, Future) else head


#: Sidecar of an interrupted file: ``NAME.gguf.tmp`` holds the header and the tensors listed here.
PARTIAL_SUFFIX = ".dsconvert-partial.json"
#: A resume point is recorded (``.tmp`` fsynced, then the sidecar replaced atomically) after the tensor that
#: brings the bytes since the last one over CHECKPOINT_BYTES, or after CHECKPOINT_S seconds, and always when
#: the run is cancelled. During the run the fsync and the sidecar go to a background thread (:class:`_Syncer`),
#: so quantizing does not wait for the disk; while one is in flight the next tensor boundary tries again. A
#: SIGKILL loses at most the work since the last sidecar.
CHECKPOINT_BYTES = 64 * 2**20
CHECKPOINT_S = 10.0
_READ = 16 << 20


class _Syncer:
    """Make the bytes written so far durable and then record them, in one background thread.

    ``submit(state)`` flushes ``f``'s buffer here, then a thread runs ``os.fsync(f.fileno())`` and, only after it
    returned, ``record(state)`` (the sidecar). So a sidecar never lists a tensor whose bytes are not on disk,
    and the writer keeps writing (the fsync covers at least the submitted bytes). One sync at a time:
    ``submit`` returns False, doing nothing, while the previous one runs. Measured on the real-size fixture: a
    synchronous fsync per 64 MiB held the pipeline to the disk's durable write rate (0.25 GB/s here), which
    cost a Q8_0 file about a third of its time.

    :meth:`wait` joins the thread and re-raises its error (an ``OSError`` from the disk); call it before
    closing ``f`` and before deleting or rewriting the sidecar.
    """

    def __init__(self, f, record):
        self.f, self.record = f, record
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, state) -> bool:
        if self.thread is not None:
            if self.thread.is_alive():
                return False
            self.wait()
        self.f.flush()

        def job() -> None:
            try:
                os.fsync(self.f.fileno())
                self.record(state)
            except BaseException as e:  # noqa: BLE001 - handed to the writer by wait()
                self.error = e

        self.thread = threading.Thread(target=job, name="dsconvert-fsync", daemon=True)
        self.thread.start()
        return True

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            e, self.error = self.error, None
            raise e


def partial_path(final: Path) -> Path:
    """The resume sidecar of output file ``final`` (``NAME.gguf.dsconvert-partial.json``)."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def tensor_spans(f_plan: OutFile, plan: ExportPlan) -> tuple[int, list[tuple[int, int]]]:
    """(data start, ``[(begin, end)]`` per tensor in file order), in bytes from the start of the file; ``end``
    includes the tensor's zero padding to the alignment (32), as ``GGUFWriter.write_tensor_data`` lays it out."""
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    pos = _pad(len(f_plan.header), align)
    start, spans = pos, []
    for t in f_plan.tensors:
        end = pos + _pad(plan.nbytes[t.name], align)
        spans.append((pos, end))
        pos = end
    return start, spans


def _resume_point(tmp: Path, f_plan: OutFile, plan: ExportPlan, fp: str, progress: ByteProgress | None
                  ) -> tuple[int, "hashlib._Hash"]:
    """How many leading tensors of the partial ``tmp`` can be kept, and the sha256 state of the file up to
    them. Re-reads and re-hashes the kept prefix: the header must equal the planned one and each tensor the
    sha256 recorded in the sidecar; the first mismatch ends the kept prefix. (0, fresh hash) when there is no
    usable partial (no sidecar, another fingerprint or plan)."""
    h = hashlib.sha256()
    try:
        st = json.loads(partial_path(f_plan.path).read_text())
        ok = (st.get("tool") == "dsconvert" and st.get("fingerprint") == fp and st.get("file") == f_plan.name
              and st.get("size") == f_plan.size and tmp.is_file()
              and st.get("header_sha256") == hashlib.sha256(f_plan.header).hexdigest())
        recs = list(st.get("tensors", [])) if ok else []
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, h
    if not recs:
        return 0, h
    start, spans = tensor_spans(f_plan, plan)
    head = f_plan.header + bytes(start - len(f_plan.header))
    k = 0
    with open(tmp, "rb") as f:
        if f.read(start) != head:
            return 0, h
        h.update(head)
        for i, rec in enumerate(recs[: len(spans)]):
            b, e = spans[i]
            if rec.get("name") != f_plan.tensors[i].name or rec.get("end") != e:
                break
            if progress is not None:
                progress.describe(f"verifying {f_plan.name}: {rec['name']}", boundary=i == 0)
            ht, h2 = hashlib.sha256(), h.copy()
            left = e - b
            while left > 0:
                piece = f.read(min(_READ, left))
                if not piece:
                    break
                ht.update(piece)
                h2.update(piece)
                left -= len(piece)
            if left or ht.hexdigest() != rec.get("sha256"):
                break
            h, k = h2, i + 1
    return k, h


def write_file(f_plan: OutFile, plan: ExportPlan, device: torch.device, chunk_bytes: int,
               progress: ByteProgress, n_layer: int, fp: str = "", resume: bool = True,
               stats: dict | None = None, threads: int = 1, native: "NativeGGML | None" = None) -> tuple[int, str]:
    """Write one GGUF file through ``NAME.tmp`` + fsync + rename; returns (size, sha256).

    On CPU, chunks of ``chunk_bytes / 2`` are quantized in a worker thread (torch with ``threads`` threads) while
    this thread reads the next one and writes and hashes the previous one, in file order (:class:`_Pipeline`);
    with ``native`` (:func:`resolve_kernel`), ggml's quantizer runs in that worker on ``threads`` threads. The
    bytes do not depend on ``threads``, the overlap or the kernel.

    The data section follows ``GGUFWriter.write_tensor_data``: each tensor starts at the next multiple of
    the alignment (32) and is zero-padded to it. The header's size is known before any tensor data, so the
    file is resumable tensor by tensor: every so often (:data:`CHECKPOINT_BYTES`, :data:`CHECKPOINT_S`) and
    on cancellation the ``.tmp`` is fsynced and ``NAME.gguf.dsconvert-partial.json`` records the tensors
    complete so far with their sha256 (fingerprint ``fp``). With ``resume``, a matching partial is verified
    (:func:`_resume_point`) and writing continues after its last good tensor, giving the same bytes as an
    uninterrupted run. ``stats["tensors_reused"]`` (when given) receives the number of tensors kept.

    Interrupted by :class:`~dsconvert.convert.cancel.Cancelled` or an ``OSError`` (disk full), the ``.tmp``
    is kept with its sidecar when it holds at least one complete tensor, else deleted; any other error
    deletes both.

    Raises:
        Cancelled: SIGINT/SIGTERM (checked between chunks).
        OSError: disk full, permissions.
    """
    final = f_plan.path
    tmp = final.with_name(final.name + ".tmp")
    side = partial_path(final)
    start, spans = tensor_spans(f_plan, plan)
    k, h = _resume_point(tmp, f_plan, plan, fp, progress) if resume else (0, hashlib.sha256())
    if k == 0:
        side.unlink(missing_ok=True)
    if stats is not None:
        stats["tensors_reused"] = k
    records = []
    if k:
        records = json.loads(side.read_text())["tensors"][:k]
        progress.skip(sum(plan.nbytes[t.name] for t in f_plan.tensors[:k]))
    state = {"tool": "dsconvert", "fingerprint": fp, "file": f_plan.name, "size": f_plan.size,
             "header_sha256": hashlib.sha256(f_plan.header).hexdigest()}
    pos = spans[k - 1][1] if k else 0
    marks = {"saved": len(records), "bytes": 0, "t": time.monotonic()}
    pipe = _Pipeline(threads, overlap=device.type == "cpu", native=native)
    try:
        with pipe, open(tmp, "r+b" if k else "wb") as f:
            if k:
                f.truncate(pos)
                f.seek(pos)

            def put(b_) -> None:
                nonlocal pos
                mv = memoryview(b_).cast("B")
                f.write(mv)
                h.update(mv)
                ht.update(mv)
                pos += len(mv)

            def record(recs: list) -> None:
                write_atomic(side, (json.dumps({**state, "tensors": recs}) + "\n").encode())

            syncer = _Syncer(f, record)

            def checkpoint(now: bool = False) -> None:
                """A resume point at the last complete tensor: in the background, or (``now``) before returning."""
                if now:
                    try:
                        syncer.wait()  # a sync in flight finishes first (its sidecar may be the one kept)
                    except OSError:
                        marks["saved"] = -1  # that sidecar may not have been written: write it here
                if len(records) == marks["saved"]:
                    return
                snap = list(records)
                if now:
                    f.flush()
                    os.fsync(f.fileno())
                    record(snap)
                elif not syncer.submit(snap):
                    return  # the previous sync is still running: the next tensor boundary tries again
                marks.update(saved=len(snap), bytes=0, t=time.monotonic())

            try:
                ht = hashlib.sha256()
                if not k:
                    put(f_plan.header)
                    put(bytes(start - pos))
                for i in range(k, len(f_plan.tensors)):
                    t = f_plan.tensors[i]
                    cancel.check()
                    ht = hashlib.sha256()
                    qtype = plan.types[t.name]
                    layer = f" ({t.bid + 1}/{n_layer})" if t.bid is not None else ""
                    # a plain progress line at each file and layer boundary, not at each tensor
                    progress.describe(f"{f_plan.name}: {t.name} {qtype}{layer}",
                                      boundary=i == k or t.bid != f_plan.tensors[i - 1].bid)
                    n = 0
                    for chunk in pipe.run(tensor_chunks(plan.ck, t, qtype, device, chunk_bytes // (1 + bool(pipe.pool)),
                                                        plan.importance.get(t.name), encode=pipe.encode)):
                        cancel.check()
                        put(chunk)
                        n += chunk.nbytes
                        progress.advance(chunk.nbytes)
                    if n != plan.nbytes[t.name]:  # pragma: no cover - a planning bug, never user input
                        raise RuntimeError(f"{t.name}: wrote {n} bytes, planned {plan.nbytes[t.name]}")
                    put(bytes(_pad(n, gguf.GGUF_DEFAULT_ALIGNMENT) - n))
                    records.append({"name": t.name, "end": pos, "sha256": ht.hexdigest()})
                    marks["bytes"] += n
                    if i + 1 < len(f_plan.tensors) and (marks["bytes"] >= CHECKPOINT_BYTES
                                                        or time.monotonic() - marks["t"] >= CHECKPOINT_S):
                        checkpoint()
            except (cancel.Cancelled, OSError):
                if records:
                    try:
                        checkpoint(now=True)  # keep the work done: the next run resumes after the last tensor
                    except BaseException:
                        pass
                raise
            except BaseException:
                try:
                    syncer.wait()  # before the sidecar is deleted below
                except BaseException:
                    pass
                raise
            syncer.wait()
            f.flush()
            os.fsync(f.fileno())
        if pos != f_plan.size:  # pragma: no cover
            raise RuntimeError(f"{final.name}: wrote {pos} bytes, planned {f_plan.size}")
        commit_tmp(tmp, final)
        side.unlink(missing_ok=True)
    except (cancel.Cancelled, OSError):
        if not (records and side.is_file() and tmp.is_file()):
            tmp.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        raise
    return pos, h.hexdigest()


# --------------------------------------------------------------------------------------------------
# tensor ranges as remote units (--ray)
# --------------------------------------------------------------------------------------------------

#: Name of a remote unit (and prefix of its piece file): ``NAME.gguf@A-B`` holds tensors A..B-1 of file NAME.
PIECE_NAME = "{file}@{a}-{b}"


def write_piece(plan: ExportPlan, file_idx: int, a: int, b: int, tmp: Path, sink, device: torch.device,
                chunk_bytes: int, native: "NativeGGML | None" = None) -> dict:
    """Tensors ``a..b-1`` of output file ``file_idx`` into ``tmp``, each zero-padded to the alignment (32):
    exactly the bytes the file's data section holds from tensor ``a``'s offset to tensor ``b``'s (the same
    :func:`tensor_chunks` as :func:`write_file`, quantized by ``native`` when given). fsynced, not renamed.
    ``sink.advance(n)`` per chunk.

    Returns:
        ``{"size", "sha256", "records": [{"name", "len", "sha256"}]}``: bytes of the piece, and per tensor its
        padded length and the sha256 of its padded bytes (the resume sidecar's records).

    Raises:
        OSError: disk full, permissions.
    """
    f_plan = plan.files[file_idx]
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    h = hashlib.sha256()
    records, size = [], 0
    with open(tmp, "wb") as f:
        for t in f_plan.tensors[a:b]:
            ht = hashlib.sha256()
            n = 0
            for chunk in tensor_chunks(plan.ck, t, plan.types[t.name], device, chunk_bytes,
                                       plan.importance.get(t.name),
                                       encode=functools.partial(encode, native=native, threads=os.cpu_count() or 1)):
                mv = memoryview(chunk).cast("B")
                f.write(mv)
                h.update(mv)
                ht.update(mv)
                n += len(mv)
                sink.advance(len(mv))
            if n != plan.nbytes[t.name]:  # pragma: no cover - a planning bug, never user input
                raise RuntimeError(f"{t.name}: wrote {n} bytes, planned {plan.nbytes[t.name]}")
            pad = bytes(_pad(n, align) - n)
            f.write(pad)
            h.update(pad)
            ht.update(pad)
            records.append({"name": t.name, "len": n + len(pad), "sha256": ht.hexdigest()})
            size += n + len(pad)
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest(), "records": records}


def _as_rules(opts: GGUFOptions, plan: ExportPlan) -> GGUFOptions:
    """``opts`` with a ``--target-size`` choice spelled out as one exact ``--tensor-type`` rule per chosen tensor
    (a remote unit rebuilds the same plan without measuring again); unchanged without ``--target-size``."""
    opts = opts.resolved()
    if plan.budget is None:
        return opts
    rules = [f"^{re.escape(n)}$={c['type']}" for n, c in plan.budget["choices"].items()]
    return replace(opts, target_size=None, tensor_types=[*rules, *opts.tensor_types])


def rebuild(src: str, opts: GGUFOptions, output: str) -> Rebuilt:
    """The export plan for ``src`` rebuilt where a remote unit runs (same SRC path and options, same plan);
    a unit's payload is ``(file index, first tensor, end tensor)``, written by :func:`write_piece`."""
    ck = open_checkpoint(Path(src), check_values=False)
    plan = make_plan(ck, opts, Path(output))
    device = resolve_device(opts.device)
    native = resolve_kernel(opts.kernel, device)

    def write(unit: str, payload, tmp: Path, sink) -> dict:
        i, a, b = payload
        return write_piece(plan, i, a, b, tmp, sink, device, opts.chunk_bytes, native)

    return Rebuilt(write)


def piece_ranges(f_plan: OutFile, k: int) -> list[tuple[int, int]]:
    """Tensors ``k..`` of ``f_plan`` cut into units: one per decoder layer (``blk.N.*``), and one per run of
    non-layer tensors (token embedding; output norm and head)."""
    out: list[tuple[int, int]] = []
    for i in range(k, len(f_plan.tensors)):
        if out and f_plan.tensors[i].bid == f_plan.tensors[out[-1][0]].bid:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def write_file_remote(f_plan: OutFile, file_idx: int, plan: ExportPlan, executor, job: Job,
                      progress: ByteProgress, fp: str = "", resume: bool = True, stats: dict | None = None
                      ) -> tuple[int, str]:
    """:func:`write_file`'s result with the tensor data made by remote units (``executor.run_units``): each
    unit writes a piece (:func:`write_piece`) on the shared filesystem; the driver writes the header, appends
    the pieces in file order as they arrive into ``NAME.gguf.tmp`` (hashing as it goes, deleting each piece),
    records the resume sidecar after every piece, then fsyncs and renames. Same bytes, same sidecar, same
    resume as a local run (a resumed file continues after its last verified tensor).

    Raises:
        Cancelled, OSError, WorkerFailed (the ``.tmp`` and its sidecar kept when they hold a complete tensor).
    """
    from .executor import Unit

    final = f_plan.path
    tmp = final.with_name(final.name + ".tmp")
    side = partial_path(final)
    start, spans = tensor_spans(f_plan, plan)
    k, h = _resume_point(tmp, f_plan, plan, fp, progress) if resume else (0, hashlib.sha256())
    if k == 0:
        side.unlink(missing_ok=True)
    if stats is not None:
        stats["tensors_reused"] = k
    records = json.loads(side.read_text())["tensors"][:k] if k else []
    if k:
        progress.skip(sum(plan.nbytes[t.name] for t in f_plan.tensors[:k]))
    state = {"tool": "dsconvert", "fingerprint": fp, "file": f_plan.name, "size": f_plan.size,
             "header_sha256": hashlib.sha256(f_plan.header).hexdigest()}
    ranges = piece_ranges(f_plan, k)
    lock = threading.Lock()
    arrived: dict[int, tuple[dict, Path]] = {}
    nxt = [0]
    pos = spans[k - 1][1] if k else 0
    f = open(tmp, "r+b" if k else "wb")
    try:
        if k:
            f.truncate(pos)
            f.seek(pos)
        else:
            head = f_plan.header + bytes(start - len(f_plan.header))
            f.write(head)
            h.update(head)
            pos = start

        def append(result: dict, piece: Path, a: int, b: int) -> None:
            nonlocal pos
            if result["size"] != spans[b - 1][1] - spans[a][0]:  # pragma: no cover - a planning bug
                raise RuntimeError(f"{piece.name}: {result['size']} bytes, planned {spans[b - 1][1] - spans[a][0]}")
            with open(piece, "rb") as fi:
                while buf := fi.read(_READ):
                    f.write(buf)
                    h.update(buf)
            for rec in result["records"]:
                pos += rec["len"]
                records.append({"name": rec["name"], "end": pos, "sha256": rec["sha256"]})
            piece.unlink()
            f.flush()
            os.fsync(f.fileno())
            write_atomic(side, (json.dumps({**state, "tensors": records}) + "\n").encode())

        def on_result_for(idx: int):
            def on_result(result: dict, piece: Path) -> None:
                with lock:
                    arrived[idx] = (result, piece)
                    while nxt[0] in arrived:
                        r, p = arrived.pop(nxt[0])
                        append(r, p, *ranges[nxt[0]])
                        nxt[0] += 1
            return on_result

        units = [Unit(PIECE_NAME.format(file=f_plan.name, a=a, b=b), (file_idx, a, b), on_result_for(i),
                      describe=f"{f_plan.name}: {f_plan.tensors[a].name}") for i, (a, b) in enumerate(ranges)]
        executor.run_units(final.parent, units, progress, job)
        if nxt[0] != len(ranges) or pos != f_plan.size:  # pragma: no cover
            raise RuntimeError(f"{final.name}: assembled {pos} bytes, planned {f_plan.size}")
        f.close()
        commit_tmp(tmp, final)
        side.unlink(missing_ok=True)
    except BaseException:
        f.close()
        if not (records and side.is_file() and tmp.is_file()):
            tmp.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
        raise
    return pos, h.hexdigest()


# --------------------------------------------------------------------------------------------------
# output files, resume
# --------------------------------------------------------------------------------------------------


def manifest_path(output: Path, state_dir: Path | None = None) -> Path:
    """``FILE.gguf.dsconvert-manifest.json``, beside ``output`` or in ``state_dir`` (``--state-dir``)."""
    return (Path(state_dir) if state_dir else output.parent) / (output.name + MANIFEST_SUFFIX)


def report_path(output: Path, state_dir: Path | None = None) -> Path:
    """``FILE.gguf.dsconvert-report.json``, beside ``output`` or in ``state_dir`` (``--state-dir``)."""
    return (Path(state_dir) if state_dir else output.parent) / (output.name + REPORT_SUFFIX)


def _owned(output: Path, state_dir: Path | None = None) -> list[Path]:
    """Every file a gguf export to ``output`` may have written (any split count), temporaries included."""
    d5 = "[0-9]" * 5
    pats = [glob.escape(output.name), f"{glob.escape(output.stem)}-{d5}-of-{d5}.gguf"]
    found: set[Path] = set()
    for p in pats:
        found.update(output.parent.glob(p))
        found.update(output.parent.glob(p + ".tmp"))
        found.update(output.parent.glob(p + PARTIAL_SUFFIX))
    found.add(report_path(output, state_dir))
    return sorted(x for x in found if x.is_file() or x.is_symlink())


@dataclass
class _GGUFLocation(OutputLocation):
    """A ``.gguf`` file or its splits, the manifest beside them or in ``state_dir``; ``planned`` the files this
    export writes (a fresh start keeps each whole until its replacement is renamed over it)."""

    output: Path
    planned: list[OutFile]
    state_dir: Path | None

    @property
    def base(self) -> Path:
        return self.output.parent

    @property
    def mpath(self) -> Path:
        return manifest_path(self.output, self.state_dir)

    def load(self) -> Manifest | None:
        return Manifest.load_file(self.mpath)

    def save(self, man: Manifest) -> None:
        man.save_file(self.mpath)

    def existing(self) -> list[Path]:
        return [p for p in _owned(self.output, self.state_dir) if not p.name.endswith((".tmp", PARTIAL_SUFFIX))]

    def unvouched_error(self, existing: list[Path]) -> OutputExistsError:
        return OutputExistsError(f"{existing[0]} exists and no dsconvert manifest ({self.mpath}) vouches for it",
                                 hint="if an earlier run used --state-dir, pass the same --state-dir; otherwise "
                                      "pass --overwrite to replace it, or choose another -o")

    def mismatch_error(self, man: Manifest, command: str, detail: str) -> OutputExistsError:
        return OutputExistsError(f"{self.output}: the existing output ({self.mpath.name}) was made from a different "
                                 f"source or with different options{detail}; refusing to resume it",
                                 hint="rerun with the same SRC and options, pass --overwrite to start over, or "
                                      "choose another -o")

    def tidy_resumed(self, man: Manifest, done: set[str]) -> None:
        """Keep a partial file only with its sidecar (:func:`write_file` resumes it), a sidecar only with its
        unfinished partial file; record the manifest."""
        names = {f.name for f in self.planned}
        for p in self.base.glob("*.gguf.tmp"):
            final = p.with_name(p.name[: -len(".tmp")])
            if final.name in names and not partial_path(final).is_file():
                p.unlink()
        for p in self.base.glob("*.gguf" + PARTIAL_SUFFIX):
            final = p.with_name(p.name[: -len(PARTIAL_SUFFIX)])
            if final.name in names and (final.name in done or not final.with_name(final.name + ".tmp").is_file()):
                p.unlink()
        self.save(man)

    def clear(self) -> None:
        planned = {f.path.resolve() for f in self.planned}
        for p in _owned(self.output, self.state_dir):
            if p.resolve() not in planned:  # a planned file is kept whole until its replacement is renamed over it
                p.unlink()


def prepare_output(output: Path, files: list[OutFile], fp: str, options: dict, *, overwrite: bool,
                   resume: bool, state_dir: Path | None = None, parts: dict | None = None, verify: str = "full",
                   progress: bool | None = False) -> ResumeDecision:
    """:func:`~dsconvert.convert.manifest.decide_resume` for the GGUF file(s) ``files`` of ``output``: fresh
    start, resume (matching manifest: keep verified files), already complete, or refuse. A fresh start
    (``overwrite``) deletes what an earlier export left except the files this one plans: each stays whole until
    its replacement is renamed over it, so a failed ``--overwrite`` run leaves them as they were.

    Raises:
        UsageError (exit 2): ``output`` is a directory.
        OutputExistsError (exit 2): output files exist without a dsconvert manifest, or with a manifest for
            another source or options, and ``overwrite`` is not set.
    """
    if output.is_dir():
        raise UsageError(f"-o {output} is a directory", hint="give the .gguf file to write, e.g. -o model.gguf")
    return decide_resume(_GGUFLocation(output, files, state_dir), COMMAND, fp, options, overwrite=overwrite,
                         resume=resume, planned={f.name for f in files}, verify=verify, progress=progress,
                         parts=parts)


def _source_fingerprint(ck: Checkpoint) -> dict:
    """sha256 of config/index/tokenizer files plus a digest of every tensor header (name, dtype, shape,
    shard, offsets), which also covers single-file checkpoints without an index."""
    hdr = hashlib.sha256()
    for n in sorted(ck.tensors):
        s, e = ck.tensors[n]
        hdr.update(f"{n}|{e.dtype}|{list(e.shape)}|{s}|{e.begin}|{e.nbytes}\n".encode())
    parts = source_fingerprint_parts(ck.root, [INDEX_NAME, "config.json", "tokenizer.json", "tokenizer_config.json"])
    return {"files": parts, "tensor_headers": hdr.hexdigest()}


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


def run(src: Path, output: Path | None, opts: GGUFOptions, *, dry_run: bool = False, overwrite: bool = False,
        resume: bool = True, progress: bool | None = None, verify: str = "full",
        executor: Executor | None = None) -> dict:
    """Export ``src`` to GGUF ``output`` (one file or splits); return the JSON report. ``verify`` (``full`` |
    ``size``) is how a rerun checks the files already finished (docs/cli-conventions.md, Resume).

    ``executor``: None or local writes here; a remote one (``--ray``) makes the tensor data in per-layer
    units on the cluster (:func:`write_file_remote`), same bytes.

    Raises:
        BadInputError / UnsupportedError (exit 3): anything wrong with SRC, found before writing.
        UsageError / OutputExistsError (exit 2): bad options, or an output that cannot be used.
    """
    t0 = time.perf_counter()
    src = Path(src)
    recipe = get_recipe(opts.recipe).to_dict() if opts.recipe else None
    opts = opts.resolved()
    executor = executor or LocalExecutor(1)
    if output is None and not dry_run:
        raise UsageError("missing -o/--output", hint="dsconvert gguf SRC -o FILE.gguf --type Q4_K_M (or --dry-run)")
    if output is not None:
        output = Path(output)
        if output.suffix != ".gguf":
            raise UsageError(f"-o {output}: the output must be a .gguf file name",
                             hint="e.g. -o DeepSeek-R1-Q4_K_M.gguf (splits become ...-00001-of-0000N.gguf)")
        check_paths(src, output)
    device = resolve_device(opts.device)
    native = resolve_kernel(opts.kernel, device)
    require_kind(src, COMMAND, ("fp8", "float"), "DeepSeek's FP8 release or an unquantized (BF16) checkpoint",
                 INPUT_HINTS)
    ck = open_checkpoint(src, check_values=not dry_run)
    arch = arch_for(ck)
    given = [f"{cli} is not supported yet ({why})" for f, cli, why in arch.refused
             if (recipe if f == "recipe" else getattr(opts, f))]
    if given:
        raise UsageError(f"{arch.name} GGUF: {'; '.join(given)}",
                         hint="dsconvert gguf SRC -o out.gguf --type Q4_K_M (--tensor-type, --output-tensor-type, "
                              "--token-embedding-type, --split-* and --ray apply)")
    plan = make_plan(ck, opts, output, progress)
    report = base_report(COMMAND)
    report.update({
        "source": {"path": str(src), "family": version_label(ck.config), "format": _source_format(ck),
                   "shards": len(ck.shards), "tensors": len(ck.tensors),
                   **bytes_fields(sum(e.nbytes for _, e in ck.tensors.values()))},
        "kernel": {"name": "torch"} if native is None else {"name": "ggml", "library": str(native.path)},
        "options": {**asdict(opts), "imatrix": str(opts.imatrix) if opts.imatrix else None, "device": str(device),
                    "state_dir": str(opts.state_dir) if opts.state_dir else None, "recipe": recipe},
        "dry_run": dry_run,
        "plan": plan.summary(),
        "warnings": [p.to_dict() for p in ck.problems if not p.fatal]
                    + [p.to_dict() for p in tokenizer_problems(ck.root, ck.config)],  # (no tokenizer: refused)
    })
    check_max_memory(plan.peak_memory, opts.max_memory,
                     hint="the plan needs one chunk plus one kv_b_proj in memory; raise --max-memory")
    if output is not None:  # pre-flight, also on --dry-run: before the manifest exists
        check_output_writable(output)
        if opts.state_dir is not None:
            if Path(opts.state_dir).exists() and not Path(opts.state_dir).is_dir():
                raise UsageError(f"--state-dir {opts.state_dir}: is a file, not a folder",
                                 hint="give a folder for the manifest and report")
            check_output_writable(Path(opts.state_dir), "--state-dir")
        report["disk"] = check_free_disk(output.parent, {f.path.name: f.size for f in plan.files}, refuse=not dry_run)
        if "problem" in report["disk"]:
            report.setdefault("warnings", []).append(report["disk"]["problem"])
    if dry_run:
        report["output"] = {"path": str(output) if output else None,
                            "manifest": str(manifest_path(output, opts.state_dir)) if output else None,
                            "report": str(report_path(output, opts.state_dir)) if output else None}
        return report

    fopts = opts.fingerprinted()
    if plan.budget is not None:  # a measured choice may differ elsewhere (threads, BLAS): resume only the same one
        fopts["target_size_types"] = hashlib.sha256(json.dumps(
            {n: c["type"] for n, c in plan.budget["choices"].items()}, sort_keys=True).encode()).hexdigest()
    parts = {"source": _source_fingerprint(ck), "options": fopts, "command": COMMAND}
    fp = fingerprint(parts)
    output.parent.mkdir(parents=True, exist_ok=True)
    if opts.state_dir is not None:
        Path(opts.state_dir).mkdir(parents=True, exist_ok=True)
    decision = prepare_output(output, plan.files, fp, fopts, overwrite=overwrite, resume=resume,
                              state_dir=opts.state_dir, parts=parts, verify=verify, progress=progress)
    todo = [f for f in plan.files if f.name not in decision.done]
    written = []
    partial: dict[str, int] = {}  # file -> tensors kept from an interrupted .tmp
    n_layer = int(ck.config["num_hidden_layers"])
    mpath = manifest_path(output, opts.state_dir)
    if todo:
        with ByteProgress(sum(sum(plan.nbytes[t.name] for t in f.tensors) for f in todo), COMMAND,
                          enabled=progress) as bar:
            job = Job(rebuild, (str(src.resolve()), _as_rules(opts, plan), str(output.resolve())))
            for f in todo:
                st: dict = {}
                for stale in output.parent.glob(glob.escape(f.name) + "@*.tmp"):  # pieces of a killed run
                    stale.unlink()
                if executor.remote:
                    size, digest = write_file_remote(f, plan.files.index(f), plan, executor, job, bar, fp=fp,
                                                     resume=resume, stats=st)
                else:
                    size, digest = write_file(f, plan, device, opts.chunk_bytes, bar, n_layer, fp=fp,
                                              resume=resume, stats=st, threads=opts.threads or os.cpu_count() or 1,
                                              native=native)
                if st.get("tensors_reused"):
                    partial[f.name] = st["tensors_reused"]
                decision.manifest.files[f.name] = {"size": size, "sha256": digest}
                decision.manifest.save_file(mpath)
                written.append(f.name)
    seconds = time.perf_counter() - t0
    report.update({
        "output": {"path": str(output), "files": [str(f.path) for f in plan.files],
                   "tensors": len(plan.gguf_plan), **bytes_fields(plan.total_size),
                   "manifest": str(mpath), "sha256": {f.name: decision.manifest.files[f.name]["sha256"]
                                                       for f in plan.files}},
        "resumed": decision.resumed,
        "already_complete": decision.already_complete,
        "files_written": len(written),
        "files_reused": len(plan.files) - len(written),
        "tensors_reused": partial,
        "seconds": round(seconds, 3),
        "peak_rss": bytes_fields(peak_rss_bytes()),
        "executor": executor.report(),
    })
    full = dict(report, tensors=[{"name": t.name, "type": plan.types[t.name], "ne": list(t.ne),
                                  "bytes": plan.nbytes[t.name], "kind": t.kind, "sources": len(t.sources),
                                  "source_dtype": t.src_dtype} for t in plan.gguf_plan])
    rpath = report_path(output, opts.state_dir)
    write_atomic(rpath, (json.dumps(full, indent=2, default=str) + "\n").encode())
    decision.manifest.complete = True
    decision.manifest.save_file(mpath)
    report["report_path"] = str(rpath)
    return report


__all__ = ["COMMAND", "LAYOUT", "GGUFOptions", "ExportPlan", "OutFile", "FTYPE_NAMES", "type_names", "type_help",
           "make_plan", "run", "resolve_type", "resolve_kernel", "KERNELS", "load_imatrix", "encode", "tensor_chunks", "file_names",
           "manifest_path", "report_path"]
