"""dsconvert command line (Typer, public API only). Parsing, output modes and exit codes; no tensor math.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input / unsupported checkpoint, 4 validation failed.
``--json`` prints exactly one JSON document on stdout (the report, or ``{"error": ...}``); progress and
messages go to stderr. Tracebacks appear only with ``-v`` or ``DSCONVERT_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import EXIT_INTERNAL, DsconvertError

app = typer.Typer(
    name="dsconvert",
    help="Convert DeepSeek-V3/R1 checkpoints: FP8 -> BF16, INT8/INT4, GGUF; inspect and validate them.\n\n"
         "Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input or unsupported checkpoint, 4 validation failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

# Reusable option spellings (one place for names and help texts).
def _hf_cache(path: Optional[Path]) -> Optional[Path]:
    """Typer callback: a Hugging Face cache repo folder resolves to the snapshot ``refs/main`` names."""
    from .formats.checkpoint import resolve_hf_cache

    return None if path is None else resolve_hf_cache(path)


SrcArg = Annotated[Path, typer.Argument(help="checkpoint directory (HF layout; HF-cache repo and snapshot paths work)",
                                        show_default=False, callback=_hf_cache)]
OutOpt = Annotated[Optional[Path], typer.Option("-o", "--output", help="output directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print only the final JSON report on stdout")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="print the plan (sizes, memory) and write nothing")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress display")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="tracebacks on errors")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace the model files of an existing output")]
NoResumeOpt = Annotated[bool, typer.Option("--no-resume", help="start over even if a matching partial output exists")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="output shards written concurrently")]
MaxMemOpt = Annotated[Optional[str], typer.Option("--max-memory", help="refuse plans above this peak RAM (e.g. 8G, 6GiB)")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report to this path")]


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

    debug = verbose or os.environ.get("DSCONVERT_DEBUG") == "1"
    try:
        if report_path is not None:
            check_writable_file(report_path, "--report")
        with _cancel_on_signals():
            rep = fn()
        # the exit code a finished command asks for is ours, not part of the report
        code = rep.pop("_exit_code", None) if isinstance(rep, dict) else None
        if rep is not None and report_path is not None:
            report_path.write_text(_dumps(rep) + "\n")
    except cancel.Cancelled as e:
        _interrupted_exit(e.signum or cancel.signum(), json_out)
    except DsconvertError as e:
        if debug:
            traceback.print_exc()
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
"""


@app.command("fp8-to-bf16", help="Dequantize DeepSeek's block-FP8 release to a complete BF16 HF checkpoint.\n"
                                  + FP8_EXAMPLES)
def fp8_to_bf16_cmd(
    src: SrcArg,
    output: OutOpt = None,
    mtp: Annotated[str, typer.Option("--mtp", help="keep | drop the multi-token-prediction layer")] = "keep",
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 | f16 | f32 for dequantized weights")] = "bf16",
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size",
                                                          help="e.g. 5G; default keeps the source's shards")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 2,
    max_memory: MaxMemOpt = None,
    validate: Annotated[bool, typer.Option("--validate", help="when done, validate logits against SRC")] = False,
    dry_run: DryOpt = False,
    overwrite: OverwriteOpt = False,
    no_resume: NoResumeOpt = False,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert import fp8_to_bf16 as f2b

    def body():
        opts = f2b.Options(mtp=mtp, dtype=f2b.normalize_dtype(dtype), max_shard_size=_size(max_shard_size),
                           device=device, workers=workers, max_memory=_size(max_memory))
        if not dry_run and output is None:
            from .errors import UsageError
            raise UsageError("missing -o/--output", hint="dsconvert fp8-to-bf16 SRC -o OUT (or --dry-run)")
        rep = f2b.run(src, output, opts, dry_run=dry_run, overwrite=overwrite, resume=not no_resume,
                      progress=_progress_enabled(quiet or json_out and not sys.stderr.isatty()))
        if validate and not dry_run:
            rep["validation"] = _validate_after(output, src, quiet)
            if not rep["validation"].get("passed", False):
                rep["_exit_code"] = 4
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
            out.print("  (dry run: nothing written)")
            return
        o = rep["output"]
        state = "already complete" if rep["already_complete"] else (
            f"resumed: {rep['shards_reused']} shards reused, {rep['shards_written']} written" if rep["resumed"]
            else f"{rep['shards_written']} shards written")
        out.print(f"wrote {o['path']}: {o['tensors']} tensors, {o['total_size'] / 1e9:.3f} GB; {state}; "
                  f"{rep['seconds']:.1f} s; peak RSS {rep['peak_rss']['gib']:.2f} GiB")
        if p["dropped"]:
            out.print(f"dropped {len(p['dropped'])} tensors: {p['dropped'][0]['reason']}")
        if "validation" in rep:
            _print_validation(rep["validation"])

    _run(body, json_out=json_out, verbose=verbose, human=human, report_path=report)


QUANTIZE_EXAMPLES = """
\b
Examples:
  dsconvert quantize DeepSeek-R1 -o R1-W4A16 --scheme W4A16 --group-size 128
  dsconvert quantize DeepSeek-R1 -o R1-AWQ --awq --format awq
  dsconvert quantize DeepSeek-R1 -o R1-GPTQ --gptq --format gptq --ignore 're:.*kv_b_proj$'
  dsconvert quantize DeepSeek-R1 --scheme W8A16 --group-size -1 --dry-run
"""


@app.command("quantize", help="INT8/INT4 weights in compressed-tensors, AutoAWQ GEMM or GPTQ layout, straight "
                              "from the FP8 release or a BF16 checkpoint.\n" + QUANTIZE_EXAMPLES)
def quantize_cmd(
    src: SrcArg,
    output: OutOpt = None,
    scheme: Annotated[str, typer.Option("--scheme", help="W4A16 | W4A16_ASYM | W8A16")] = "W4A16",
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", help="32 | 64 | 128 | -1 (per channel); default: the scheme's, 128")] = None,
    fmt: Annotated[str, typer.Option("--format", help="compressed-tensors | awq | gptq (on-disk layout)")] = "compressed-tensors",
    checkpoint_format: Annotated[Optional[str], typer.Option("--checkpoint-format",
                                                             help="gptq only: gptq (v1) | gptq_v2")] = None,
    method: Annotated[str, typer.Option("--method", help="rtn | awq | gptq")] = "rtn",
    awq: Annotated[bool, typer.Option("--awq", help="shorthand for --method awq")] = False,
    gptq: Annotated[bool, typer.Option("--gptq", help="shorthand for --method gptq")] = False,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="keep a module unquantized: exact name "
                                                        "or re:REGEX (repeatable)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="an --ignore pattern that matches nothing is an error")] = False,
    mtp: Annotated[str, typer.Option("--mtp", help="keep | drop the multi-token-prediction layer")] = "keep",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="e.g. 5G")] = "5G",
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="awq/gptq: text file or token ids "
                                                      "(default: the bundled calibration set)")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="awq/gptq: calibration sequences")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="awq/gptq: tokens per sequence")] = 128,
    calib_seed: Annotated[int, typer.Option("--calib-seed", help="awq/gptq: which windows of the text")] = 0,
    expert_policy: Annotated[str, typer.Option("--expert-policy", help="awq/gptq: experts with few tokens: "
                                               "all-tokens | rtn | topk")] = "all-tokens",
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 1,
    max_memory: MaxMemOpt = None,
    dry_run: DryOpt = False,
    overwrite: OverwriteOpt = False,
    no_resume: NoResumeOpt = False,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert import quantize as qz
    from .errors import UsageError

    def body():
        chosen = [m for m, on in (("awq", awq), ("gptq", gptq)) if on]
        if len(chosen) > 1 or (chosen and method != "rtn"):
            raise UsageError("give one of --awq, --gptq, --method", hint="they name the same choice")
        if not dry_run and output is None:
            raise UsageError("missing -o/--output", hint="dsconvert quantize SRC -o OUT (or --dry-run)")
        opts = qz.Options(scheme=scheme, group_size=group_size, format=fmt, checkpoint_format=checkpoint_format,
                          method=chosen[0] if chosen else method, ignore=list(ignore or []), strict=strict, mtp=mtp,
                          max_shard_size=_size(max_shard_size), device=device, workers=workers,
                          max_memory=_size(max_memory), calib_data=calib_data, num_samples=num_samples,
                          seq_len=seq_len, calib_seed=calib_seed, expert_policy=expert_policy)
        rep = qz.run(src, output, opts, dry_run=dry_run, overwrite=overwrite, resume=not no_resume,
                     progress=_progress_enabled(quiet))
        for w in rep.get("warnings", []):  # on stderr in every output mode (--json keeps stdout to the report)
            err.print(f"warning: {w}", markup=False, highlight=False)
        return rep

    def human(rep):
        p = rep["plan"]
        sch = rep["scheme"]
        head = (f"{rep['options']['method'].upper()} {sch['name']} (g{sch['group_size']}) -> {rep['format']}: "
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

    _run(body, json_out=json_out, verbose=verbose, human=human, report_path=report)


def _validate_after(candidate: Path, reference: Path, quiet: bool) -> dict:
    from .convert import validate as val

    return val.run_validate(candidate, reference, val.ValidateOptions(), progress=_progress_enabled(quiet))


def _print_validation(rep: dict) -> None:
    m = rep
    verdict = "[green]PASSED[/green]" if m.get("passed") else "[red]FAILED[/red]"
    for f in m.get("failed_checks", []):
        err.print(f"[bold red]failed:[/bold red] {f['message']}", markup=True, highlight=False)
    out.print(f"validate: {verdict}  Mean KLD {m['mean_kld']:.3g}  Maximum KLD {m['max_kld']:.3g}  "
              f"99.9% KLD {m['p999_kld']:.3g}  Same top p {100 * m['same_top_p']:.2f}%  RMS Δp "
              f"{100 * m['rms_dp']:.3f}%  PPL {m['ppl_reference']:.4g} -> {m['ppl_candidate']:.4g}  "
              f"ln(PPL ratio) {m['ln_ppl_ratio']:.4g}")


@app.command("inspect", help="Show what a checkpoint holds and what converting it writes, from headers only. "
                             "--list-schemes / --list-formats / --list-types print what the writers support.")
def inspect_cmd(
    src: Annotated[Optional[Path], typer.Argument(help="checkpoint directory", show_default=False)] = None,
    list_schemes: Annotated[bool, typer.Option("--list-schemes", help="quantize schemes")] = False,
    list_formats: Annotated[bool, typer.Option("--list-formats", help="quantize on-disk formats")] = False,
    list_types: Annotated[bool, typer.Option("--list-types", help="GGUF tensor types")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert.inspect import human_lines, inspect_checkpoint, registries

    def human(rep):
        if "registries" in rep:
            for k, v in rep["registries"].items():
                out.print(f"{k}: {', '.join(v)}")
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
            rep["_exit_code"] = 3
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


@app.command("logits", help="Run the reference forward pass and save float32 [tokens, vocab] logits (.npy).")
def logits_cmd(
    src: SrcArg,
    token_ids: Annotated[Optional[str], typer.Option("--token-ids", help="comma-separated ids, e.g. 0,5,6")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="text, tokenized with SRC's tokenizer.json")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 computation")] = "float32",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="where to write the .npy")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing -o file")] = False,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert.validate import run_logits

    def human(rep):
        out.print(f"logits {rep['shape']} ({rep['dtype']}) -> {rep['output'] or '(not saved; use -o)'}; "
                  f"top-1 ids {rep['top1'][:16]}")

    _run(lambda: run_logits(src, _ids(token_ids), text, dtype, output, overwrite), json_out=json_out, verbose=verbose,
         human=human)


@app.command("validate", help="Compare a converted checkpoint's logits with its source through the reference "
                              "forward pass (Mean KLD, top-1 agreement, PPL, per-layer error). Exit 4 if outside "
                              "the thresholds.")
def validate_cmd(
    candidate: Annotated[Path, typer.Argument(help="converted checkpoint directory", show_default=False,
                                         callback=_hf_cache)],
    reference: Annotated[Path, typer.Option("--reference", help="source checkpoint directory", callback=_hf_cache)],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="text file (default: bundled text)")] = None,
    token_ids: Annotated[Optional[str], typer.Option("--token-ids", help="comma-separated ids")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="tokens per sequence")] = 128,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="sequences")] = 16,
    max_kld: Annotated[float, typer.Option("--max-kld", help="fail above this Mean KLD")] = 0.01,
    min_top1: Annotated[float, typer.Option("--min-top1", help="fail below this Same top p (0..1)")] = 0.97,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 computation")] = "float32",
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert.validate import ValidateOptions, run_validate

    def body():
        opts = ValidateOptions(token_ids=_ids(token_ids), prompts=prompts, seq_len=seq_len, num_samples=num_samples,
                               max_kld=max_kld, min_top1=min_top1, dtype=dtype)
        rep = run_validate(candidate, reference, opts, progress=_progress_enabled(quiet))
        for w in rep.get("warnings", []):  # on stderr in every output mode
            err.print(f"warning: {w}", markup=False, highlight=False)
        if not rep["passed"]:
            rep["_exit_code"] = 4
        return rep

    def human(rep):
        _print_validation(rep)
        import math

        # a non-finite error is the worst (max() with NaN keys depends on the order)
        worst = max(rep["layers"], key=lambda r: (not math.isfinite(r["rel_error"]), r["rel_error"])) \
            if rep["layers"] else None
        if worst:
            out.print(f"  per-layer relative error: max {worst['rel_error']:.3g} at layer {worst['layer']}; "
                      f"first diverging layer {rep['first_diverging_layer']}; "
                      f"largest jump at layer {rep['largest_error_jump_layer']}")
        if rep.get("advice"):
            out.print(f"  advice: {rep['advice']}")

    _run(body, json_out=json_out, verbose=verbose, human=human, report_path=report)


GGUF_EXAMPLES = """
\b
Examples:
  dsconvert gguf DeepSeek-R1 -o DeepSeek-R1-Q4_K_M.gguf --type Q4_K_M
  dsconvert gguf DeepSeek-R1 -o R1-BF16.gguf --type BF16 --split-max-size 50G
  dsconvert gguf DeepSeek-R1 -o R1.gguf --type Q4_K_M --tensor-type attn_k_b=Q8_0 --output-tensor-type Q8_0
  dsconvert gguf DeepSeek-R1 --type Q8_0 --dry-run
"""


@app.command("gguf", help="Write a llama.cpp deepseek2 GGUF (mainline MLA layout, llama.cpp >= PR #12801) from "
                          "DeepSeek's FP8 release or a BF16 checkpoint. The MTP layer is dropped and reported.\n"
                          + GGUF_EXAMPLES)
def gguf_cmd(
    src: SrcArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="the .gguf file to write")] = None,
    type_: Annotated[str, typer.Option("--type", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K "
                                                      "Q5_K Q6_K or a mix Q2_K_S Q3_K_S Q3_K_M Q3_K_L Q4_K_S "
                                                      "Q4_K_M Q5_K_S Q5_K_M (llama-quantize rules; Q4_K = Q4_K_M "
                                                      "--pure; IQ types are refused)")] = "BF16",
    tensor_type: Annotated[Optional[list[str]], typer.Option(
        "--tensor-type", help="PATTERN=TYPE (regex on GGUF names, first match wins; repeatable)")] = None,
    output_tensor_type: Annotated[Optional[str], typer.Option("--output-tensor-type",
                                                              help="type of output.weight")] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option("--token-embedding-type",
                                                                help="type of token_embd.weight")] = None,
    pure: Annotated[bool, typer.Option("--pure", help="no mix rules: every quantizable tensor gets the default "
                                                      "type (shape fallbacks still apply)")] = False,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="llama.cpp importance matrix "
                                                                      "(imatrix.gguf or legacy .dat)")] = None,
    split_max_size: Annotated[Optional[str], typer.Option(
        "--split-max-size", help="split into files of at most this much tensor data (e.g. 50G = 50e9 bytes)")] = None,
    split_max_tensors: Annotated[Optional[int], typer.Option("--split-max-tensors", min=1,
                                                             help="at most this many tensors per file")] = None,
    device: DeviceOpt = "auto",
    max_memory: MaxMemOpt = None,
    dry_run: DryOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing output files")] = False,
    no_resume: NoResumeOpt = False,
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from .convert import gguf_export as ge

    def body():
        opts = ge.GGUFOptions(type=type_, tensor_types=list(tensor_type or []), output_tensor_type=output_tensor_type,
                              token_embedding_type=token_embedding_type, pure=pure, imatrix=imatrix,
                              split_max_size=_size(split_max_size), split_max_tensors=split_max_tensors,
                              device=device, max_memory=_size(max_memory))
        return ge.run(src, output, opts, dry_run=dry_run, overwrite=overwrite, resume=not no_resume,
                      progress=_progress_enabled(quiet or json_out and not sys.stderr.isatty()))

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
            out.print(f"  peak memory ~{p['peak_memory_estimate']['gib']:.2f} GiB")
        else:
            o = rep["output"]
            state = "already complete" if rep["already_complete"] else (
                f"resumed: {rep['files_reused']} files reused, {rep['files_written']} written" if rep["resumed"]
                else f"{rep['files_written']} written")
            nf = len(o["files"])
            out.print(f"wrote {o['path']} ({p['type']}): {o['tensors']} tensors, {o['gb']:.3f} GB, {p['bpw']} bpw, "
                      f"{nf} {'file' if nf == 1 else 'files'}; {state}; {rep['seconds']:.1f} s; "
                      f"peak RSS {rep['peak_rss']['gib']:.2f} GiB")
            out.print(f"  types: " + ", ".join(f"{t} x{v['tensors']}" for t, v in p["types"].items()))
            out.print(f"  layout: {p['layout']}")
        if d["tensors"]:
            out.print(f"  dropped {d['tensors']} tensors ({d['gb']:.3f} GB incl. {d['scales']} FP8 scales): "
                      + "; ".join(r["reason"] for r in d["reasons"]))
        if rep["dry_run"]:
            out.print("  (dry run: nothing written)")

    _run(body, json_out=json_out, verbose=verbose, human=human, report_path=report)


@app.command("env", help="Versions, CPU features (AMX), CUDA, free memory and disk.")
def env_cmd(json_out: JsonOpt = False) -> None:
    from .convert.envinfo import env_report

    def human(rep):
        for k, v in rep.items():
            out.print(f"{k:22s} {v}")

    _run(env_report, json_out=json_out, verbose=False, human=human)


@app.command("make-fixture",
             help="Write a synthetic checkpoint in DeepSeek's exact release layout (tiny | bench | bench4x | real). "
                  "'real' has the release's tensor dimensions and is written streaming (default: layer 0 dense + "
                  "layer 1 MoE with 256 experts, no MTP, 15.8 GB).")
def make_fixture_cmd(
    output: Annotated[Path, typer.Argument(help="directory to create")],
    preset: Annotated[str, typer.Option("--preset", help="tiny (seconds, tests) | bench (1.5 GB) | bench4x (5 GB) | "
                                                          "real (release dimensions)")] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="random seed of the weights (same seed, same bytes)")] = 0,
    layers: Annotated[Optional[int], typer.Option("--layers", help="decoder layers (real: 2)")] = None,
    dense_layers: Annotated[Optional[int], typer.Option("--dense-layers", help="leading dense layers (real: 1)")] = None,
    mtp: Annotated[Optional[bool], typer.Option("--mtp/--no-mtp", help="write the MTP block (real: no)")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", help="routed experts per MoE layer (real: 256)")] = None,
    shard_size: Annotated[Optional[str], typer.Option("--shard-size", help="real: bytes per shard (4.3G)")] = None,
) -> None:
    from .errors import OutputExistsError, UsageError
    from .testing.fixtures import PRESETS, build_checkpoint

    def body():
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
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
