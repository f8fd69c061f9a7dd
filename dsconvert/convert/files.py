"""The non-tensor files of a checkpoint: which to carry over, and copying them without executing anything.

Every file of SRC except the shards, the index and ``config.json`` (rewritten by each command) is copied:
tokenizer, generation config, remote-code ``.py`` files, README, LICENSE, chat templates, figures/.
Dot-files and dsconvert's own ``manifest.json``/``report.json`` are skipped. Files are copied as bytes; nothing
is imported or executed (docs/known-failures.md items 6-8).
"""

from __future__ import annotations

from pathlib import Path

from .manifest import MANIFEST_NAME, copy_atomic

REPORT_NAME = "report.json"
_SKIP = {"config.json", "model.safetensors.index.json", MANIFEST_NAME, REPORT_NAME}
_SKIP_SUFFIXES = (".safetensors", ".safetensors.tmp")


def extra_files(src: Path) -> list[str]:
    """Relative paths (POSIX) of the files to carry over from ``src``, sorted."""
    out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        name = rel.as_posix()
        if name in _SKIP or name.endswith(_SKIP_SUFFIXES):
            continue
        out.append(name)
    return out


def copy_files(src: Path, out: Path, names: list[str]) -> list[dict]:
    """Copy ``names`` from ``src`` to ``out`` (each through ``NAME.tmp`` + fsync + rename, symlinks followed for
    HF cache snapshots); returns ``[{name, bytes, sha256}]``.

    Raises:
        OSError: unreadable source file, disk full, permissions (no ``.tmp`` is left behind).
    """
    rows = []
    for name in names:
        s, d = src / name, out / name
        d.parent.mkdir(parents=True, exist_ok=True)
        digest = copy_atomic(s, d)
        rows.append({"name": name, "bytes": d.stat().st_size, "sha256": digest})
    return rows
