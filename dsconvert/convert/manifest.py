"""The resume manifest (``OUT/manifest.json``) and the rules for reusing an existing output directory.

A manifest holds the fingerprint (sha256 of the source index and config plus the options that change the
bytes), the tool version, and the size + sha256 of every finished output file. Finished files were written
under a temporary name, fsynced and renamed, so a file listed here is complete; a resume re-hashes it before
trusting it (``verify="full"``) or checks its size only (``verify="size"``). Source of the convention:
docs/cli-conventions.md ("Resume"), GPTQModel PR #3057.

The manifest's content does not depend on the order in which shards finish: ``files`` is written sorted by
name. Every write-then-rename of dsconvert goes through :func:`write_atomic` / :func:`commit_tmp` /
:func:`copy_atomic` here: temp name, fsync of the file, rename, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import OutputExistsError, UsageError
from ..formats.safetensors_io import sha256_file

MANIFEST_NAME = "manifest.json"


def fingerprint(parts: dict) -> str:
    """sha256 of a canonical JSON dump of ``parts`` (source hashes and byte-changing options)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


#: option keys whose flag is not ``--`` + the key with ``-`` for ``_``
_FLAG_OF = {"tensor_types": "--tensor-type", "imatrix": "--imatrix (sha256)",
            "fp8_input": "what FP8 weights are quantized from (an output of an earlier dsconvert version)",
            "target_size_types": "the types --target-size chose (measured again)"}


def _show(v) -> str:
    """A fingerprint value as a person reads it (no Python reprs)."""
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_show, v)) + "]" if v else "none"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return f"sha256 {v[:12]}..."
    return str(v)


def _flat(d: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out: dict[tuple, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """What differs between two sets of fingerprint parts, one line each, old value then new:
    ``"--mtp: keep -> drop"``, ``"source file config.json: sha256 1a2b... -> 3c4d..."``.

    ``old``/``new`` have the shape the writers fingerprint: ``{"source": {...}, "options": {...}, "command": str}``
    (the source part holds file name -> sha256, possibly nested, e.g. gguf's ``files`` and ``tensor_headers``).
    """
    a, b = _flat(old), _flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
        if va == vb:
            continue
        if key[0] == "options":
            what = _FLAG_OF.get(key[-1], "--" + key[-1].replace("_", "-"))
        elif key[0] == "source":
            rest = [k for k in key[1:] if k != "files"]
            what = ("source tensor headers (names, dtypes, shapes, offsets)" if rest == ["tensor_headers"]
                    else "source file " + "/".join(rest))
        else:
            what = "/".join(key)
        lines.append(f"{what}: {_show(va) if va != '(absent)' else va} -> {_show(vb) if vb != '(absent)' else vb}")
    return lines


def mismatch_detail(man: "Manifest", parts: dict | None) -> str:
    """``"; it differs in: --mtp: keep -> drop"`` for a refused rerun, or "" when the old manifest predates
    stored fingerprint parts (the message then stays general)."""
    if man.parts is None or parts is None:
        return ""
    diff = fingerprint_diff(man.parts, parts)
    return "; it differs in: " + "; ".join(diff) if diff else ""


def source_fingerprint_parts(src: Path, files: list[str]) -> dict:
    """sha256 of each named small source file (index, config) that exists; shard headers are covered by the index."""
    out = {}
    for name in files:
        p = src / name
        if p.is_file():
            out[name] = sha256_file(p)
    return out


@dataclass
class Manifest:
    """State of one output directory."""

    command: str
    fingerprint: str
    options: dict
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"size": int, "sha256": str}
    complete: bool = False
    version: str = __version__
    #: what ``fingerprint`` hashes (source file hashes, options, command), kept so that a refused rerun can say
    #: what differs; None in manifests written before it was stored
    parts: dict | None = None
    # Recorded when the output completes (``dsconvert verify`` checks them; older manifests lack them):
    aux: dict[str, dict] = field(default_factory=dict)  # index, config, copied files -> {"size", "sha256"}
    tensors: dict[str, list] = field(default_factory=dict)  # tensor name -> [file, dtype, shape]

    def to_json(self) -> str:
        doc = {"tool": "dsconvert", "version": self.version, "command": self.command,
               "fingerprint": self.fingerprint, "options": self.options, "complete": self.complete,
               "files": dict(sorted(self.files.items()))}
        if self.parts is not None:
            doc["fingerprint_parts"] = self.parts
        if self.aux:
            doc["aux"] = dict(sorted(self.aux.items()))
        text = json.dumps(doc, indent=2, sort_keys=False)
        if self.tensors:  # one compact line per tensor: ~90 bytes each, 8 MB for the 671B release
            rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                               for k, v in sorted(self.tensors.items()))
            text = text[:-2] + ',\n  "tensors": {\n' + rows + "\n  }\n}"
        return text + "\n"
    def record_complete(self, out_dir: Path, aux_names: list[str], tensors: dict[str, list]) -> None:
        """Record, for ``dsconvert verify``, the size + sha256 of the small files written besides the model files
        (``aux_names`` relative to ``out_dir``; absent ones are skipped) and each tensor's ``[file, dtype,
        shape]``; the caller then sets ``complete`` and saves."""
        self.aux = {}
        for name in aux_names:
            p = out_dir / name
            if p.is_file():
                self.aux[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        self.tensors = {k: [f, d, list(s)] for k, (f, d, s) in tensors.items()}

    def save(self, out_dir: Path) -> None:
        """Atomically replace ``out_dir/manifest.json``."""
        self.save_file(out_dir / MANIFEST_NAME)

    def save_file(self, path: Path) -> None:
        """Atomically replace the manifest file ``path`` (single-file outputs keep it next to the file)."""
        write_atomic(path, self.to_json().encode())

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest | None":
        return cls.load_file(out_dir / MANIFEST_NAME)

    @classmethod
    def load_file(cls, p: Path) -> "Manifest | None":
        """The dsconvert manifest stored at ``p``, or None if absent or not ours."""
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
            if d.get("tool") != "dsconvert":
                return None
            parts = d.get("fingerprint_parts")
            return cls(d["command"], d["fingerprint"], d.get("options", {}), d.get("files", {}),
                       bool(d.get("complete")), d.get("version", "?"),
                       parts=parts if isinstance(parts, dict) else None, aux=d.get("aux", {}),
                       tensors=d.get("tensors", {}))
        except (ValueError, KeyError, TypeError, OSError):
            return None


def fsync_dir(d: Path) -> None:
    """fsync directory ``d`` so a rename inside it is durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_tmp(tmp: Path, path: Path) -> None:
    """Make the finished temporary file ``tmp`` durable and rename it to ``path``: fsync ``tmp``, rename,
    fsync the directory. On any failure (or an interruption) ``tmp`` is deleted and the error re-raised.

    Raises:
        OSError: from fsync or rename.
    """
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_open(path: Path):
    """Open ``path.tmp`` for writing; on a clean exit flush, fsync, rename it to ``path`` and fsync the directory.
    On any failure or interruption ``path.tmp`` is deleted and the exception propagates (``path`` untouched).

    Raises:
        OSError: disk full, permissions.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` + fsync + rename + directory fsync (:func:`atomic_open`).

    Raises:
        OSError: disk full, permissions.
    """
    with atomic_open(path) as f:
        f.write(data)


def copy_atomic(src: Path, dst: Path, bufsize: int = 16 << 20) -> str:
    """Copy ``src`` (symlinks followed) to ``dst`` through :func:`atomic_open`; returns the sha256 (hex) of the
    bytes copied, computed while copying. ``dst.tmp`` never survives a failure.

    Raises:
        OSError: unreadable source, disk full, permissions.
    """
    h = hashlib.sha256()
    with open(src, "rb") as fi, atomic_open(dst) as fo:
        while chunk := fi.read(bufsize):
            h.update(chunk)
            fo.write(chunk)
    return h.hexdigest()


def _is_within(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_paths(src: Path, out: Path) -> None:
    """Refuse an output that is, or is inside, or contains the source (a source is never touched).

    Raises:
        UsageError (exit 2).
    """
    rs, ro = src.resolve(), out.resolve()
    if rs == ro or _is_within(ro, rs) or _is_within(rs, ro):
        raise UsageError(f"output {out} overlaps the source {src}", hint="choose an output outside SRC")


@dataclass
class ResumeDecision:
    manifest: Manifest
    done: set[str]  # output files verified complete and reusable
    resumed: bool
    already_complete: bool


VERIFY_MODES = ("full", "size")


def check_verify_mode(mode: str) -> str:
    """``--verify`` value, checked: ``full`` (size + sha256 of every file) or ``size`` (sizes only).

    Raises:
        UsageError (exit 2): any other value.
    """
    if mode not in VERIFY_MODES:
        raise UsageError(f"--verify {mode!r}", hint="use full (size + sha256, reads every byte) or size "
                                                    "(sizes only, instant; see docs/cli-conventions.md, Resume)")
    return mode


def hash_file(path: Path, progress=None, bufsize: int = 16 << 20) -> str:
    """sha256 (hex) of ``path``, advancing ``progress`` (a :class:`~.progress.ByteProgress`) by the bytes read.

    Raises:
        OSError: unreadable file.
    """
    from . import cancel

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            cancel.check()
            h.update(chunk)
            if progress is not None:
                progress.advance(len(chunk))
    return h.hexdigest()


def file_problem(path: Path, meta: dict, full: bool, progress=None, name: str | None = None) -> dict | None:
    """None when ``path`` matches its manifest entry ``meta`` (``{"size": bytes, "sha256": hex}``): present, the
    recorded size and, with ``full``, the recorded sha256. Otherwise one problem
    ``{"file", "check": "missing"|"size"|"sha256", "expected", "found", "message"}``."""
    name = name or Path(path).name
    if not Path(path).is_file():
        return {"file": name, "check": "missing", "expected": "present", "found": "absent",
                "message": f"{name}: missing (the manifest lists {meta.get('size')} bytes)"}
    size = Path(path).stat().st_size
    if size != meta.get("size"):
        return {"file": name, "check": "size", "expected": meta.get("size"), "found": size,
                "message": f"{name}: {size} bytes, the manifest says {meta.get('size')}"}
    if full:
        digest = hash_file(path, progress)
        if digest != meta.get("sha256"):
            return {"file": name, "check": "sha256", "expected": meta.get("sha256"), "found": digest,
                    "message": f"{name}: sha256 {digest[:16]}…, the manifest says {str(meta.get('sha256'))[:16]}… "
                               "(same size, different bytes)"}
    return None


def verify_files(base: Path, files: dict[str, dict], mode: str, progress: bool | None, label: str) -> set[str]:
    """Names of ``files`` (relative to ``base``) that match their manifest entries under ``mode`` (``full`` or
    ``size``). In ``full`` mode the bytes hashed show as progress on stderr (``label``; ``progress`` as for
    :class:`~.progress.ByteProgress`): on the 671B release this reads 1.37 TB, ``size`` reads nothing."""
    from .progress import ByteProgress

    full = mode == "full"
    total = sum(int(m.get("size") or 0) for m in files.values()) if full else 0
    ok = set()
    with ByteProgress(total, label, enabled=progress if full and files else False) as bar:
        for n, meta in sorted(files.items()):
            bar.describe(n)
            if file_problem(base / n, meta, full, bar) is None:
                ok.add(n)
    return ok


class OutputLocation:
    """Where an output lives, for :func:`decide_resume`: the manifest's home, the files it may vouch for and
    how to clear or tidy them. :class:`DirectoryLocation` is a model folder; the GGUF exporter has a file
    location (one ``.gguf`` or its splits, manifest beside it or in ``--state-dir``)."""

    base: Path  # the folder the manifest's file names are relative to

    def load(self) -> Manifest | None:
        raise NotImplementedError

    def save(self, man: Manifest) -> None:
        raise NotImplementedError

    def existing(self) -> list[Path]:
        """Finished-looking output files present now (temporaries excluded)."""
        raise NotImplementedError

    def unvouched_error(self, existing: list[Path]) -> OutputExistsError:
        raise NotImplementedError

    def mismatch_error(self, man: Manifest, command: str, detail: str) -> OutputExistsError:
        raise NotImplementedError

    def tidy_resumed(self, man: Manifest, done: set[str]) -> None:
        """After a resume decision: drop what cannot be reused (temporaries of unfinished files)."""
        raise NotImplementedError

    def clear(self) -> None:
        """A fresh start: remove what an earlier run of this command left (never anything else)."""
        raise NotImplementedError


def decide_resume(loc: OutputLocation, command: str, fp: str, options: dict, *, overwrite: bool, resume: bool,
                  planned: set[str] | None = None, verify: str = "full", progress: bool | None = False,
                  parts: dict | None = None) -> ResumeDecision:
    """The one resume rule of every writing command: fresh start, resume (a manifest for the same command and
    fingerprint ``fp``: keep the files it lists that verify), already complete, or refuse.

    ``planned`` (names relative to ``loc.base``) limits the reusable files to those this run writes (default:
    every file the manifest lists). ``verify`` (``full``: size + sha256, with progress; ``size``: sizes only) is
    how finished files are checked before they are trusted. ``parts`` (what ``fp`` hashes) is stored in the
    manifest; a refusal of another source or other options lists what differs (:func:`fingerprint_diff`).

    Raises:
        OutputExistsError (exit 2): output files exist without a dsconvert manifest, or with a manifest for
            another command, source or options, and ``overwrite`` is not set.
        UsageError (exit 2): an unknown ``verify`` mode.
    """
    check_verify_mode(verify)
    man = loc.load()
    existing = loc.existing()
    if man is None and existing and not overwrite:
        raise loc.unvouched_error(existing)
    same = man is not None and man.fingerprint == fp and man.command == command
    if man is not None and not same and not overwrite:
        raise loc.mismatch_error(man, command, mismatch_detail(man, parts) if man.command == command else "")
    if same and resume and not overwrite:
        man.parts = man.parts or parts  # a manifest from before fingerprint parts were stored gains them
        names = set(man.files) if planned is None else set(planned)
        done = verify_files(loc.base, {n: m for n, m in man.files.items() if n in names}, verify, progress,
                            f"{command}: verifying")
        aux_ok = not man.aux or verify_files(loc.base, man.aux, verify, False, "") == set(man.aux)
        if man.complete and done == names and aux_ok:
            return ResumeDecision(man, done, True, True)
        man.files = {n: m for n, m in man.files.items() if n in done}
        man.complete = False
        loc.tidy_resumed(man, done)
        return ResumeDecision(man, done, True, False)
    loc.clear()
    man = Manifest(command, fp, options, parts=parts)
    loc.save(man)
    return ResumeDecision(man, set(), False, False)


@dataclass
class DirectoryLocation(OutputLocation):
    """A model folder ``out`` with ``MANIFEST_NAME`` inside; ``owned_patterns`` are the globs of the files the
    command writes (a fresh start removes only those, leftover ``*.tmp`` files and the manifest)."""

    out: Path
    owned_patterns: tuple[str, ...]

    @property
    def base(self) -> Path:
        return self.out

    def load(self) -> Manifest | None:
        return Manifest.load(self.out)

    def save(self, man: Manifest) -> None:
        man.save(self.out)

    def existing(self) -> list[Path]:
        return list(self.out.iterdir())

    def unvouched_error(self, existing: list[Path]) -> OutputExistsError:
        return OutputExistsError(f"output directory {self.out} is not empty and holds no dsconvert manifest",
                                 hint="choose an empty or new -o, or pass --overwrite to replace its model files")

    def mismatch_error(self, man: Manifest, command: str, detail: str) -> OutputExistsError:
        what = "another command" if man.command != command else "a different source or different options"
        return OutputExistsError(f"output directory {self.out} holds a {man.command} output made from {what}{detail}",
                                 hint="rerun with the same SRC and options to resume, pass --overwrite to start "
                                      "over there, or choose another -o")

    def tidy_resumed(self, man: Manifest, done: set[str]) -> None:
        man.aux, man.tensors = {}, {}
        _remove(self.out, ("*.tmp",))

    def clear(self) -> None:
        _remove(self.out, self.owned_patterns + ("*.tmp", MANIFEST_NAME))


def prepare_output(out: Path, command: str, fp: str, options: dict, *, overwrite: bool, resume: bool,
                   owned_patterns: tuple[str, ...], verify: str = "full", progress: bool | None = False,
                   parts: dict | None = None) -> ResumeDecision:
    """:func:`decide_resume` for the model folder ``out`` (created if missing; a file there is replaced only
    with ``overwrite``). ``owned_patterns`` are the globs of files this command writes; with ``overwrite`` (or
    ``resume=False`` on a matching manifest) only those, the manifest and leftover ``*.tmp`` files are removed.

    Raises:
        OutputExistsError: ``out`` is a file, or holds files but no dsconvert manifest, or a manifest for a
            different command, source or options, and ``overwrite`` is not set.
        UsageError: an unknown ``verify`` mode.
    """
    check_verify_mode(verify)
    if out.exists() and not out.is_dir():
        if not overwrite:
            raise OutputExistsError(f"output {out} exists and is not a directory", hint="pass --overwrite or another -o")
        out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return decide_resume(DirectoryLocation(out, owned_patterns), command, fp, options, overwrite=overwrite,
                         resume=resume, verify=verify, progress=progress, parts=parts)


def _remove(out: Path, patterns: tuple[str, ...]) -> None:
    for pat in patterns:
        for p in out.glob(pat):
            if p.is_file() or p.is_symlink():
                p.unlink()
