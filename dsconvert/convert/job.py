"""The part every safetensors-directory command shares once it has a plan: pre-flight of OUT, the fingerprint, the
resume decision, writing the shards, the small files, the report and the completed manifest.

A command (``fp8-to-bf16``, ``quantize`` and through it ``bf16-to-fp8``) opens and checks SRC, plans its output
shards (:class:`~.pipeline.OutShard`, shapes only) and builds its report; then :func:`preflight` and
:func:`write_directory` do the rest in one order for all of them:

1. pre-flight, also on ``--dry-run`` and before ``OUT/manifest.json`` exists: OUT writable, free disk for what is
   still to write (docs/cli-conventions.md, "Pre-flight");
2. the fingerprint: the source's index and config hashes plus every option field not marked
   :data:`NOT_FINGERPRINTED` (so a new byte-changing option is fingerprinted by construction), the command name;
3. :func:`~.manifest.prepare_output`: refuse, reuse (verified) or start over;
4. the shards through the executor (threads here, Ray units, :mod:`.executor`), then the index, config.json, the
   command's sidecar files and the files copied from SRC, each written atomically;
5. the self-check, the report (one key schema: ``output``, ``resumed``, ``already_complete``, ``shards_written``,
   ``shards_reused``, ``seconds``, ``gb_per_s_written``, ``peak_rss``, ``executor``), ``OUT/report.json``, and the
   manifest marked complete last, so a crash anywhere before leaves a resumable directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..formats.checkpoint import INDEX_NAME
from ..formats.hf_config import dump_config
from ..report import peak_rss_bytes
from ..units import bytes_fields
from .files import REPORT_NAME, copy_files
from .manifest import fingerprint, prepare_output, source_fingerprint_parts, write_atomic
from .pipeline import OutShard
from .preflight import check_free_disk, check_output_writable
from .progress import ByteProgress

#: ``field(metadata=NOT_FINGERPRINTED)`` marks an option that does not change the output bytes (device, workers,
#: chunk size, memory cap): it is left out of the fingerprint, so changing it still resumes
NOT_FINGERPRINTED = {"fingerprint": False}


def option_fingerprint(opts) -> dict:
    """The byte-changing options of a dataclass of options: every field not marked :data:`NOT_FINGERPRINTED`."""
    return {f.name: getattr(opts, f.name) for f in fields(opts) if f.metadata.get("fingerprint", True)}


def preflight(out: Path | None, shards: list[OutShard], report: dict, *, dry_run: bool) -> None:
    """Check OUT before anything is written (also on ``--dry-run``, which only warns about disk space).

    Adds ``report["disk"]`` (and a warning when space is short on a dry run).

    Raises:
        UsageError (exit 2): OUT is not writable. DiskSpaceError (exit 1): not enough free disk.
    """
    if out is None:
        return
    check_output_writable(Path(out))
    report["disk"] = check_free_disk(Path(out), {s.name: s.nbytes for s in shards}, refuse=not dry_run)
    if "problem" in report["disk"]:
        report.setdefault("warnings", []).append(report["disk"]["problem"])


def _index(shards: list[OutShard]) -> dict:
    wm = {t.name: s.name for s in shards for t in s.tensors}
    return {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": dict(sorted(wm.items()))}


@dataclass
class DirectoryOutput:
    """What a command writes into OUT, from its plan.

    Attributes:
        shards: the planned output shards (names, tensors, bytes).
        config: the output's config.json (a dict).
        files: names copied from SRC verbatim (tokenizer, generation config, ...).
        sidecars: more small files the command writes, ``{name: bytes}`` or ``{name: callable -> bytes}`` for
            one known only once the shards are written (e.g. GPTQ's quantize_config.json, calibration.json).
        owned: more file patterns the command owns in OUT (removed on ``--overwrite``/a fresh start).
    """

    shards: list[OutShard]
    config: dict
    files: list[str]
    sidecars: dict[str, bytes | Callable[[], bytes]] = field(default_factory=dict)
    owned: tuple[str, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)


def write_directory(command: str, src: Path, out: Path, output: DirectoryOutput, options: dict, report: dict, *,
                    executor, job, t0: float, overwrite: bool, resume: bool, verify: str, progress: bool | None,
                    on_extras: Callable[[dict], None] | None = None,
                    on_resume: Callable[[object], None] | None = None, on_finally: Callable[[], None] | None = None,
                    self_check: Callable[[Path], dict] | None = None,
                    on_report: Callable[[dict], dict] | None = None) -> dict:
    """Steps 2-5 of the module docstring for one command; returns ``report`` completed (and writes it, with
    ``report_extras()`` added, to ``OUT/report.json``).

    Args:
        options: the fingerprinted options (:func:`option_fingerprint`, plus what the command adds).
        job: the :class:`~.executor.Job` a remote unit rebuilds the plan with.
        on_extras: receives each shard unit's extras (e.g. per-module errors), as they arrive.
        on_resume: called with the resume decision before any shard is written (calibration state).
        on_finally: called after the shards are written or the run stopped (spilled state cleanup).
        self_check: re-reads OUT and returns ``report["self_check"]``.
        on_report: adds the command's own keys to the report (in place) and returns what goes into
            ``OUT/report.json`` only (per-tensor detail), not into the returned report.

    Raises:
        OutputExistsError / UsageError (exit 2): OUT cannot be used (:func:`~.manifest.prepare_output`).
    """
    parts = {"source": source_fingerprint_parts(src, [INDEX_NAME, "config.json"]), "options": options,
             "command": command}
    small = [INDEX_NAME, "config.json", *output.sidecars, *output.files]
    decision = prepare_output(out, command, fingerprint(parts), options, overwrite=overwrite, resume=resume,
                              parts=parts, owned_patterns=("*.safetensors", *small, REPORT_NAME, *output.owned),
                              verify=verify, progress=progress)
    if on_resume is not None:
        on_resume(decision)
    written: list[str] = []
    if not decision.already_complete:
        todo = sum(s.nbytes for s in output.shards if s.name not in decision.done)
        try:
            with ByteProgress(todo, command, enabled=progress) as bar:
                written = executor.write_shards(out, output.shards, decision.manifest, bar, job=job,
                                                **({"on_extras": on_extras} if on_extras else {}))
        finally:
            if on_finally is not None:
                on_finally()
        write_atomic(out / INDEX_NAME, (json.dumps(_index(output.shards), indent=2) + "\n").encode())
        write_atomic(out / "config.json", dump_config(output.config))
        for name, data in output.sidecars.items():
            write_atomic(out / name, data() if callable(data) else data)
        copied = copy_files(src, out, output.files)
    else:
        copied = [{"name": n} for n in output.files]
    if self_check is not None:
        report["self_check"] = self_check(out)
    seconds = time.perf_counter() - t0
    new_bytes = sum(s.nbytes for s in output.shards if s.name in written)
    report.update({
        "output": {"path": str(out), "shards": len(output.shards),
                   "tensors": sum(len(s.tensors) for s in output.shards), "total_size": output.total_size,
                   "files_copied": copied},
        "resumed": decision.resumed,
        "already_complete": decision.already_complete,
        "shards_written": len(written),
        "shards_reused": len(output.shards) - len(written),
        "seconds": round(seconds, 3),
        "gb_per_s_written": round(new_bytes / 1e9 / seconds, 4) if seconds > 0 else None,
        "peak_rss": bytes_fields(peak_rss_bytes()),
        "executor": executor.report(),
    })
    full = dict(report, **(on_report(report) if on_report else {}))
    write_atomic(out / REPORT_NAME, (json.dumps(full, indent=2, default=str) + "\n").encode())
    if not decision.already_complete:
        decision.manifest.record_complete(out, small, {t.name: (s.name, t.dtype, t.shape) for s in output.shards
                                                       for t in s.tensors})
    decision.manifest.complete = True
    decision.manifest.save(out)
    report["report_path"] = str(out / REPORT_NAME)
    return report
