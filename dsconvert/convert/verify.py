"""``dsconvert verify OUT``: check a finished output against its ``manifest.json`` and say exactly what is wrong.

A directory output (fp8-to-bf16, quantize) is checked for:

* the manifest itself: present, ours, marked complete;
* every file it lists (model shards, then index, config and copied files): present, the recorded size and, unless
  ``quick``, the recorded sha256;
* the index: parsable; every entry names a shard the manifest lists, and that shard's header holds the tensor
  with the dtype and shape the manifest recorded; every tensor of every shard is in the index once;
  ``metadata.total_size`` equals the tensor bytes;
* ``config.json``: present, JSON, with ``model_type``.

A GGUF output (``FILE.gguf`` with its ``FILE.gguf.dsconvert-manifest.json``) is checked for every file of the set
(size, sha256) and, for each file, a GGUF header that parses with every tensor's data inside the file.

``quick`` skips the sha256 (it reads headers only: seconds, where the full check reads every byte: hours on the
1.37 TB BF16 release). Each problem is ``{"file", "check", "expected", "found", "message"}``. Source of the
manifest fields: docs/cli-conventions.md ("Resume", "Verify").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import BadInputError
from ..formats.checkpoint import INDEX_NAME
from ..formats.safetensors_io import read_header
from ..report import base_report
from .manifest import MANIFEST_NAME, Manifest, file_problem
from .progress import ByteProgress

#: Problems listed per check before the rest are summarised in one line (a wrong index can name 92k tensors).
MAX_LISTED = 50


def _problem(file: str, check: str, expected, found, message: str) -> dict:
    return {"file": file, "check": check, "expected": expected, "found": found, "message": message}


def _check_files(base: Path, files: dict[str, dict], quick: bool, bar: ByteProgress, model_files: set[str]
                 ) -> list[dict]:
    probs = []
    for name, meta in sorted(files.items()):
        bar.describe(name, boundary=name in model_files)  # a plain line per model file, not per small file
        p = file_problem(base / name, meta, not quick, bar, name=name)
        if p is not None:
            probs.append(p)
    return probs


def _check_index(out: Path, man: Manifest) -> list[dict]:
    """Index against the shard headers and the tensors the manifest recorded."""
    ip = out / INDEX_NAME
    if not ip.is_file():
        return [_problem(INDEX_NAME, "missing", "present", "absent", f"{INDEX_NAME}: missing")]
    try:
        idx = json.loads(ip.read_text(encoding="utf-8"))
        wm = idx["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [_problem(INDEX_NAME, "parse", "a JSON index with weight_map", str(e),
                         f"{INDEX_NAME}: unreadable ({e})")]
    probs: list[dict] = []
    headers = {}
    for shard in sorted(set(wm.values())):
        if shard not in man.files:
            probs.append(_problem(INDEX_NAME, "index_shard", "a shard listed in the manifest", shard,
                                  f"{INDEX_NAME} names shard {shard!r}, which the manifest does not list"))
            continue
        try:
            headers[shard] = read_header(out / shard)
        except (BadInputError, OSError) as e:
            probs.append(_problem(shard, "header", "a readable safetensors header",
                                  getattr(e, "message", str(e)), f"{shard}: header unreadable "
                                  f"({getattr(e, 'message', e)})"))
    for name, shard in sorted(wm.items()):
        h = headers.get(shard)
        if h is None:
            continue
        ent = h.tensors.get(name)
        if ent is None:
            probs.append(_problem(shard, "index_entry", f"tensor {name}", "absent",
                                  f"{INDEX_NAME} maps {name!r} to {shard}, which does not hold it"))
            continue
        rec = man.tensors.get(name)
        if rec is not None:
            r_file, r_dtype, r_shape = rec
            if r_file != shard:
                probs.append(_problem(INDEX_NAME, "index_entry", r_file, shard,
                                      f"{INDEX_NAME} maps {name!r} to {shard}; it was written to {r_file}"))
            if (ent.dtype, list(ent.shape)) != (r_dtype, list(r_shape)):
                probs.append(_problem(shard, "tensor", f"{r_dtype} {list(r_shape)}",
                                      f"{ent.dtype} {list(ent.shape)}",
                                      f"{shard}: tensor {name!r} is {ent.dtype} {list(ent.shape)}, written as "
                                      f"{r_dtype} {list(r_shape)}"))
    for shard, h in sorted(headers.items()):
        for name in sorted(h.tensors):
            if wm.get(name) != shard:
                probs.append(_problem(INDEX_NAME, "index_entry", shard, wm.get(name),
                                      f"{shard} holds {name!r} but {INDEX_NAME} "
                                      + (f"maps it to {wm[name]}" if name in wm else "omits it")))
    if man.tensors:
        for name in sorted(set(man.tensors) - set(wm)):
            probs.append(_problem(INDEX_NAME, "index_entry", f"tensor {name}", "absent",
                                  f"{INDEX_NAME} lacks {name!r}, which was written to {man.tensors[name][0]}"))
    ts = (idx.get("metadata") or {}).get("total_size")
    if not probs and ts is not None:
        actual = sum(e.nbytes for h in headers.values() for e in h.tensors.values())
        if ts != actual:
            probs.append(_problem(INDEX_NAME, "total_size", actual, ts,
                                  f"{INDEX_NAME}: metadata.total_size {ts}, the shards hold {actual} bytes"))
    return probs


def _check_config(out: Path) -> list[dict]:
    p = out / "config.json"
    if not p.is_file():
        return [_problem("config.json", "missing", "present", "absent", "config.json: missing")]
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [_problem("config.json", "parse", "JSON", str(e), f"config.json: not JSON ({e})")]
    if not isinstance(cfg, dict) or not cfg.get("model_type"):
        return [_problem("config.json", "config", "an object with model_type", type(cfg).__name__,
                         "config.json: no model_type")]
    return []


def _check_gguf_headers(base: Path, names: list[str]) -> list[dict]:
    """Each GGUF file parses (gguf-py's reader) and every tensor's data lies inside the file."""
    import gguf

    probs = []
    for name in names:
        p = base / name
        if not p.is_file():
            continue  # already reported as missing
        try:
            r = gguf.GGUFReader(str(p))
            size = p.stat().st_size
            for t in r.tensors:
                end = int(t.data_offset) + int(t.n_bytes)
                if end > size:
                    probs.append(_problem(name, "tensor", f"data within {size} bytes", end,
                                          f"{name}: tensor {t.name} ends at byte {end}, past the file's {size}"))
                    break
        except Exception as e:  # noqa: BLE001 - any parse failure of a damaged file is the finding
            probs.append(_problem(name, "header", "a GGUF header", f"{type(e).__name__}: {e}",
                                  f"{name}: the GGUF header does not parse ({type(e).__name__}: {e})"))
    return probs


def _cap(probs: list[dict]) -> list[dict]:
    """At most :data:`MAX_LISTED` problems per check, then one line counting the rest."""
    out, seen = [], {}
    for p in probs:
        seen[p["check"]] = seen.get(p["check"], 0) + 1
        if seen[p["check"]] <= MAX_LISTED:
            out.append(p)
    for check, n in seen.items():
        if n > MAX_LISTED:
            out.append(_problem("*", check, None, n - MAX_LISTED, f"... and {n - MAX_LISTED} more {check} problems"))
    return out


def verify_output(path: Path, *, quick: bool = False, progress: bool | None = None) -> dict:
    """Check the output at ``path`` (a directory, or a ``.gguf`` file of a GGUF output) against its manifest;
    returns the report with ``ok`` and ``problems``. The caller maps ``ok == False`` to exit 3.

    Raises:
        BadInputError (exit 3): ``path`` does not exist, or holds no dsconvert manifest to check against.
    """
    t0 = time.perf_counter()
    path = Path(path)
    gguf_out = path.suffix == ".gguf" and not path.is_dir()
    if gguf_out:
        from .gguf_export import manifest_path

        mpath, base = manifest_path(path), path.parent
    else:
        if not path.exists():
            raise BadInputError(f"{path}: no such output", hint="pass the -o folder (or .gguf file) of a dsconvert "
                                                                "command")
        if not path.is_dir():
            raise BadInputError(f"{path}: not an output folder or .gguf file",
                                hint="pass the -o folder of fp8-to-bf16/quantize, or the .gguf file of gguf")
        mpath, base = path / MANIFEST_NAME, path
    man = Manifest.load_file(mpath)
    if man is None:
        raise BadInputError(f"{mpath}: no dsconvert manifest" + (" (missing)" if not mpath.exists() else
                                                                 " (unreadable or not ours)"),
                            hint="verify checks outputs written by dsconvert; rerun the command that wrote it")
    probs: list[dict] = []
    if not man.complete:
        probs.append(_problem(mpath.name, "complete", True, False, f"{mpath.name}: the output is not complete (the "
                              f"{man.command} run was interrupted or failed); rerun that command to finish it"))
    files = dict(man.files)
    if not gguf_out:
        files.update(man.aux)
    total = sum(int(m.get("size") or 0) for m in files.values()) if not quick else 0
    with ByteProgress(total, "verify", enabled=False if quick else progress) as bar:
        probs += _check_files(base, files, quick, bar, set(man.files))
        hashed = bar.done if not quick else 0
    if gguf_out:
        probs += _check_gguf_headers(base, sorted(man.files))
    else:
        probs += _check_index(path, man) + _check_config(path)
        if man.complete and not man.tensors:
            probs.append(_problem(MANIFEST_NAME, "manifest", "recorded tensors", None,
                                  "the manifest predates per-tensor records: dtypes/shapes were not checked "
                                  "against what was written"))
            probs[-1]["warning"] = True
    errors = [p for p in probs if not p.get("warning")]
    rep = base_report("verify")
    rep.update({
        "path": str(path), "manifest": str(mpath), "written_by": man.command, "complete": man.complete,
        "mode": "quick" if quick else "full", "files_checked": len(files),
        "bytes_hashed": hashed, "ok": not errors, "problems": _cap(errors),
        "warnings": [p["message"] for p in probs if p.get("warning")],
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return rep
