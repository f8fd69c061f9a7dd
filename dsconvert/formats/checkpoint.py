"""A sharded Hugging Face checkpoint as dsconvert reads it: config, index, every shard header, FP8 pairs.

``scan`` reads headers only (no tensor data), so it takes seconds even on the 163-shard, 688 GB FP8 release.
It collects every problem instead of stopping at the first, so ``inspect`` can list them all; ``open_checkpoint``
raises on the fatal ones. Partners (``<name>_scale_inv``) are resolved through the index, never assumed to share
a shard (docs/checkpoint-layout.md §1, docs/known-failures.md item 1).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BadInputError, UnsupportedError
from . import deepseek_v3 as v3
from . import deepseek_v4 as v4
from .hf_config import FP8Scheme, family, fp8_scheme, load_config
from .registry import detect_format
from .safetensors_io import SafetensorsHeader, TensorEntry, read_header, read_tensor

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"


@dataclass
class Problem:
    """One thing wrong with a checkpoint. ``fatal`` problems stop conversion with exit code 3."""

    kind: str
    message: str
    file: str | None = None
    tensor: str | None = None
    hint: str | None = None
    fatal: bool = True
    unsupported: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Checkpoint:
    """Headers-level view of a checkpoint directory.

    Attributes:
        root: the directory (symlinked HF-cache snapshots allowed).
        config: parsed config.json.
        fp8: DeepSeek's FP8 block scheme, or None for unquantized checkpoints.
        shards: shard file names relative to ``root`` in index order (sorted).
        headers: shard name -> parsed header.
        tensors: tensor name -> (shard name, entry).
        index_metadata: the source index's ``metadata`` (may hold ``total_size``).
        problems: everything found wrong (fatal or not).
        quantized: ``quantization_config`` is a format dsconvert writes (compressed-tensors, AWQ, GPTQ): its
            F8_E4M3 ``weight`` tensors with a ``weight_scale`` partner (compressed-tensors float-quantized) are checked
            by that format's codec, not as DeepSeek FP8 weights.
        v4: the DeepSeek-V4 geometry when ``model_type`` is ``deepseek_v4`` (release layout: ``<stem>.scale``
            partners, FP4 experts, ``mtp.*``; docs/checkpoint-layout.md §11-12), else None.
        unreadable: tensor name -> shard, for tensors the index places in a shard whose header cannot be read
            (those tensors are not in ``tensors``; the shard's own problem says why). A truncated shard whose
            header parses keeps its tensors in ``tensors`` (counted, partners found) and gets one
            ``truncated_shard`` problem.
    """

    root: Path
    config: dict
    fp8: FP8Scheme | None
    shards: list[str]
    headers: dict[str, SafetensorsHeader]
    tensors: dict[str, tuple[str, TensorEntry]]
    index_metadata: dict = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    quantized: bool = False
    v4: v4.V4Geometry | None = None
    unreadable: dict[str, str] = field(default_factory=dict)

    # -- partners -----------------------------------------------------------------------------------------
    def is_fp8_weight(self, name: str) -> bool:
        return self.tensors[name][1].dtype == "F8_E4M3"

    def is_fp4_weight(self, name: str) -> bool:
        """A DeepSeek-V4 FP4 e2m1 weight (``I8``, two codes per byte) with its ``.scale`` partner."""
        return self.v4 is not None and self.tensors[name][1].dtype == "I8" and self.scale_of(name) in self.tensors

    def logical_shape(self, name: str) -> tuple[int, ...]:
        """The shape of ``name`` as a float tensor: a DeepSeek-V4 FP4 e2m1 weight stores ``[M, N/2]`` bytes
        (two codes per byte) for a logical ``[M, N]``; every other tensor is its stored shape."""
        shape = tuple(self.entry(name).shape)
        return (shape[0], 2 * shape[1]) if self.is_fp4_weight(name) else shape

    def scale_of(self, name: str) -> str:
        """Name of the scale partner of quantized tensor ``name``: ``<name>_scale_inv`` (V3) or, for V4,
        ``<stem>.scale`` of ``<stem>.weight``."""
        if self.v4 is not None:
            return v4.scale_name(name) if name.endswith(".weight") else name + ".scale"
        return name + SCALE_SUFFIX

    def is_scale(self, name: str) -> bool:
        if self.v4 is not None:
            return name.endswith(".scale") and name[: -len(".scale")] + ".weight" in self.tensors
        return name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in self.tensors

    def entry(self, name: str) -> TensorEntry:
        return self.tensors[name][1]

    def path_of(self, name: str) -> Path:
        return self.root / self.tensors[name][0]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read tensor ``name`` (optionally rows ``[r0, r1)``) from its shard, as stored (dtype unchanged)."""
        shard, ent = self.tensors[name]
        with open(self.root / shard, "rb") as f:
            return read_tensor(f, ent, rows)

    @property
    def num_hidden_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    def is_mtp(self, name: str) -> bool:
        """True for tensors of the multi-token-prediction block(s): layers >= ``num_hidden_layers`` (V4: ``mtp.*``)."""
        if self.v4 is not None:
            return name.startswith("mtp.")
        return v3.is_mtp(name, self.num_hidden_layers)

    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]


def _safe_relative(name: str) -> bool:
    """True when an index entry names a file inside the checkpoint directory (lexically; symlinks allowed)."""
    if not name or os.path.isabs(name) or "\\" in name:
        return False
    norm = os.path.normpath(name)
    return not (norm == ".." or norm.startswith("../") or norm.startswith("/"))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_hf_cache(path: str | os.PathLike) -> Path:
    """A Hugging Face cache repo folder (``models--org--name`` holding ``refs/main`` and ``snapshots/``) -> the
    snapshot folder ``refs/main`` names; any other path unchanged (a ``snapshots/<rev>`` path already works)."""
    p = Path(path)
    ref = p / "refs" / "main"
    if p.is_dir() and ref.is_file() and (p / "snapshots").is_dir():
        rev = ref.read_text().strip()
        snap = p / "snapshots" / rev
        if rev and snap.is_dir():
            return snap
    return p


def not_a_checkpoint_dir(root: Path, what: str = "checkpoint directory") -> BadInputError:
    """The error for a path that is not a directory: missing, a file, or a hub repo id that was not downloaded."""
    s = str(root)
    if not root.exists():
        if _HUB_ID.match(s) and not s.startswith("."):
            return BadInputError(f"{s}: no such {what} here; it looks like a Hugging Face repo id",
                                 hint=f"download it first (e.g. `hf download {s} --local-dir {s.split('/')[1]}`) "
                                      f"and pass the local folder; dsconvert never downloads")
        return BadInputError(f"{s}: no such {what}", hint="check the path")
    if root.is_file():
        return BadInputError(f"{s}: is a file, not a {what}",
                             hint="pass the folder holding config.json and the safetensors shards")
    return BadInputError(f"{s}: not a {what}", hint="pass the folder holding config.json and the shards")


def scan(root: str | os.PathLike) -> Checkpoint:
    """Read config, index and every shard header of ``root`` and cross-check them. Reads no tensor data.

    Raises:
        BadInputError: only when nothing can be read at all (no directory, no config.json). Everything else is
            collected in ``Checkpoint.problems``.
    """
    root = resolve_hf_cache(root)
    if not root.is_dir():
        raise not_a_checkpoint_dir(root)
    config = load_config(root)
    problems: list[Problem] = []
    try:
        family(config)
    except UnsupportedError as e:
        problems.append(Problem("model_type", e.message, "config.json", hint=e.hint, unsupported=True))
    geom = None
    if config.get("model_type") == v4.MODEL_TYPE and not problems:
        try:
            geom = v4.geometry(config)
        except UnsupportedError as e:
            problems.append(Problem("config", e.message, "config.json", hint=e.hint, unsupported=True))
    fp8 = None
    qc = config.get("quantization_config") or {}
    quantized = bool(qc) and qc.get("quant_method") != "fp8" and detect_format(qc) is not None
    if quantized:
        pass  # a checkpoint written by `dsconvert quantize` (or a peer tool in the same layout)
    else:
        try:
            fp8 = fp8_scheme(config)
        except UnsupportedError as e:
            problems.append(Problem("quantization_config", e.message, "config.json", hint=e.hint, unsupported=True))

    index_path = root / INDEX_NAME
    weight_map: dict[str, str] | None = None
    index_metadata: dict = {}
    if index_path.is_file():
        try:
            idx = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = idx["weight_map"]
            index_metadata = idx.get("metadata") or {}
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BadInputError(f"{index_path}: unreadable index ({e})", hint="re-download the index file") from e
        shard_names = sorted(set(weight_map.values()))
    elif (root / SINGLE_NAME).is_file():
        shard_names = [SINGLE_NAME]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        raise BadInputError(f"{root}: no {INDEX_NAME} and no {SINGLE_NAME}"
                            + (f" (found {len(found)} other .safetensors files)" if found else ""),
                            hint="SRC must be a Hugging Face safetensors checkpoint directory")

    headers: dict[str, SafetensorsHeader] = {}
    ok_shards = []
    for s in shard_names:
        if not _safe_relative(s):
            problems.append(Problem("index_path", f"index names a file outside the checkpoint: {s!r}", INDEX_NAME,
                                    hint="the index is corrupt or malicious; re-download it"))
            continue
        p = root / s
        if not p.is_file():
            held = sorted(n for n, v in (weight_map or {}).items() if v == s)
            what = f" for {len(held)} tensors, e.g. {held[0]!r}," if held else ""
            problems.append(Problem("missing_shard", f"index names shard {s!r}{what} which does not exist", s,
                                    held[0] if held else None,
                                    hint="the download is incomplete; fetch the missing shard"))
            continue
        try:
            headers[s] = read_header(p)
            ok_shards.append(s)
        except BadInputError as e:
            try:  # a header that parses but promises more bytes than the file has: a cut-short download
                headers[s] = read_header(p, check_size=False)
                ok_shards.append(s)
                kind = "truncated_shard"
            except BadInputError:
                kind = "bad_shard"
            problems.append(Problem(kind, e.message, s, hint=e.hint, unsupported=isinstance(e, UnsupportedError)))

    tensors: dict[str, tuple[str, TensorEntry]] = {}
    for s in ok_shards:
        for name, ent in headers[s].tensors.items():
            if name in tensors:
                problems.append(Problem("duplicate", f"tensor {name!r} appears in {tensors[name][0]} and {s}", s,
                                        name, hint="a checkpoint must hold each tensor once; re-download"))
                continue
            tensors[name] = (s, ent)
    if weight_map is not None:
        for name, s in weight_map.items():
            if s in headers and name not in headers[s].tensors:
                problems.append(Problem("index_mismatch", f"index maps {name!r} to {s}, which does not hold it", s,
                                        name, hint="the index and the shards disagree; re-download them"))
        for name, (s, _) in tensors.items():
            if weight_map.get(name) != s:
                problems.append(Problem("index_mismatch", f"shard {s} holds {name!r} but the index "
                                        + (f"maps it to {weight_map[name]}" if name in weight_map else "omits it"),
                                        s, name, hint="the index and the shards disagree; re-download them"))

    unreadable = {n: s for n, s in (weight_map or {}).items() if s not in headers and n not in tensors}
    ck = Checkpoint(root, config, fp8, shard_names, headers, tensors, index_metadata, problems, quantized=quantized,
                    v4=geom, unreadable=unreadable)
    if geom is not None:
        _check_v4(ck)
    elif config.get("model_type") != v4.MODEL_TYPE:
        _check_pairs(ck)
    ts = index_metadata.get("total_size")
    if isinstance(ts, int) and not any(p.kind in ("missing_shard", "bad_shard", "truncated_shard")
                                       for p in problems):
        actual = sum(e.nbytes for _, e in tensors.values())
        if ts != actual:
            problems.append(Problem("total_size", f"index metadata.total_size is {ts} but the tensors hold {actual} "
                                    "bytes", INDEX_NAME, fatal=False))
    return ck


def _check_pairs(ck: Checkpoint) -> None:
    """Shape-level FP8 checks: every F8_E4M3 weight has an F32 2-D scale of the ceil-div grid; no orphans."""
    from ..quant.fp8_block import scale_grid  # pure shape helper

    block = ck.fp8.block if ck.fp8 else (128, 128)
    for name, (s, ent) in ck.tensors.items():
        if ent.dtype in ("F8_E5M2", "F8_E8M0"):
            ck.problems.append(Problem("fp8_format", f"tensor {name!r} is {ent.dtype}; only DeepSeek's F8_E4M3 "
                                       "weights with F32 block scales are supported", s, name, unsupported=True,
                                       hint="this FP8 variant is refused rather than mis-converted"))
        elif name.endswith(".scale") and ent.dtype in ("U8", "F8_E8M0"):
            ck.problems.append(Problem("fp8_format", f"tensor {name!r} looks like an E8M0 block scale "
                                       "(DeepSeek-V4-style layout)", s, name, unsupported=True,
                                       hint="DeepSeek-V4 checkpoints are read when config.json says model_type "
                                            "deepseek_v4; restore the release's config.json"))
        elif ent.dtype == "F8_E4M3":
            if ck.fp8 is None and ck.quantized and name.endswith(".weight") and name + "_scale" in ck.tensors:
                continue  # compressed-tensors float-quantized: weight + weight_scale, read by its codec
            if (ck.fp8 is None and ck.quantized and name.endswith(".weight_scale")
                    and name[: -len("_scale")] + "_packed" in ck.tensors):
                continue  # NVFP4 e4m3 group scales beside weight_packed, read by the FP4 codec
            if ck.fp8 is None:
                ck.problems.append(Problem("fp8_undeclared", f"tensor {name!r} is F8_E4M3 but config.json declares "
                                           "no FP8 quantization_config", s, name,
                                           hint="restore the release's config.json"))
                continue
            sname = name + SCALE_SUFFIX
            if len(ent.shape) != 2:
                ck.problems.append(Problem("fp8_shape", f"FP8 tensor {name!r} has shape {list(ent.shape)}; block "
                                           "dequantization needs 2-D weights", s, name, unsupported=True))
                continue
            if sname not in ck.tensors and sname in ck.unreadable:
                continue  # the index puts the scale in a missing or unreadable shard: that shard's problem says so
            if sname not in ck.tensors:
                ck.problems.append(Problem("missing_scale", f"FP8 tensor {name!r} has no {sname.rsplit('.', 1)[-1]}"
                                           " partner anywhere in the checkpoint", s, name,
                                           hint="the checkpoint is incomplete; re-download the shard holding "
                                                "the scale (dsconvert never writes FP8 bytes through unscaled)"))
                continue
            ss, sent = ck.tensors[sname]
            grid = scale_grid(ent.shape, block)
            if sent.dtype != "F32":
                ck.problems.append(Problem("scale_dtype", f"scale {sname!r} is {sent.dtype}, expected F32", ss,
                                           sname, unsupported=True,
                                           hint="E8M0/U8 scale layouts are refused rather than guessed"))
            elif tuple(sent.shape) != grid:
                ck.problems.append(Problem("scale_grid", f"scale {sname!r} has shape {list(sent.shape)} but weight "
                                           f"{list(ent.shape)} with block {list(block)} needs {list(grid)}", ss,
                                           sname, hint="the scale does not belong to this weight; re-download"))
    for name, (s, ent) in ck.tensors.items():
        if name.endswith(SCALE_SUFFIX):
            w = name[: -len(SCALE_SUFFIX)]
            if w not in ck.tensors:
                ck.problems.append(Problem("orphan_scale", f"scale {name!r} has no weight {w!r}", s, name,
                                           hint="the checkpoint is incomplete; re-download"))
            elif ck.tensors[w][1].dtype != "F8_E4M3":
                ck.problems.append(Problem("orphan_scale", f"scale {name!r} belongs to {w!r}, which is "
                                           f"{ck.tensors[w][1].dtype}, not F8_E4M3", s, name))


def _check_v4(ck: Checkpoint) -> None:
    """Header-level checks of a DeepSeek-V4 checkpoint against the layout table (docs/checkpoint-layout.md §12-13):
    every expected tensor present with its shape; quantized families stored as the config declares (F8_E4M3 /
    FP4 ``I8`` with a ``.scale`` of the exact grid, E8M0 or F32); float families in a float dtype; ``tid2eid``
    integer; no tensor the table does not know (a hash layer's unused ``ffn.gate.bias`` is tolerated). In a
    ``dsconvert quantize`` output a quantized module's ``<name>.weight_*`` tensors stand for its ``.weight``."""
    g = ck.v4
    seen: set[str] = set()
    floats = ("BF16", "F16", "F32")
    for e in v4.expected_tensors(g):
        where = ck.tensors.get(e.name)
        if where is None and ck.quantized:  # `dsconvert quantize` output: the module's packed form replaces it
            packed = [n for n in ck.tensors if n.startswith(e.name + "_")]
            if packed:
                seen.update(packed)  # checked by the codec that reads them (convert/quantized_reader.py)
                continue
        if where is None:
            ck.problems.append(Problem("missing_tensor", f"DeepSeek-V4 tensor {e.name!r} ({e.family.role}, "
                                       f"{list(e.shape)}) is absent", INDEX_NAME, e.name,
                                       hint="the checkpoint is incomplete or config.json does not match it "
                                            "(layers, compress_ratios, num_hash_layers); re-download"))
            continue
        s, ent = where
        seen.add(e.name)
        want = v4.stored_dtype(e, g)
        if want is None:
            ok = ent.dtype in (("I64", "I32") if e.storage == "index" else floats)
            if not ok:
                ck.problems.append(Problem("dtype", f"tensor {e.name!r} is {ent.dtype}; expected "
                                           + ("I64/I32" if e.storage == "index" else "BF16/F16/F32")
                                           + (" (config.json declares no quantization)" if e.storage != "index"
                                              and not g.quantized else ""), s, e.name, unsupported=True,
                                           hint="restore the release's config.json or re-download this shard"))
                continue
            if tuple(ent.shape) != e.shape:
                ck.problems.append(Problem("shape", f"tensor {e.name!r} has shape {list(ent.shape)}, expected "
                                           f"{list(e.shape)} from config.json", s, e.name,
                                           hint="config.json does not match the shards; re-download"))
            continue
        sname = v4.scale_name(e.name)
        seen.add(sname)
        what = "FP4 e2m1 (I8, two per byte)" if want == "I8" else "F8_E4M3"
        if ent.dtype != want:
            ck.problems.append(Problem("dtype", f"tensor {e.name!r} is {ent.dtype}; config.json "
                                       f"(expert_dtype {g.expert_dtype}) says {what}", s, e.name, unsupported=True,
                                       hint="fix quantization_config.expert_dtype / the top-level expert_dtype, "
                                            "or re-download"))
            continue
        if tuple(ent.shape) != v4.stored_shape(e, g):
            ck.problems.append(Problem("shape", f"tensor {e.name!r} has shape {list(ent.shape)}, expected "
                                       f"{list(v4.stored_shape(e, g))} ({what} of logical {list(e.shape)})", s,
                                       e.name, hint="config.json does not match the shards; re-download"))
            continue
        if sname not in ck.tensors:
            ck.problems.append(Problem("missing_scale", f"{what} tensor {e.name!r} has no {sname!r} partner "
                                       "anywhere in the checkpoint", s, e.name,
                                       hint="the checkpoint is incomplete; re-download the shard holding the scale "
                                            "(dsconvert never passes quantized bytes through unscaled)"))
            continue
        ss, sent = ck.tensors[sname]
        grid = v4.scale_shape(e, g)
        ok_dtypes = ("F8_E8M0",) if want == "I8" else ("F8_E8M0", "F32")
        if sent.dtype not in ok_dtypes:
            ck.problems.append(Problem("scale_dtype", f"scale {sname!r} is {sent.dtype}, expected "
                                       + " or ".join(ok_dtypes), ss, sname, unsupported=True,
                                       hint="this scale encoding is refused rather than guessed"))
        elif tuple(sent.shape) != grid:
            ck.problems.append(Problem("scale_grid", f"scale {sname!r} has shape {list(sent.shape)} but {what} "
                                       f"weight of logical shape {list(e.shape)} needs {list(grid)}"
                                       + (" (one per row per 32 inputs)" if want == "I8" else " (128x128 blocks)"),
                                       ss, sname, hint="the scale does not belong to this weight; re-download"))
    for name, (s, ent) in ck.tensors.items():
        if name in seen:
            continue
        m = re.match(r"^layers\.(\d+)\.ffn\.gate\.bias$", name)
        if m and g.moe_kind(int(m.group(1))) == "hash":
            ck.problems.append(Problem("unused_tensor", f"hash-routed layer tensor {name!r} is unused (routing "
                                       "uses tid2eid); it is copied as is", s, name, fatal=False))
            continue
        kind = "orphan_scale" if name.endswith(".scale") else "unknown_tensor"
        ck.problems.append(Problem(kind, f"tensor {name!r} is not part of the DeepSeek-V4 layout for this "
                                   f"config.json ({g.layers} layers, {g.mtp} MTP, {g.experts} experts)", s, name,
                                   hint="config.json does not match the shards, or this is a different model "
                                        "(V4.1 and vision variants are not supported)"))


def check_scale_values(ck: Checkpoint, names: list[str] | None = None) -> list[Problem]:
    """Read every scale (V3 ``weight_scale_inv``: ~160 MB for full V3; V4 ``.scale``) and flag NaN, Inf or
    non-positive F32 values and the E8M0 NaN byte 255."""
    probs = []
    by_shard: dict[str, list[str]] = {}
    default = [n for n in ck.tensors if ck.is_scale(n)] if ck.v4 is not None else \
        [n for n in ck.tensors if n.endswith(SCALE_SUFFIX)]
    for n in names if names is not None else default:
        by_shard.setdefault(ck.tensors[n][0], []).append(n)
    for s, ns in by_shard.items():
        with open(ck.root / s, "rb") as f:
            for n in ns:
                ent = ck.tensors[n][1]
                if ent.dtype == "F8_E8M0":
                    t = read_tensor(f, ent).view(torch.uint8)
                    bad = t == 255
                    if bool(bad.any()):
                        i = int(bad.reshape(-1).nonzero()[0])
                        probs.append(Problem("scale_value", f"e8m0 scale {n!r} holds {int(bad.sum())} NaN bytes "
                                             f"(0xFF; first at flat index {i})", s, n,
                                             hint="the scale is corrupt; re-download this shard"))
                    continue
                if ent.dtype != "F32":
                    continue
                t = read_tensor(f, ent)
                bad = ~torch.isfinite(t) | (t <= 0)
                if bool(bad.any()):
                    i = int(bad.reshape(-1).nonzero()[0])
                    v = float(t.reshape(-1)[i])
                    probs.append(Problem("scale_value", f"scale {n!r} holds {int(bad.sum())} non-finite or "
                                         f"non-positive values (first at flat index {i}: {v})", s, n,
                                         hint="the scale is corrupt; re-download this shard"))
    return probs


def check_v4_routing_tables(ck: Checkpoint) -> list[Problem]:
    """Read every DeepSeek-V4 hash-routing table ``ffn.gate.tid2eid`` ([V, k] integers, ~6 MB each for Flash) and
    flag expert ids outside ``[0, n_routed_experts)``: a corrupt table would route tokens silently wrong."""
    probs = []
    for name in (n for n in ck.tensors if n.endswith(".ffn.gate.tid2eid")):
        t = ck.read(name)
        bad = (t < 0) | (t >= ck.v4.experts)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            probs.append(Problem("routing_table", f"hash-routing table {name!r} holds {int(bad.sum())} expert ids "
                                 f"outside [0, {ck.v4.experts}) (first at flat index {i}: {int(t.reshape(-1)[i])})",
                                 ck.tensors[name][0], name, hint="the table is corrupt; re-download this shard"))
    return probs


def open_checkpoint(root: str | os.PathLike, *, check_values: bool = True) -> Checkpoint:
    """``scan`` plus scale-value checks; raise on any fatal problem.

    Raises:
        UnsupportedError / BadInputError: the first fatal problem's message, plus a count of the others.
    """
    ck = scan(root)
    if check_values and not ck.fatal_problems():
        ck.problems.extend(check_scale_values(ck))
        if ck.v4 is not None:
            ck.problems.extend(check_v4_routing_tables(ck))
    fatal = ck.fatal_problems()
    if fatal:
        p = fatal[0]
        more = f" (and {len(fatal) - 1} more problems; run `dsconvert inspect` to list them)" if len(fatal) > 1 else ""
        where = f"{ck.root / p.file}: " if p.file and not p.message.startswith(str(ck.root)) else ""
        cls = UnsupportedError if p.unsupported else BadInputError
        raise cls(where + p.message + more, hint=p.hint)
    return ck
