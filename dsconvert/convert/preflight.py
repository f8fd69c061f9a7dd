"""Pre-flight checks every writing command runs after planning and before it writes anything (also on
``--dry-run``): free disk for what is left to write, and an output location the process can write to.

Found here, a shortfall is refused before ``OUT/manifest.json`` or any shard exists (docs/cli-conventions.md:
"errors are found before anything is written"). A full disk is an I/O condition, not a bad checkpoint, so it
exits 1 like the disk-full error met mid-run (README exit-code table).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import DiskSpaceError, UsageError
from ..units import fmt_bytes


def existing_ancestor(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent (``.`` for a bare relative name)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_writable(out: Path, flag: str = "-o") -> None:
    """Refuse an output whose nearest existing folder is not a writable directory.

    Args:
        out: the output directory, or the output file (GGUF); it need not exist.
    Raises:
        UsageError (exit 2): the location exists as a file where a folder is needed, or cannot be written.
    """
    anc = existing_ancestor(out)
    if anc != Path(os.path.abspath(out)) and not anc.is_dir():
        raise UsageError(f"{flag} {out}: {anc} is a file, not a folder", hint="choose another output path")
    target = anc if anc.is_dir() else anc.parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: {target} is not writable", hint="fix the permissions or choose another -o")


def remaining_bytes(out_dir: Path, planned: dict[str, int]) -> int:
    """Bytes still to write: planned files (name relative to ``out_dir`` -> size in bytes) minus those already
    present there at least that large (a resumable output may keep them; a truncated one is counted)."""
    need = 0
    for name, size in planned.items():
        p = out_dir / name
        try:
            if p.is_file() and p.stat().st_size >= size:
                continue
        except OSError:
            pass
        need += int(size)
    return need


def check_free_disk(out_dir: Path, planned: dict[str, int], flag: str = "-o", *, refuse: bool = True) -> dict:
    """Refuse (or, for a dry run, report) a plan that does not fit on the disk holding ``out_dir``.

    Args:
        out_dir: the folder the files go to (need not exist yet; its nearest existing parent is measured).
        planned: output file name (relative to ``out_dir``) -> planned size in bytes.
        refuse: raise on a shortfall (a real run); ``False`` (``--dry-run``) only reports it.
    Returns:
        ``{"needed": bytes, "free": bytes, "fits": bool}`` for the report, plus ``"problem"`` (the message) when it
        does not fit.
    Raises:
        DiskSpaceError (exit 1): with ``refuse``; sizes printed in the unit the amounts need (B, kB, MB, GB, TB).
    """
    need = remaining_bytes(out_dir, planned)
    free = shutil.disk_usage(existing_ancestor(out_dir)).free
    status = {"needed": need, "free": free, "fits": need <= free}
    if need > free:
        msg = (f"{flag} {out_dir}: needs {fmt_bytes(need)} of free disk, {fmt_bytes(free)} available "
               f"(short by {fmt_bytes(need - free)})")
        if refuse:
            raise DiskSpaceError(msg, hint="free space or choose another -o on a larger disk; nothing was written")
        status["problem"] = msg
    return status
