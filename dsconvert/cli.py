"""dsconvert command line (Typer, public API only). Parsing, output modes and exit codes; no tensor math.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input / unsupported checkpoint, 4 validation failed.
``--json`` prints exactly one JSON document on stdout (the report, or ``{"error": ...}``); progress and
messages go to stderr. Tracebacks appear only with ``-v`` or ``DSCONVERT_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import typing
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import EXIT_INTERNAL, DsconvertError, ProblemsFound, ReportedFailure, ValidationFailed
from .units import count

app = typer.Typer(
    name="dsconvert",
    help="Convert DeepSeek-V3/R1 checkpoints: FP8 -> BF16, INT8/INT4, GGUF; inspect and validate them.\n\n"
         "Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input or unsupported checkpoint, 4 validation failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # help follows the terminal's width (COLUMNS), up to 160 columns (Click's default stops at 80)
    context_settings={"max_content_width": 160},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # messages are not cut at 80 columns
out = Console(highlight=False, soft_wrap=True)

# Reusable option spellings (one place for names and help texts).
def _hf_cache(path: Optional[Path]) -> Optional[Path]:
    """Typer callback: a Hugging Face cache repo folder resolves to the snapshot ``refs/main`` names."""
    from .formats.checkpoint import resolve_hf_cache

    return None if path is None else resolve_hf_cache(path)


SrcArg = Annotated[Path, typer.Argument(metavar="SRC", help="checkpoint directory (HF layout; HF-cache repo and snapshot paths work)",
                                        show_default=False, callback=_hf_cache)]
OutOpt = Annotated[Optional[Path], typer.Option("-o", "--output", help="output directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print only the final JSON report on stdout")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="print the plan (sizes, memory) and write nothing")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress display")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="tracebacks on errors")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace the model files of an existing output")]
NoResumeOpt = Annotated[bool, typer.Option("--no-resume", help="start over even if a matching partial output exists")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
# validate/logits compute on the CPU unless asked: their CUDA path has not run on a GPU yet (README)
ForwardDeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | auto (CUDA when present)")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="output shards written concurrently")]
MaxMemOpt = Annotated[Optional[str], typer.Option("--max-memory", help="refuse plans above this peak RAM (e.g. 8G, 6GiB)")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this path")]
MtpOpt = Annotated[str, typer.Option("--mtp", help="keep | drop the multi-token-prediction layer")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="an --ignore pattern that matches nothing is an error")]
ShardSizeOpt = Annotated[str, typer.Option("--max-shard-size", help="e.g. 5G")]
ComputeDtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 computation")]
OverwriteFileOpt = Annotated[bool, typer.Option("--overwrite", help="replace an existing -o file")]
EstimateDryOpt = Annotated[bool, typer.Option("--dry-run", help="print the estimated peak memory and work "
                                                                "(bytes read, FLOPs) and run nothing")]
VerifyOpt = Annotated[str, typer.Option("--verify", help="how a rerun checks finished files: full (size + sha256, "
                                                        "reads every byte) | size (sizes only, instant)")]


def _registry_help() -> tuple[str, str, str]:
    """``--scheme``, ``--format`` and ``--type`` help texts, from the registries (so a new scheme, format or
    GGUF type shows up without editing this file)."""
    from .convert.gguf_export import type_help
    from .formats.registry import describe_formats
    from .quant.schemes import SCHEMES

    same = "case, - and _ do not matter"
    return (f"{SCHEMES.describe()} (compressed-tensors preset names; {same})",
            f"on-disk layout: {describe_formats()} ({same}: gptqv2 = gptq_v2)", type_help())


_SCHEME_HELP, _FORMAT_HELP, _TYPE_HELP = _registry_help()


def _gguf_recipe_help() -> str:
    from .formats.gguf_recipes import RECIPES

    return ("a named DeepSeek type recipe (its file type unless --type is given; --tensor-type rules win over its "
            "own): " + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))


_GGUF_RECIPE_HELP = _gguf_recipe_help()


RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="ADDRESS", help="run the work units on a Ray cluster: the head's HOST:PORT (6379 unless "
                                     "changed), or auto (RAY_ADDRESS or the cluster `ray start` began here); SRC "
                                     "and OUT must be on a filesystem every node mounts at the same path")]
RayCpusOpt = Annotated[float, typer.Option("--ray-cpus-per-task", help="--ray: CPUs each unit reserves")]
RayGpusOpt = Annotated[float, typer.Option("--ray-gpus-per-task", help="--ray: GPUs each unit reserves (CUDA path)")]
RayInFlightOpt = Annotated[Optional[int], typer.Option(
    "--ray-max-in-flight", min=1, help="--ray: units running at once (bounds memory); default: cluster CPUs / "
                                       "CPUs per task")]
RayRetriesOpt = Annotated[int, typer.Option("--ray-max-retries", min=0,
                                            help="--ray: resubmissions of a unit whose worker died")]


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """The ``--ray*`` block of a command (``fp8-to-bf16``, ``quantize``, ``gguf``, ``imatrix``): one definition,
    spliced into each command's options by :func:`_option_groups`."""

    ray: RayOpt = None
    ray_cpus_per_task: RayCpusOpt = 1.0
    ray_gpus_per_task: RayGpusOpt = 0.0
    ray_max_in_flight: RayInFlightOpt = None
    ray_max_retries: RayRetriesOpt = 3

    def executor(self, workers: int):
        """The executor these flags name (local threads, ``workers`` of them, without ``--ray``).

        Raises:
            UsageError: a bad ``--ray`` address or reservation (exit 2).
        """
        from .convert.executor import ExecOptions, make_executor

        return make_executor(ExecOptions(ray=self.ray, cpus_per_task=self.ray_cpus_per_task,
                                         gpus_per_task=self.ray_gpus_per_task, max_in_flight=self.ray_max_in_flight,
                                         max_retries=self.ray_max_retries), workers)


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """The closing block of the writing commands: ``--json``, ``--report``, ``-q``, ``-v``."""

    json_out: JsonOpt = False
    report: ReportOpt = None
    quiet: QuietOpt = False
    verbose: VerboseOpt = False


@dataclasses.dataclass(frozen=True)
class WriteOptions:
    """The ``--dry-run`` / ``--overwrite`` / ``--no-resume`` block of the commands that write a checkpoint
    (``fp8-to-bf16``, ``quantize``, ``bf16-to-fp8``; ``gguf`` with its own ``--overwrite`` help:
    :class:`GgufWriteOptions`)."""

    dry_run: DryOpt = False
    overwrite: OverwriteOpt = False
    no_resume: NoResumeOpt = False

    def require_output(self, output: Optional[Path], command: str) -> None:
        """Refuse a run that writes (no ``--dry-run``) without ``-o``.

        Raises:
            UsageError: ``output`` is None and this is not a dry run (exit 2).
        """
        if not self.dry_run and output is None:
            from .errors import UsageError

            raise UsageError("missing -o/--output", hint=f"dsconvert {command} SRC -o OUT (or --dry-run)")

    def run_kwargs(self) -> dict:
        """``dry_run``, ``overwrite`` and ``resume`` as the converters' ``run`` takes them."""
        return {"dry_run": self.dry_run, "overwrite": self.overwrite, "resume": not self.no_resume}


@dataclasses.dataclass(frozen=True)
class GgufWriteOptions(WriteOptions):
    """:class:`WriteOptions` of ``gguf`` (its ``--overwrite`` replaces output files, not model files)."""

    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing output files")] = False


def _option_groups(fn: Callable) -> Callable:
    """Typer command decorator: a parameter annotated with an option-group dataclass (:class:`RayOptions`,
    :class:`ReportOptions`, :class:`WriteOptions`) stands for that group's fields, spliced into the command's
    signature in its place (so ``--help`` lists them there, as if written out); the command receives one
    instance of the group.

    Typer reads ``__signature__`` (``inspect.signature``), so each option has exactly one definition: the
    group's field annotation and default.
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    groups: dict[str, type] = {}
    params: list[inspect.Parameter] = []
    for p in inspect.signature(fn).parameters.values():
        t = hints[p.name]
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            groups[p.name] = t
            ft = typing.get_type_hints(t, include_extras=True)
            params += [inspect.Parameter(f.name, p.kind, default=f.default, annotation=ft[f.name])
                       for f in dataclasses.fields(t)]
        else:
            params.append(p.replace(annotation=t))

    def command(**kw):
        for name, t in groups.items():
            kw[name] = t(**{f.name: kw.pop(f.name) for f in dataclasses.fields(t)})
        return fn(**kw)

    command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    command.__module__ = fn.__module__
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _json_safe(obj):
    """``obj`` with NaN/inf floats replaced by null: ``json.dumps`` would write the bare tokens ``NaN`` /
    ``Infinity``, which are not JSON (RFC 8259) and which strict parsers (jq, JavaScript, Go) reject.
    Reports that can hold them (validate's metrics) say why in their own fields (``nonfinite``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _dumps(obj: dict) -> str:
    return json.dumps(_json_safe(obj), indent=2, default=str, allow_nan=False)


def _emit_json(obj: dict) -> None:
    sys.stdout.write(_dumps(obj) + "\n")
    sys.stdout.flush()


def _closed_pipe() -> None:
    """The reader of stdout went away: exit 141 (128 + SIGPIPE, what a killed Unix tool reports) without a
    message, pointing stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(128 + 13)


def _ident() -> dict:
    """The fields every JSON document starts with (reports and errors alike)."""
    return {"tool": "dsconvert", "version": __version__, "argv": list(sys.argv)}


def _on_signal(signum, frame) -> None:
    """SIGINT/SIGTERM: ask every thread to stop, and stop the main thread at once (first signal only, so that
    a second Ctrl-C cannot interrupt the clean-up of the first)."""
    from .convert import cancel

    first = not cancel.requested()
    cancel.request(signum)
    if first:
        raise cancel.Cancelled(signum)


@contextlib.contextmanager
def _cancel_on_signals():
    """Route SIGINT and SIGTERM to :func:`_on_signal` while a command body runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupted_exit(signum: int | None, json_out: bool) -> None:
    """Exit 128 + the signal number (130 for SIGINT, 143 for SIGTERM), the shell convention."""
    signum = signum or signal.SIGINT
    name = signal.Signals(signum).name
    err.print(f"interrupted ({name}): finished files are kept; rerun the same command to resume")
    code = 128 + int(signum)
    if json_out:
        _emit_json({**_ident(), "error": "Interrupted", "message": f"interrupted by {name}", "signal": name,
                    "exit_code": code})
    raise typer.Exit(code)


def _run(fn: Callable[[], dict | None], *, json_out: bool, verbose: bool, human: Callable[[dict], None] | None = None,
         report_path: Path | None = None) -> None:
    """Run a command body with the central error handler; print the report in the chosen mode.

    SIGINT and SIGTERM cancel the body (every worker thread stops between chunks, the file in flight is
    removed or, for GGUF, kept with its resume state) and exit 130 / 143.
    """
    from .convert import cancel
    from .convert.remedies import add_hint

    debug = verbose or os.environ.get("DSCONVERT_DEBUG") == "1"
    try:
        if report_path is not None:
            check_writable_file(report_path, "--report")
        code = None
        try:
            with _cancel_on_signals():
                rep = fn()
        except ReportedFailure as e:  # finished, and failed: the report is the output, the exit code says so
            rep, code = e.report, e.exit_code
        if rep is not None and report_path is not None:
            report_path.write_text(_dumps(rep) + "\n")
    except cancel.Cancelled as e:
        _interrupted_exit(e.signum or cancel.signum(), json_out)
    except DsconvertError as e:
        if debug:
            traceback.print_exc()
        add_hint(e)
        err.print(f"[bold red]error:[/bold red] {e.message}", markup=True, highlight=False)
        if e.hint:
            err.print(f"[bold]hint:[/bold] {e.hint}", markup=True, highlight=False)
        if json_out:
            _emit_json({**_ident(), **e.to_dict()})
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted_exit(signal.SIGINT, json_out)
    except OSError as e:  # disk full, permissions, a vanished file: not a bug, and the output is resumable
        if debug:
            traceback.print_exc()
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        err.print(f"[bold red]I/O error:[/bold red] {e.strerror or e}{where}", markup=True, highlight=False)
        err.print("[bold]hint:[/bold] free disk space or fix permissions, then rerun the same command: finished "
                  "shards are kept and verified", markup=True, highlight=False)
        if json_out:
            _emit_json({**_ident(), "error": "OSError", "message": f"{e.strerror or e}{where}",
                        "exit_code": EXIT_INTERNAL})
        raise typer.Exit(EXIT_INTERNAL)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, exit 1
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {e}", markup=True, highlight=False)
        err.print("rerun with -v (or DSCONVERT_DEBUG=1) for a traceback, and please report it")
        if json_out:
            _emit_json({**_ident(), "error": "InternalError", "message": f"{type(e).__name__}: {e}",
                        "exit_code": EXIT_INTERNAL})
        raise typer.Exit(EXIT_INTERNAL)
    if rep is None:
        return
    try:
        if json_out:
            _emit_json(rep)
        elif human is not None:
            human(rep)
    except BrokenPipeError:  # `dsconvert ... | head -1`: the reader left; stop quietly as Unix tools do
        _closed_pipe()
    except SystemExit as e:  # rich turns a broken pipe into a silent SystemExit(1): same case, same exit
        if e.code == 1:
            _closed_pipe()
        raise
    if code:
        raise typer.Exit(code)


def _or_none(v) -> str:
    """A report value for human output: ``none`` rather than Python's ``None``."""
    return "none" if v is None else str(v)


def _print_mtp(mtp: dict, indent: str = "") -> None:
    """fp8-to-bf16's line about the multi-token-prediction layer: kept (and what transformers will say about
    it) or dropped."""
    if not mtp.get("layers"):
        return
    layers = ", ".join(str(i) for i in mtp["layers"])
    if mtp["kept"]:
        n = count(mtp["tensors"], "tensor")
        out.print(f"{indent}MTP layer {layers} kept ({n}, model.layers.{layers}.*) for "
                  "speculative decoding in vLLM/SGLang; transformers does not use it and warns about these "
                  "unexpected weights when loading, which is expected (--mtp drop removes it)")
    else:
        out.print(f"{indent}MTP layer {layers} dropped (--mtp drop)")


def check_writable_file(path: Path, flag: str) -> None:
    """Refuse, before any work, a file path the command could not write at the end (a directory, a missing or
    non-directory parent, no write permission).

    Raises:
        UsageError: exit 2, naming ``flag`` and ``path``.
    """
    from .errors import UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory", hint=f"give a file name, e.g. {flag} {path / 'report.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist", hint="create it first, or give "
                         "another path")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise UsageError(f"{flag} {path}: not writable", hint="fix the permissions or give another path")


def _print_warnings(rep: dict) -> None:
    """A report's ``warnings`` (strings, or problem dicts with ``message`` and ``hint``) on stderr, in every
    output mode (``--json`` keeps stdout to the report)."""
    for w in rep.get("warnings", []):
        text = w if isinstance(w, str) else w.get("message", str(w)) + (f" ({w['hint']})" if w.get("hint") else "")
        err.print(f"warning: {text}", markup=False, highlight=False)


def _size(text: str | None) -> int | None:
    from .units import parse_size

    return None if text is None else parse_size(text)


def _progress_enabled(quiet: bool) -> bool | None:
    return False if quiet else None  # None: on when stderr is a terminal


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"dsconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Entry point options."""


FP8_EXAMPLES = """
\b
Examples:
  dsconvert fp8-to-bf16 DeepSeek-R1 -o DeepSeek-R1-BF16
  dsconvert fp8-to-bf16 DeepSeek-R1 -o out --mtp drop --max-shard-size 5G --json
  dsconvert fp8-to-bf16 DeepSeek-R1 --dry-run
  dsconvert fp8-to-bf16 DeepSeek-V4-Flash -o DeepSeek-V4-Flash-BF16
"""


@app.command("fp8-to-bf16", short_help="FP8 release -> BF16 checkpoint (complete HF folder; V3/R1 and V4).",
             help="Dequantize DeepSeek's block-FP8 release (V3/R1; V4 with its FP4 experts too) to a complete BF16 "
                  "HF checkpoint.\n"
                                  + FP8_EXAMPLES)
@_option_groups
def fp8_to_bf16_cmd(
    src: SrcArg,
    output: OutOpt = None,
    mtp: MtpOpt = "keep",
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 | f16 | f32 for dequantized weights")] = "bf16",
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size",
                                                          help="e.g. 5G; default keeps the source's shards")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 2,
    max_memory: MaxMemOpt = None,
    validate: Annotated[bool, typer.Option("--validate", help="when done, validate logits against SRC")] = False,
    ray: RayOptions = RayOptions(),
    write: WriteOptions = WriteOptions(),
    verify: VerifyOpt = "full",
    ui: ReportOptions = ReportOptions(),
) -> None:
    from .convert import fp8_to_bf16 as f2b
    from .convert.manifest import check_verify_mode

    def body():
        opts = f2b.Options(mtp=mtp, dtype=f2b.normalize_dtype(dtype), max_shard_size=_size(max_shard_size),
                           device=device, workers=workers, max_memory=_size(max_memory))
        write.require_output(output, "fp8-to-bf16")
        ex = ray.executor(workers)
        rep = f2b.run(src, output, opts, **write.run_kwargs(),
                      progress=_progress_enabled(ui.quiet or ui.json_out and not sys.stderr.isatty()),
                      verify=check_verify_mode(verify), executor=ex)
        _print_warnings(rep)
        if validate and not write.dry_run:
            rep["validation"] = _validate_after(output, src, ui.quiet)
            if not rep["validation"].get("passed", False):
                raise ValidationFailed("the converted output failed validation", rep)
        return rep

    def human(rep):
        p = rep["plan"]
        if rep["dry_run"]:
            out.print(f"plan for {rep['source']['path']} ({rep['source']['family']}):")
            out.print("  tensors: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in p["tensors"].items()))
            out.print(f"  output shards: {len(p['output_shards'])}, reads {p['bytes_read']['gb']:.3f} GB, "
                      f"writes {p['bytes_written']['gb']:.3f} GB ({p['bytes_written']['gib']:.3f} GiB)")
            out.print(f"  peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB; "
                      f"~{p['time_estimate_s_at_0_5_gb_s']} s at 0.5 GB/s")
            if p["dropped"]:
                out.print(f"  dropped: {len(p['dropped'])} tensors ({p['dropped'][0]['reason']})")
            _print_mtp(p.get("mtp") or {}, indent="  ")
            out.print("  (dry run: nothing written)")
            return
        o = rep["output"]
        what = f"{o['tensors']} tensors, {o['total_size'] / 1e9:.3f} GB"
        if rep["already_complete"]:
            out.print(f"{o['path']} is already complete ({what}); nothing written")
        else:
            state = (f"resumed: {count(rep['shards_reused'], 'shard')} reused, {rep['shards_written']} written"
                     if rep["resumed"] else f"{count(rep['shards_written'], 'shard')} written")
            out.print(f"wrote {o['path']}: {what}; {state}; {rep['seconds']:.1f} s; "
                      f"peak RSS {rep['peak_rss']['gib']:.2f} GiB")
        _print_mtp(p.get("mtp") or {})
        if p["dropped"]:
            out.print(f"dropped {len(p['dropped'])} tensors: {p['dropped'][0]['reason']}")
        _print_executor(rep.get("executor") or {})
        if "validation" in rep:
            _print_validation(rep["validation"])

    _run(body, json_out=ui.json_out, verbose=ui.verbose, human=human, report_path=ui.report)


QUANTIZE_EXAMPLES = """
\b
Examples:
  dsconvert quantize DeepSeek-R1 -o R1-W4A16 --scheme W4A16 --group-size 128
  dsconvert quantize DeepSeek-R1 -o R1-AWQ --awq --format awq
  dsconvert quantize DeepSeek-R1 -o R1-GPTQ --gptq --format gptq --ignore 're:.*kv_b_proj$'
  dsconvert quantize DeepSeek-R1 --scheme W8A16 --group-size -1 --dry-run
  dsconvert quantize DeepSeek-R1 -o R1-W8A8 --scheme W8A8 --gptq
  dsconvert quantize R1-BF16 -o R1-FP8 --scheme FP8_BLOCK --format deepseek-fp8 --scale-fmt ue8m0
  dsconvert quantize DeepSeek-R1 -o R1-NVFP4 --scheme NVFP4A16
  dsconvert quantize DeepSeek-R1 -o R1-mix --preset experts-nvfp4-attn-fp8
  dsconvert quantize DeepSeek-R1 -o R1-mix --scheme W8A16 --scheme-for '.*mlp\\.experts\\..*=MXFP4'
"""

ScaleFmtOpt = Annotated[Optional[str], typer.Option(
    "--scale-fmt", help="FP8_BLOCK: ue8m0 = power-of-two block scales (payload quantized under them); "
                        "default amax/448")]


@app.command("quantize", short_help="INT4/INT8, FP8 or FP4: compressed-tensors, AutoAWQ, GPTQ or DeepSeek FP8.",
             help="INT8/INT4, FP8 or FP4 weights in compressed-tensors, AutoAWQ GEMM, GPTQ or DeepSeek FP8 layout, "
                  "straight from the FP8 release or a BF16 checkpoint.\n" + QUANTIZE_EXAMPLES)
@_option_groups
def quantize_cmd(
    src: SrcArg,
    output: OutOpt = None,
    scheme: Annotated[Optional[str], typer.Option(
        "--scheme", help=_SCHEME_HELP + "; with a recipe: the scheme of modules no rule names [default: W4A16]")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help="mixed recipe: experts-w4a16 | experts-nvfp4-attn-fp8 | experts-mxfp4 (the rest BF16)")] = None,
    recipe: Annotated[Optional[Path], typer.Option(
        "--recipe", help="mixed recipe file (YAML/JSON): default + rules of targets -> scheme")] = None,
    scheme_for: Annotated[Optional[list[str]], typer.Option(
        "--scheme-for", metavar="REGEX=SCHEME",
        help="modules matching REGEX get SCHEME (BF16 keeps them); repeatable")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", help="32 | 64 | 128 | -1 (per channel); default: the scheme's, 128")] = None,
    scale_fmt: ScaleFmtOpt = None,
    fmt: Annotated[str, typer.Option("--format", help=_FORMAT_HELP)] = "compressed-tensors",
    checkpoint_format: Annotated[Optional[str], typer.Option("--checkpoint-format",
                                                             help="gptq only: gptq (v1) | gptq_v2")] = None,
    method: Annotated[str, typer.Option("--method", help="rtn | awq | gptq | autoround (SignRound: learned "
                                        "rounding and clipping, int weight-only schemes, DeepSeek-V2/V3)")] = "rtn",
    iters: Annotated[int, typer.Option("--iters", min=0, help="autoround: sign-gradient iterations per stage "
                                       "(auto-round's default 200)")] = 200,
    lr: Annotated[Optional[float], typer.Option("--lr", help="autoround: learning rate of the rounding offsets "
                                                "and clipping factors (default 1 / iters)")] = None,
    awq: Annotated[bool, typer.Option("--awq", help="shorthand for --method awq")] = False,
    gptq: Annotated[bool, typer.Option("--gptq", help="shorthand for --method gptq")] = False,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", metavar="NAME|re:REGEX", help="keep a module unquantized: exact name "
                                                        "or re:REGEX (repeatable)")] = None,
    strict: StrictOpt = False,
    mtp: MtpOpt = "keep",
    max_shard_size: ShardSizeOpt = "5G",
    calib_data: Annotated[Optional[str], typer.Option(
        "--calib-data", metavar="FILE", help="awq/gptq: a UTF-8 text file (tokenized with SRC's tokenizer.json and "
        "cut into --num-samples windows of --seq-len tokens) or a .json file holding a list of token-id lists; "
        "default: the bundled calibration set (never the evaluation text)")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="awq/gptq: calibration sequences")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="awq/gptq: tokens per sequence")] = 128,
    calib_seed: Annotated[int, typer.Option("--calib-seed", help="awq/gptq: which windows of the text")] = 0,
    expert_policy: Annotated[str, typer.Option("--expert-policy", help="awq/gptq: experts with few tokens: "
                                               "all-tokens | rtn | topk")] = "all-tokens",
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 1,
    max_memory: MaxMemOpt = None,
    ray: RayOptions = RayOptions(),
    write: WriteOptions = WriteOptions(),
    verify: VerifyOpt = "full",
    ui: ReportOptions = ReportOptions(),
) -> None:
    from .convert import quantize as qz
    from .convert.manifest import check_verify_mode
    from .errors import UsageError

    def body():
        chosen = [m for m, on in (("awq", awq), ("gptq", gptq)) if on]
        if len(chosen) > 1 or (chosen and method != "rtn"):
            raise UsageError("give one of --awq, --gptq, --method", hint="they name the same choice")
        write.require_output(output, "quantize")
        opts = qz.Options(scheme=scheme or "W4A16", scheme_given=scheme is not None, preset=preset,
                          recipe=str(recipe) if recipe is not None else None, scheme_for=list(scheme_for or []),
                          group_size=group_size, scale_fmt=scale_fmt, format=fmt,
                          checkpoint_format=checkpoint_format,
                          method=chosen[0] if chosen else method, ignore=list(ignore or []), strict=strict, mtp=mtp,
                          max_shard_size=_size(max_shard_size), device=device, workers=workers,
                          max_memory=_size(max_memory), calib_data=calib_data, num_samples=num_samples,
                          seq_len=seq_len, calib_seed=calib_seed, expert_policy=expert_policy, iters=iters, lr=lr)
        ex = ray.executor(workers)
        rep = qz.run(src, output, opts, **write.run_kwargs(), progress=_progress_enabled(ui.quiet),
                     verify=check_verify_mode(verify), executor=ex)
        _print_warnings(rep)
        return rep

    _run(body, json_out=ui.json_out, verbose=ui.verbose, human=_print_quantize, report_path=ui.report)


def _scheme_label(sch: dict) -> str:
    """``W4A16 (g128)``, ``W8A8 (per channel)``, ``FP8_BLOCK (block 128x128, ue8m0)``."""
    w = sch.get("weights") or {}
    if w.get("strategy") == "block":
        extra = f"block {w['block'][0]}x{w['block'][1]}" + (", ue8m0" if w.get("scale_rule") == "pow2" else "")
    elif sch.get("group_size") == -1:
        extra = "per channel"
    else:
        extra = f"g{sch.get('group_size')}"
    return f"{sch['name']} ({extra})"


def _print_quantize(rep: dict) -> None:
    p = rep["plan"]
    groups = p.get("config_groups")
    what = (" + ".join(f"{g['scheme']} x{g['modules']}"
                       + (f" ({g['passed_through']} copied unchanged)" if g.get("passed_through") else "")
                       for g in groups) if groups
            else _scheme_label(rep["scheme"]))
    head = (f"{rep['options']['method'].upper()} {what} -> {rep['format']}: "
            f"{p['quantized_modules']} modules quantized, {p['kept_tensors']} tensors kept; "
            f"{p['bytes_written']['gb']:.3f} GB ({p['bytes_written']['gib']:.3f} GiB), "
            f"{p['bits_per_weight_quantized']} bpw quantized, {p['bits_per_weight_overall']} bpw overall")
    if rep["dry_run"]:
        out.print("plan: " + head + f"; peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB (dry run: nothing written)")
    else:
        e = rep.get("quantization_error") or {}
        out.print(f"wrote {rep['output']['path']}: " + head + f"; {rep['seconds']:.1f} s")
        if e:
            out.print(f"  relative RMS weight error: mean {e['mean']:.4f}, max {e['max']:.4f} "
                      f"({e['worst'][0]['module']})")
        _print_executor(rep.get("executor") or {})
    for g in groups or []:
        out.print(f"  {g['group']}: {g['scheme']} ({g['format']}) {g['modules']} modules, {g['parameters']:,} "
                  f"weights, {g['bits_per_weight']} bpw, targets {', '.join(g['targets'])}")


BF16_TO_FP8_EXAMPLES = """
\b
Examples:
  dsconvert bf16-to-fp8 R1-BF16 -o R1-FP8                      # DeepSeek's release layout, amax/448 scales
  dsconvert bf16-to-fp8 R1-BF16 -o R1-FP8 --scale-fmt ue8m0    # power-of-two scales (V3.1 scale_fmt)
  dsconvert bf16-to-fp8 R1-BF16 --dry-run
"""


@app.command("bf16-to-fp8", short_help="BF16 (or any source) -> DeepSeek's own block-FP8 layout.",
             help="DeepSeek's block-FP8 layout (weight float8_e4m3fn + weight_scale_inv, "
                                 "quant_method fp8) from a BF16 checkpoint or any source dsconvert reads; same as "
                                 "quantize --scheme FP8_BLOCK --format deepseek-fp8.\n" + BF16_TO_FP8_EXAMPLES)
@_option_groups
def bf16_to_fp8_cmd(
    src: SrcArg,
    output: OutOpt = None,
    scale_fmt: ScaleFmtOpt = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="keep a module in BF16: exact name "
                                                        "or re:REGEX (repeatable)")] = None,
    strict: StrictOpt = False,
    mtp: MtpOpt = "keep",
    max_shard_size: ShardSizeOpt = "5G",
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 1,
    max_memory: MaxMemOpt = None,
    write: WriteOptions = WriteOptions(),
    ui: ReportOptions = ReportOptions(),
) -> None:
    from .convert import quantize as qz

    def body():
        write.require_output(output, "bf16-to-fp8")
        opts = qz.Options(scheme="FP8_BLOCK", scale_fmt=scale_fmt, format="deepseek-fp8", ignore=list(ignore or []),
                          strict=strict, mtp=mtp, max_shard_size=_size(max_shard_size), device=device,
                          workers=workers, max_memory=_size(max_memory))
        rep = qz.run(src, output, opts, **write.run_kwargs(), progress=_progress_enabled(ui.quiet))
        for w in rep.get("warnings", []):
            err.print(f"warning: {w}", markup=False, highlight=False)
        return rep

    _run(body, json_out=ui.json_out, verbose=ui.verbose, human=_print_quantize, report_path=ui.report)


def _print_executor(ex: dict) -> None:
    """A Ray run's per-node lines: units, bytes, throughput while busy; and the retries."""
    if ex.get("backend") != "ray":
        return
    out.print(f"ray: {ex.get('nodes', 0)} nodes, {len(ex.get('units', []))} units, at most "
              f"{ex.get('in_flight_max_seen', 0)} in flight, {len(ex.get('retries', []))} retried")
    for n in ex.get("nodes_used", []):
        rate = f"{n['mb_per_s']:.1f} MB/s" if n["mb_per_s"] is not None else "-"
        out.print(f"  node {n['node_id'][:12]} ({n['host']}): {len(n['units'])} units, {n['bytes'] / 1e9:.3f} GB, "
                  f"{rate} while busy")


def _validate_after(candidate: Path, reference: Path, quiet: bool) -> dict:
    from .convert import validate as val

    return val.run_validate(candidate, reference, val.ValidateOptions(), progress=_progress_enabled(quiet))


def _print_validation(rep: dict) -> None:
    m = rep
    verdict = "[green]PASSED[/green]" if m.get("passed") else "[red]FAILED[/red]"
    for f in m.get("failed_checks", []):
        err.print(f"[bold red]failed:[/bold red] {f['message']}", markup=True, highlight=False)
        if f.get("hint"):
            err.print(f"[bold]hint:[/bold] {f['hint']}", markup=True, highlight=False)
    if "mean_kld" not in m:  # a pre-check failed: no forward pass was run
        checks = ", ".join(sorted({f["check"] for f in m.get("failed_checks", [])}))
        out.print(f"validate: {verdict} before the forward pass ({checks}); no logits were compared")
        return
    out.print(f"validate: {verdict}  Mean KLD {m['mean_kld']:.3g}  Maximum KLD {m['max_kld']:.3g}  "
              f"99.9% KLD {m['p999_kld']:.3g}  Same top p {100 * m['same_top_p']:.2f}%  RMS Δp "
              f"{100 * m['rms_dp']:.3f}%  PPL {m['ppl_reference']:.4g} -> {m['ppl_candidate']:.4g}  "
              f"ln(PPL ratio) {m['ln_ppl_ratio']:.4g}")


@app.command("inspect", short_help="What a checkpoint or GGUF holds; supported names.",
             help="Show what a checkpoint holds and what converting it writes, from headers only. "
                             "--list-schemes / --list-formats / --list-types print what the writers support.")
def inspect_cmd(
    src: Annotated[Optional[Path], typer.Argument(metavar="SRC", help="checkpoint directory or .gguf file",
                                                  show_default=False)] = None,
    list_schemes: Annotated[bool, typer.Option("--list-schemes", help="quantize schemes")] = False,
    list_formats: Annotated[bool, typer.Option("--list-formats", help="quantize on-disk formats")] = False,
    list_types: Annotated[bool, typer.Option("--list-types", help="GGUF tensor types")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert.inspect import human_lines, inspect_checkpoint, registries, registry_lines

    def human(rep):
        if "registries" in rep:
            for line in registry_lines(rep["registries"]):
                out.print(line)
            return
        for line in human_lines(rep):
            out.print(line, markup=True, highlight=False)

    def body():
        if list_schemes or list_formats or list_types:
            return {"registries": registries(list_schemes, list_formats, list_types)}
        if src is None:
            from .errors import UsageError
            raise UsageError("missing SRC", hint="dsconvert inspect SRC, or one of --list-schemes/--list-formats/--list-types")
        rep = inspect_checkpoint(src)
        if not rep["ok"]:
            raise ProblemsFound("inspect found problems", rep)
        return rep

    _run(body, json_out=json_out, verbose=verbose, human=human)


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    from .errors import UsageError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        # a dsconvert UsageError (exit 2): this runs inside _run, which turns any other exception into exit 1
        raise UsageError(f"--token-ids {text!r}: takes comma-separated integers, e.g. 1,2,3") from None


def _print_forward_plan(rep: dict) -> None:
    """The human form of a ``validate``/``logits`` dry run."""
    p = rep["plan"]
    dev = p["device_memory_estimate"]
    out.print(f"plan: {p['models']} {'model' if p['models'] == 1 else 'models'}, {p['sequences']} "
              f"{'sequence' if p['sequences'] == 1 else 'sequences'}, {p['tokens']:,} tokens on {rep['device']}; "
              f"reads {p['bytes_read']['gb']:.3f} GB; {p['tokens_x_active_params']:.3g} tokens x active params, "
              f"{p['flops'] / 1e12:.3g} TFLOP")
    out.print(f"  peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB"
              + (f", GPU ~{dev['gib']:.2f} GiB" if dev else "") + " (dry run: nothing run)")


@app.command("logits", short_help="Reference forward pass: save logits as .npy.",
             help="Run the reference forward pass and save float32 [tokens, vocab] logits (.npy).")
def logits_cmd(
    src: SrcArg,
    token_ids: Annotated[Optional[str], typer.Option("--token-ids", help="comma-separated ids, e.g. 0,5,6")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="text, tokenized with SRC's tokenizer.json")] = None,
    dtype: ComputeDtypeOpt = "float32",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="where to write the .npy")] = None,
    overwrite: OverwriteFileOpt = False,
    device: ForwardDeviceOpt = "cpu",
    max_memory: MaxMemOpt = None,
    dry_run: EstimateDryOpt = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert.validate import run_logits

    def human(rep):
        if rep["dry_run"]:
            _print_forward_plan(rep)
            return
        out.print(f"logits {rep['shape']} ({rep['dtype']}) -> {rep['output'] or '(not saved; use -o)'}; "
                  f"top-1 ids {rep['top1'][:16]}")

    _run(lambda: run_logits(src, _ids(token_ids), text, dtype, output, overwrite, device=device,
                            max_memory=_size(max_memory), dry_run=dry_run),
         json_out=json_out, verbose=verbose, human=human)


@app.command("validate", short_help="Compare logits with the source (KLD, top-1); exit 4.",
             help="Compare a converted checkpoint's logits with its source through the reference "
                              "forward pass (Mean KLD, top-1 agreement, PPL, per-layer error). Exit 4 if outside "
                              "the thresholds.")
@_option_groups
def validate_cmd(
    candidate: Annotated[Path, typer.Argument(metavar="CANDIDATE", help="converted checkpoint directory", show_default=False,
                                         callback=_hf_cache)],
    reference: Annotated[Path, typer.Option("--reference", help="source checkpoint directory", callback=_hf_cache)],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="text file (default: bundled text)")] = None,
    token_ids: Annotated[Optional[str], typer.Option("--token-ids", help="comma-separated ids")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="tokens per sequence")] = 128,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="sequences")] = 16,
    max_kld: Annotated[float, typer.Option("--max-kld", help="fail above this Mean KLD")] = 0.01,
    min_top1: Annotated[float, typer.Option("--min-top1", help="fail below this Same top p (0..1)")] = 0.97,
    dtype: ComputeDtypeOpt = "float32",
    emulate_activations: Annotated[bool, typer.Option(
        "--emulate-activations/--no-emulate-activations",
        help="quantize Linear inputs as the candidate's quantization_config declares (W8A8, FP8_BLOCK, NVFP4, "
             "MXFP4), as the serving engine does")] = True,
    device: ForwardDeviceOpt = "cpu",
    max_memory: MaxMemOpt = None,
    dry_run: EstimateDryOpt = False,
    ui: ReportOptions = ReportOptions(),
) -> None:
    from .convert.validate import ValidateOptions, run_validate

    def body():
        opts = ValidateOptions(token_ids=_ids(token_ids), prompts=prompts, seq_len=seq_len, num_samples=num_samples,
                               max_kld=max_kld, min_top1=min_top1, dtype=dtype,
                               emulate_activations=emulate_activations, device=device,
                               max_memory=_size(max_memory))
        rep = run_validate(candidate, reference, opts, progress=_progress_enabled(ui.quiet), dry_run=dry_run)
        for w in rep.get("warnings", []):  # on stderr in every output mode
            err.print(f"warning: {w}", markup=False, highlight=False)
        if not rep.get("dry_run") and not rep["passed"]:
            raise ValidationFailed("validation failed", rep)
        return rep

    def human(rep):
        if rep.get("dry_run"):
            _print_forward_plan(rep)
            for f in rep["pre_checks_failed"]:
                err.print(f"would fail: {f['message']}", markup=False, highlight=False)
            return
        _print_validation(rep)
        import math

        # a non-finite error is the worst (max() with NaN keys depends on the order)
        worst = max(rep["layers"], key=lambda r: (not math.isfinite(r["rel_error"]), r["rel_error"])) \
            if rep.get("layers") else None
        if worst:
            out.print(f"  per-layer relative error: max {worst['rel_error']:.3g} at layer {worst['layer']}; "
                      f"first diverging layer {_or_none(rep['first_diverging_layer'])}; "
                      f"largest jump at layer {_or_none(rep['largest_error_jump_layer'])}")
        if rep.get("advice"):
            out.print(f"  advice: {rep['advice']}")

    _run(body, json_out=ui.json_out, verbose=ui.verbose, human=human, report_path=ui.report)


GGUF_EXAMPLES = """
\b
Examples:
  dsconvert gguf DeepSeek-R1 -o DeepSeek-R1-Q4_K_M.gguf --type Q4_K_M
  dsconvert gguf DeepSeek-R1 -o R1-BF16.gguf --type BF16 --split-max-size 50G
  dsconvert gguf DeepSeek-R1 -o R1.gguf --type Q4_K_M --tensor-type attn_k_b=Q8_0 --output-tensor-type Q8_0
  dsconvert gguf DeepSeek-R1 --type Q8_0 --dry-run
"""


@app.command("gguf", short_help="llama.cpp deepseek2 GGUF (Q8_0, Q4_K_M, ...).",
             help="Write a llama.cpp deepseek2 GGUF (mainline MLA layout, llama.cpp >= PR #12801) from "
                          "DeepSeek's FP8 release or a BF16 checkpoint. The MTP layer is dropped and reported.\n"
                          + GGUF_EXAMPLES)
@_option_groups
def gguf_cmd(
    src: SrcArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="the .gguf file to write")] = None,
    type_: Annotated[Optional[str], typer.Option("--type", help=_TYPE_HELP + " [default: BF16, or the recipe's]")
                     ] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", metavar="NAME", help=_GGUF_RECIPE_HELP)] = None,
    tensor_type: Annotated[Optional[list[str]], typer.Option(
        "--tensor-type", metavar="PATTERN=TYPE", help="PATTERN=TYPE (regex on GGUF names, first match wins; repeatable)")] = None,
    tensor_type_file: Annotated[Optional[Path], typer.Option(
        "--tensor-type-file", metavar="FILE", help="PATTERN=TYPE rules, whitespace-separated (one per line; '#' "
        "comments), applied after --tensor-type")] = None,
    output_tensor_type: Annotated[Optional[str], typer.Option("--output-tensor-type",
                                                              help="type of output.weight")] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option("--token-embedding-type",
                                                                help="type of token_embd.weight")] = None,
    pure: Annotated[bool, typer.Option("--pure", help="no mix rules: every quantizable tensor gets the default "
                                                      "type (shape fallbacks still apply)")] = False,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="llama.cpp importance matrix "
                                                                      "(imatrix.gguf or legacy .dat)")] = None,
    target_size: Annotated[Optional[str], typer.Option(
        "--target-size", metavar="SIZE", help="choose each quantizable tensor's type (Q2_K..Q8_0) so the tensor "
        "data fits SIZE (e.g. 180G = 180e9 bytes) with the least measured output error (see --sensitivity; "
        "weighted by --imatrix when given); --tensor-type rules stay fixed; --dry-run shows the choice")] = None,
    sensitivity: Annotated[str, typer.Option(
        "--sensitivity", metavar="forward|weights", help="how --target-size measures a tensor's error at each "
        "type: forward (the reference forward on the original over calibration windows: the change of the "
        "layer's output with only that tensor quantized; DeepSeek-V4 falls back to weights) or weights (the "
        "relative error of a sample of its rows, the earlier proxy)")] = "forward",
    sensitivity_samples: Annotated[int, typer.Option(
        "--sensitivity-samples", min=1, metavar="N", help="calibration windows of --sensitivity forward "
        "(bundled calibration text)")] = 4,
    sensitivity_seq_len: Annotated[int, typer.Option(
        "--sensitivity-seq-len", min=2, metavar="L", help="tokens per window of --sensitivity forward")] = 128,
    split_max_size: Annotated[Optional[str], typer.Option(
        "--split-max-size", help="split into files of at most this much tensor data (e.g. 50G = 50e9 bytes)")] = None,
    split_max_tensors: Annotated[Optional[int], typer.Option("--split-max-tensors", min=1,
                                                             help="at most this many tensors per file")] = None,
    device: DeviceOpt = "auto",
    threads: Annotated[Optional[int], typer.Option(
        "--threads", min=1, help="CPU threads for quantizing (the output bytes do not depend on it) "
        "[default: every core]")] = None,
    kernel: Annotated[str, typer.Option(
        "--kernel", metavar="auto|ggml|torch", help="CPU block quantizer: ggml (llama.cpp's own "
        "ggml_quantize_chunk, from an installed llama-cpp-python or $DSCONVERT_GGML_LIB; llama-quantize's speed), "
        "torch (dsconvert's kernels, also on CUDA), auto (ggml when found); the bytes are the same")] = "auto",
    max_memory: MaxMemOpt = None,
    ray: RayOptions = RayOptions(),
    write: GgufWriteOptions = GgufWriteOptions(),
    state_dir: Annotated[Optional[Path], typer.Option(
        "--state-dir", metavar="DIR", help="write FILE.gguf.dsconvert-manifest.json (resume state) and "
        "FILE.gguf.dsconvert-report.json here instead of beside the .gguf (keeps an upload folder clean); pass "
        "the same DIR to resume")] = None,
    verify: VerifyOpt = "full",
    ui: ReportOptions = ReportOptions(),
) -> None:
    from .convert import gguf_export as ge
    from .convert.manifest import check_verify_mode

    def body():
        from .formats.gguf_recipes import read_tensor_type_file

        rules = list(tensor_type or []) + (read_tensor_type_file(tensor_type_file) if tensor_type_file else [])
        opts = ge.GGUFOptions(type=type_, recipe=recipe, tensor_types=rules, output_tensor_type=output_tensor_type,
                              token_embedding_type=token_embedding_type, pure=pure, imatrix=imatrix,
                              split_max_size=_size(split_max_size), split_max_tensors=split_max_tensors,
                              device=device, threads=threads, kernel=kernel, max_memory=_size(max_memory),
                              state_dir=state_dir, target_size=_size(target_size), sensitivity=sensitivity,
                              sensitivity_samples=sensitivity_samples, sensitivity_seq_len=sensitivity_seq_len)
        ex = ray.executor(1)
        rep = ge.run(src, output, opts, **write.run_kwargs(),
                     progress=_progress_enabled(ui.quiet or ui.json_out and not sys.stderr.isatty()),
                     verify=check_verify_mode(verify), executor=ex)
        _print_warnings(rep)
        return rep

    def human(rep):
        p = rep["plan"]
        d = p["dropped"]
        if rep["dry_run"]:
            out.print(f"plan for {rep['source']['path']} ({rep['source']['family']}, {rep['source']['format']}) -> "
                      f"{p['architecture']} GGUF, {p['type']}, layout {p['layout']}:")
            out.print(f"  {p['tensors']} tensors, {p['elements'] / 1e9:.3f} G elements, "
                      f"{p['total_size']['gb']:.3f} GB ({p['total_size']['gib']:.3f} GiB), {p['bpw']} bpw")
            for t, v in p["types"].items():
                out.print(f"  {t:6s} {v['tensors']:5d} tensors {v['bytes'] / 1e9:10.3f} GB")
            for f in p["files"]:
                out.print(f"  file {f['name']}: {f['tensors']} tensors, {f['gb']:.3f} GB")
            if "target_size" in p:
                b = p["target_size"]
                out.print(f"  --target-size {b['target']['gb']:.3f} GB: {b['tensors_chosen']} tensors chosen, "
                          f"{b['planned']['gb']:.3f} GB of tensor data (possible {b['smallest']['gb']:.3f}-"
                          f"{b['largest']['gb']:.3f} GB); sensitivity {b['sensitivity']}"
                          + (f" on {b['calibration']['sequences']} x {b['calibration']['seq_len']} calibration "
                             f"tokens ({b['seconds']:.1f} s)" if "calibration" in b else "")
                          + "; per-tensor choices in --json")
                if b.get("sensitivity_note"):
                    out.print(f"  note: {b['sensitivity_note']}")
            out.print(f"  peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB")
        else:
            o = rep["output"]
            what = (f"({p['type']}): {o['tensors']} tensors, {o['gb']:.3f} GB, {p['bpw']} bpw, "
                    f"{count(len(o['files']), 'file')}")
            if rep["already_complete"]:
                out.print(f"{o['path']} {what} is already complete; nothing written")
            else:
                state = (f"resumed: {rep['files_reused']} reused, {rep['files_written']} written" if rep["resumed"]
                         else f"{rep['files_written']} written")
                out.print(f"wrote {o['path']} {what}; {state}; {rep['seconds']:.1f} s; "
                          f"peak RSS {rep['peak_rss']['gib']:.2f} GiB")
            out.print("  types: " + ", ".join(f"{t} x{v['tensors']}" for t, v in p["types"].items()))
            out.print(f"  layout: {p['layout']}")
            out.print(f"  resume manifest {o['manifest']}, report {rep['report_path']} (--state-dir DIR puts them "
                      "elsewhere)")
            _print_executor(rep.get("executor") or {})
        if d["tensors"]:
            out.print(f"  dropped {d['tensors']} tensors ({d['gb']:.3f} GB incl. {d['scales']} FP8 scales): "
                      + "; ".join(r["reason"] for r in d["reasons"]))
        if rep["dry_run"]:
            out.print("  (dry run: nothing written)")

    _run(body, json_out=ui.json_out, verbose=ui.verbose, human=human, report_path=ui.report)


@app.command("verify", short_help="Check an output against its manifest (sizes, sha256, index).",
             help="Check an output against its manifest.json: every file present with its size and "
                            "sha256, the index against the shard headers (dtype, shape), config.json. Exit 0 when "
                            "it matches, 3 when something is wrong (each problem names the file, expected and found).")
def verify_cmd(
    output: Annotated[Path, typer.Argument(help="an output folder (fp8-to-bf16, quantize) or .gguf file (gguf)",
                                           show_default=False)],
    quick: Annotated[bool, typer.Option("--quick", help="sizes, manifest and index only: no sha256 (seconds "
                                                        "instead of reading every byte)")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert.verify import verify_output

    def body():
        rep = verify_output(output, quick=quick, progress=_progress_enabled(quiet))
        if not rep["ok"]:
            raise ProblemsFound("verify found problems", rep)
        return rep

    def human(rep):
        for w in rep["warnings"]:
            err.print(f"warning: {w}", markup=False, highlight=False)
        for p in rep["problems"]:
            err.print(f"problem: {p['message']}", markup=False, highlight=False)
        what = "sizes, manifest and index" if rep["mode"] == "quick" else "sizes, sha256, manifest and index"
        n = len(rep["problems"])
        verdict = "OK" if rep["ok"] else f"FAILED ({n} problem{'' if n == 1 else 's'})"
        out.print(f"verify {rep['path']}: {verdict}; {count(rep['files_checked'], 'file')}, {what} checked"
                  + (f", {rep['bytes_hashed'] / 1e9:.3f} GB hashed" if rep["mode"] == "full" else ""))

    _run(body, json_out=json_out, verbose=verbose, human=human)


@app.command("imatrix", short_help="llama.cpp importance matrix for gguf --imatrix.",
             help="Compute llama.cpp's importance matrix on the original FP8 (or BF16) checkpoint (DeepSeek V2/V3/V4) with the "
                             "reference forward, layer by layer, for `dsconvert gguf --imatrix` or llama-quantize "
                             "--imatrix. Writes the GGUF imatrix format (or the legacy .dat).")
@_option_groups
def imatrix_cmd(
    src: SrcArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="the imatrix file to write (imatrix.gguf)")],
    calib_data: Annotated[Optional[str], typer.Option(
        "--calib-data", metavar="FILE", help="calibration text file (tokenized with SRC's tokenizer.json) or a .json list of "
                             "token-id lists; default: the bundled calibration text")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="calibration windows (chunks)")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="tokens per window (llama-imatrix -c)")] = 512,
    process_output: Annotated[bool, typer.Option("--process-output",
                                                 help="also collect output.weight (lm_head)")] = False,
    output_format: Annotated[str, typer.Option("--output-format", help="gguf | dat (legacy)")] = "gguf",
    dtype: ComputeDtypeOpt = "float32",
    dry_run: DryOpt = False,
    overwrite: OverwriteFileOpt = False,
    ray: RayOptions = RayOptions(),
    ui: ReportOptions = ReportOptions(),
) -> None:
    from .convert.imatrix import ImatrixOptions, run_imatrix

    def body():
        opts = ImatrixOptions(calib_data=calib_data, num_samples=num_samples, seq_len=seq_len,
                              process_output=process_output, fmt=output_format, dtype=dtype)
        ex = ray.executor(1)
        return run_imatrix(src, output, opts, overwrite=overwrite, dry_run=dry_run,
                           progress=_progress_enabled(ui.quiet or ui.json_out and not sys.stderr.isatty()), executor=ex)

    def human(rep):
        c = rep["calibration"]
        head = f"{c['windows']} windows, {c['tokens']} tokens of {c['name']}"
        if rep["dry_run"]:
            out.print(f"plan: importance matrix of {rep['source']} ({rep['layers']} layers) from {head} -> "
                      f"{rep['output']} ({rep['format']}); peak memory ~{rep['estimated_peak_memory_bytes'] / 2**30:.2f}"
                      " GiB\n  (dry run: nothing written)")
            return
        out.print(f"wrote {rep['output']} ({rep['format']}): {rep['entries']} tensors from {head}; "
                  f"{rep['seconds']:.1f} s")
        if rep["experts_without_tokens"]:
            n = sum(rep["experts_without_tokens"].values())
            out.print(f"  {n} expert matrices received no token (llama-quantize uses weights of 1 for them); "
                      "more or longer windows cover more experts")
        _print_executor(rep.get("executor") or {})

    _run(body, json_out=ui.json_out, verbose=ui.verbose, human=human, report_path=ui.report)


@app.command("env", short_help="Versions, CPU features, CUDA, free memory and disk.",
             help="Versions, CPU features (AMX), CUDA, free memory and disk.")
def env_cmd(json_out: JsonOpt = False) -> None:
    from .convert.envinfo import env_report

    def human(rep):
        for k, v in rep.items():
            out.print(f"{k:22s} {v}")

    _run(env_report, json_out=json_out, verbose=False, human=human)


@app.command("make-fixture", short_help="Write a synthetic checkpoint in the release layout.",
             help="Write a synthetic checkpoint in DeepSeek's exact release layout (tiny | bench | bench4x | real). "
                  "'real' has the release's tensor dimensions and is written streaming (default: layer 0 dense + "
                  "layer 1 MoE with 256 experts, no MTP, 15.8 GB; --arch v4: layer 0 sliding + hash-routed, "
                  "layer 1 CSA + routed, 256 FP4 experts each, V4-Flash dimensions, 9.0 GB).")
def make_fixture_cmd(
    output: Annotated[Path, typer.Argument(metavar="DIR", help="directory to create")],
    preset: Annotated[str, typer.Option("--preset", help="tiny (seconds, tests) | bench (1.5 GB) | bench4x (5 GB) | "
                                                          "real (release dimensions)")] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="random seed of the weights (same seed, same bytes)")] = 0,
    layers: Annotated[Optional[int], typer.Option("--layers", help="decoder layers (real: 2)")] = None,
    dense_layers: Annotated[Optional[int], typer.Option("--dense-layers", help="leading dense layers (real: 1)")] = None,
    mtp: Annotated[Optional[bool], typer.Option("--mtp/--no-mtp", help="write the MTP block (real: no)")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="routed experts per MoE layer (real: 256)")] = None,
    shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="real: bytes per shard (4.3G)")] = None,
    arch: Annotated[str, typer.Option("--arch", help="v3 (DeepSeek-V3/R1 layout) | v4 (DeepSeek-V4 release layout; "
                                                     "needs transformers)")] = "v3",
    variant: Annotated[Optional[str], typer.Option("--variant", help="v4: flash (FP4 experts) | flash-base (FP8 "
                                                                     "experts)")] = None,
) -> None:
    from .errors import OutputExistsError, UsageError
    from .testing.fixtures import PRESETS, build_checkpoint

    def body():
        if arch not in ("v3", "v4"):
            raise UsageError(f"unknown --arch {arch!r}", hint="v3 or v4")
        if arch == "v4":
            from .testing.deepseek_v4 import V4_PRESETS, build_v4_checkpoint

            if preset not in (*V4_PRESETS, "real"):
                raise UsageError(f"--arch v4: unknown preset {preset!r}", hint=", ".join((*V4_PRESETS, "real")))
            if dense_layers is not None:
                raise UsageError("--dense-layers applies to --arch v3 only (every V4 layer is MoE)")
            if preset != "real" and any(v is not None for v in (layers, experts, shard_size)):
                raise UsageError("--layers/--experts/--shard-size apply to --preset real only")
            if preset == "real" and variant not in (None, "flash"):
                raise UsageError("--arch v4 --preset real writes V4-Flash (FP4 experts) only")
            if output.exists() and any(output.iterdir()):
                raise OutputExistsError(f"{output} exists and is not empty")
            if preset == "real":
                from .testing.realsize import RELEASE_SHARD_BYTES
                from .testing.realsize_v4 import RealV4Options, real_v4_spec, write_real_v4_checkpoint

                d = RealV4Options()
                opts = RealV4Options(layers=d.layers if layers is None else layers,
                                     hash_layers=d.hash_layers if layers is None else min(d.hash_layers, layers),
                                     mtp=bool(mtp), experts=d.experts if experts is None else experts, seed=seed)
                real_v4_spec(opts)  # UsageError before anything is written
                t0 = time.perf_counter()
                write_real_v4_checkpoint(output, opts, shard_bytes=_size(shard_size) or RELEASE_SHARD_BYTES,
                                         on_shard=lambda n, size, secs: err.print(
                                             f"{n}: {size / 1e9:.2f} GB in {secs:.1f} s"))
                err.print(f"wrote real DeepSeek-V4-Flash fixture ({opts.layers} layers, {opts.hash_layers} "
                          f"hash-routed, {opts.experts} experts, MTP {'yes' if opts.mtp else 'no'}) to {output} "
                          f"in {time.perf_counter() - t0:.1f} s")
                return None
            over = {"seed": seed, "variant": variant or "flash"}
            if mtp is not None:
                over["num_nextn_predict_layers"] = 1 if mtp else 0
            build_v4_checkpoint(output, preset, **over)
            err.print(f"wrote DeepSeek-V4 {over['variant']} {preset} fixture to {output}")
            return None
        if variant is not None:
            raise UsageError("--variant applies to --arch v4 only")
        if preset not in (*PRESETS, "real"):
            raise UsageError(f"unknown preset {preset!r}", hint="tiny, bench, bench4x or real")
        if output.exists() and any(output.iterdir()):
            raise OutputExistsError(f"{output} exists and is not empty")
        if preset == "real":
            from .testing.realsize import RELEASE_SHARD_BYTES, RealOptions, real_spec, write_real_checkpoint

            d = RealOptions()
            opts = RealOptions(layers=d.layers if layers is None else layers,
                               dense_layers=d.dense_layers if dense_layers is None else dense_layers,
                               mtp=d.mtp if mtp is None else mtp, experts=d.experts if experts is None else experts,
                               seed=seed)
            real_spec(opts)  # UsageError before anything is written
            shard_bytes = _size(shard_size) or RELEASE_SHARD_BYTES
            t0 = time.perf_counter()

            def on_shard(name: str, size: int, secs: float) -> None:
                err.print(f"{name}: {size / 1e9:.2f} GB in {secs:.1f} s ({size / 1e9 / max(secs, 1e-9):.2f} GB/s)")

            write_real_checkpoint(output, opts, shard_bytes=shard_bytes, on_shard=on_shard)
            err.print(f"wrote real fixture ({opts.layers} layers, {opts.dense_layers} dense, "
                      f"{opts.experts} experts, MTP {'yes' if opts.mtp else 'no'}) to {output} "
                      f"in {time.perf_counter() - t0:.1f} s")
            return None
        if shard_size is not None:
            raise UsageError("--shard-size applies to --preset real only")
        over = {k: v for k, v in (("num_hidden_layers", layers), ("first_k_dense_replace", dense_layers),
                                  ("n_routed_experts", experts)) if v is not None}
        if mtp is not None:
            over["num_nextn_predict_layers"] = 1 if mtp else 0
        build_checkpoint(output, preset, seed=seed, **over)
        err.print(f"wrote {preset} fixture to {output}")
        return None

    _run(body, json_out=False, verbose=False)


def main() -> None:
    """Console-script entry point.

    Under ``--json`` a usage error found by the parser (an unknown option, ``--num-samples 0``) also prints the
    JSON error document on stdout, with the schema of every other error (``error``, ``message``, ``hint``,
    ``exit_code`` 2); the usual usage text still goes to stderr. The parser's exceptions are recognised by the
    public ``ClickException`` interface (``exit_code``, ``format_message()``, ``show()``), never by importing
    Click internals.
    """
    if "--json" not in sys.argv[1:]:
        app()
        return
    try:
        rv = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C while the parser ran (no command body yet): nothing was started
        try:
            _interrupted_exit(signal.SIGINT, True)
        except typer.Exit as x:
            sys.exit(x.exit_code)
    except Exception as e:  # noqa: BLE001 - only the parser's usage errors are handled here; the rest re-raise
        code = getattr(e, "exit_code", None)
        if code != 2 or not (hasattr(e, "format_message") and hasattr(e, "show")):
            raise
        e.show()
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path} --help" if ctx is not None else "dsconvert --help"
        _emit_json({**_ident(), "error": "UsageError", "message": e.format_message(),
                    "hint": f"see `{where.replace('python -m dsconvert.cli', 'dsconvert')}`", "exit_code": 2})
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
