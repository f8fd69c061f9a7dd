"""SIGINT / SIGTERM / SIGKILL in the middle of every writing command, then a rerun.

Each case starts the real CLI as a subprocess on a fixture big enough (12 shards / 12 layers) to be mid-run,
waits until the output is partly written (a shard committed, or a GGUF ``.tmp`` a third full), sends the
signal and checks: the process exits within a generous bound (a behaviour check, not a benchmark) with
128 + the signal number; the output was incomplete at that moment (no index / no final file); no stray
``.tmp`` (a GGUF file in flight is kept only together with its resume sidecar); every shard recorded in the
manifest is on disk with the recorded sha256. The rerun must then give the same bytes as an uninterrupted run
(the oracle: sha256 of every file of a clean run, ``report.json`` aside), manifest included, which also shows
that the manifest does not depend on the order in which shards finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import manifest_files, INDEX, REPO, cli_env, guard_source, popen_cli, tree_hashes

MANIFEST = "manifest.json"
EXIT_BOUND_S = 10.0
G = ["--group-size", "32"]  # the fixture's dense intermediate (320) takes g32


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def outputs(out: Path) -> dict:
    h = tree_hashes(out)
    h.pop("report.json", None)
    return h


@pytest.fixture(scope="module")
def sig_src(tmp_path_factory):
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path_factory.mktemp("sig") / "src", "tiny", num_shards=12, num_hidden_layers=12,
                           n_routed_experts=16, hidden_size=512, moe_intermediate_size=256, vocab_size=1024)
    guard_source(src)
    return src


@pytest.fixture(scope="module")
def small_src(tmp_path_factory):
    """Three layers: enough for a calibrated run to be interrupted between layers, and fast."""
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path_factory.mktemp("sigcal") / "src", "tiny", num_shards=3, num_hidden_layers=3,
                           n_routed_experts=8, hidden_size=256, moe_intermediate_size=128, vocab_size=1024)
    guard_source(src)
    return src


_clean_cache: dict = {}


def clean_run(args: tuple, out: Path) -> Path:
    """An uninterrupted run of ``args`` into ``out`` (cached per argument list)."""
    key = tuple(map(str, args))
    if key not in _clean_cache:
        p = popen_cli(*args, "-o", out, "-q")
        _, se = p.communicate(timeout=600)
        assert p.returncode == 0, se
        _clean_cache[key] = out
    return _clean_cache[key]


def interrupt(args: tuple, out: Path, cond, sig: int, *, script: str | None = None, timeout: float = 300):
    """Run ``args -o out``, send ``sig`` as soon as ``cond(out)`` holds. Returns (rc, stderr, seconds from the
    signal to the exit, what ``cond`` saw)."""
    if script is None:
        p = popen_cli(*args, "-o", out, "-q")
    else:
        p = subprocess.Popen([sys.executable, "-c", script, *map(str, args), "-o", str(out), "-q"], cwd=REPO,
                             env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    seen = None
    try:
        while p.poll() is None and time.monotonic() - t0 < timeout:
            seen = cond(out)
            if seen:
                p.send_signal(sig)
                break
            time.sleep(0.003)
        ts = time.monotonic()
        _, se = p.communicate(timeout=120)
        return p.returncode, se, time.monotonic() - ts, seen
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _one_shard_done(out: Path):
    files = manifest_files(out)
    return dict(files) if files else None


SAFETENSORS_CASES = {
    "fp8-w1-SIGINT": (("fp8-to-bf16", "{src}", "--workers", "1"), signal.SIGINT),
    "fp8-w2-SIGINT": (("fp8-to-bf16", "{src}"), signal.SIGINT),  # the default 2 workers
    "fp8-w4-SIGTERM": (("fp8-to-bf16", "{src}", "--workers", "4"), signal.SIGTERM),
    "rtn-SIGINT": (("quantize", "{src}", "--max-shard-size", "4M", *G), signal.SIGINT),
    "rtn-w2-SIGTERM": (("quantize", "{src}", "--max-shard-size", "4M", "--workers", "2", *G), signal.SIGTERM),
}


def _args(template: tuple, src: Path) -> tuple:
    return tuple(str(src) if a == "{src}" else a for a in template)


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_signal_stops_safetensors_writer_and_resumes(case, sig_src, tmp_path_factory):
    template, sig = SAFETENSORS_CASES[case]
    args = _args(template, sig_src)
    base = tmp_path_factory.mktemp(case)
    ref_args = tuple(a for i, a in enumerate(args) if a != "--workers" and (i == 0 or args[i - 1] != "--workers"))
    clean = clean_run(ref_args, tmp_path_factory.mktemp("clean") / "out")
    n_shards = len(list(clean.glob("*.safetensors")))
    assert n_shards >= 10
    out = base / "out"

    rc, se, exit_s, seen = interrupt(args, out, _one_shard_done, sig)
    assert seen, f"the run finished before any shard was recorded: {se}"
    assert rc == 128 + sig, f"rc {rc}, stderr: {se}"
    assert "interrupted" in se and "resume" in se
    assert exit_s < EXIT_BOUND_S, f"took {exit_s:.1f} s to stop after {signal.Signals(sig).name}"
    assert not (out / INDEX).exists(), "the output was already complete when the signal arrived"
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    kept = manifest_files(out)
    assert set(seen) <= set(kept) and len(kept) < n_shards
    clean_h = outputs(clean)
    for name, meta in kept.items():  # every finished shard is complete and is the clean run's shard
        assert _sha(out / name) == meta["sha256"] == clean_h[name]
    assert set(p.name for p in out.glob("*.safetensors")) == set(kept)  # nothing unrecorded left over

    p = popen_cli(*args, "-o", out, "--json")
    so, se2 = p.communicate(timeout=600)
    assert p.returncode == 0, se2
    rep = json.loads(so)
    assert rep["resumed"] is True and rep["shards_written"] == n_shards - len(kept)
    assert outputs(out) == clean_h  # manifest.json included, byte for byte


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_signal_stops_calibrated_quantize_and_resumes(small_src, tmp_path_factory):
    args = ("quantize", str(small_src), "--gptq", "--num-samples", "2", "--seq-len", "16", "--max-shard-size", "1M",
            *G)
    clean = clean_run(args, tmp_path_factory.mktemp("clean-gptq") / "out")
    n_shards = len(list(clean.glob("*.safetensors")))
    assert n_shards >= 3
    out = tmp_path_factory.mktemp("gptq") / "out"
    rc, se, exit_s, seen = interrupt(args, out, _one_shard_done, signal.SIGTERM)
    assert seen, se
    assert rc == 143, se
    assert exit_s < EXIT_BOUND_S
    assert not (out / INDEX).exists() and not list(out.rglob("*.tmp"))
    kept = manifest_files(out)
    assert 1 <= len(kept) < n_shards
    p = popen_cli(*args, "-o", out, "--json")
    so, se2 = p.communicate(timeout=600)
    assert p.returncode == 0, se2
    assert json.loads(so)["resumed"] is True
    assert outputs(out) == outputs(clean)


# ------------------------------------------------------------------------------------------------------------
# GGUF: the file in flight resumes from its last complete tensor
# ------------------------------------------------------------------------------------------------------------


def _gguf_args(src: Path) -> tuple:
    return ("gguf", str(src), "--type", "Q8_0")


def _partial(out: Path) -> dict:
    try:
        return json.loads(out.with_name(out.name + ".dsconvert-partial.json").read_text())
    except (OSError, ValueError):
        return {}


def _gguf_rerun(src: Path, out: Path) -> dict:
    p = popen_cli(*_gguf_args(src), "-o", out, "--json")
    so, se = p.communicate(timeout=600)
    assert p.returncode == 0, se
    return json.loads(so)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_sigint_keeps_partial_gguf_and_resumes_from_its_last_tensor(sig_src, tmp_path_factory):
    clean = clean_run(_gguf_args(sig_src), tmp_path_factory.mktemp("clean-gguf") / "m.gguf")
    size = clean.stat().st_size
    out = tmp_path_factory.mktemp("gguf-int") / "m.gguf"
    tmp = out.with_name(out.name + ".tmp")

    def third_written(o):
        return tmp.is_file() and tmp.stat().st_size > size // 3

    rc, se, exit_s, seen = interrupt(_gguf_args(sig_src), out, third_written, signal.SIGINT)
    assert seen, se
    assert rc == 130, se
    assert exit_s < EXIT_BOUND_S
    assert not out.exists()
    st = _partial(out)
    assert st["tensors"], "the partial file's complete tensors were not recorded"
    last_end = st["tensors"][-1]["end"]
    assert 0 < last_end < size and tmp.stat().st_size >= last_end
    assert [p.name for p in out.parent.glob("*.tmp")] == [tmp.name]  # the only .tmp, with its sidecar

    rep = _gguf_rerun(sig_src, out)
    assert rep["tensors_reused"] == {out.name: len(st["tensors"])}
    assert out.read_bytes() == clean.read_bytes()
    assert not list(out.parent.glob("*.tmp")) and not _partial(out)


_SMALL_CHECKPOINTS = """
import sys
from dsconvert.convert import gguf_export as ge
ge.CHECKPOINT_BYTES = 256 * 1024  # record a resume point often, so that a SIGKILL finds several
from dsconvert.cli import main
sys.argv = ["dsconvert"] + sys.argv[1:]
main()
"""


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_sigkill_mid_tensor_resumes_gguf_from_last_complete_tensor(sig_src, tmp_path_factory):
    clean = clean_run(_gguf_args(sig_src), tmp_path_factory.mktemp("clean-gguf") / "m.gguf")
    out = tmp_path_factory.mktemp("gguf-kill") / "m.gguf"
    tmp = out.with_name(out.name + ".tmp")

    def mid_tensor(o):
        st = _partial(o)
        if len(st.get("tensors", [])) >= 3 and tmp.is_file() and tmp.stat().st_size > st["tensors"][-1]["end"]:
            return st
        return None

    rc, se, _, seen = interrupt(_gguf_args(sig_src), out, mid_tensor, signal.SIGKILL, script=_SMALL_CHECKPOINTS)
    assert seen, se
    assert rc == -signal.SIGKILL
    assert not out.exists() and tmp.is_file()
    st = _partial(out)
    assert len(st["tensors"]) >= len(seen["tensors"])
    # damage the bytes after the last recorded tensor (a half-written tensor): they must not be trusted
    with open(tmp, "r+b") as f:
        f.seek(st["tensors"][-1]["end"])
        f.write(b"\xff" * 64)
    rep = _gguf_rerun(sig_src, out)
    assert rep["tensors_reused"] == {out.name: len(st["tensors"])}
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_corrupt_partial_gguf_tensor_is_rewritten(sig_src, tmp_path_factory):
    """A recorded tensor whose bytes changed on disk ends the kept prefix there."""
    clean = clean_run(_gguf_args(sig_src), tmp_path_factory.mktemp("clean-gguf") / "m.gguf")
    out = tmp_path_factory.mktemp("gguf-corrupt") / "m.gguf"
    tmp = out.with_name(out.name + ".tmp")
    rc, se, _, seen = interrupt(_gguf_args(sig_src), out, lambda o: tmp.is_file() and
                                tmp.stat().st_size > clean.stat().st_size // 2, signal.SIGTERM)
    assert rc == 143, se
    st = _partial(out)
    assert len(st["tensors"]) >= 4
    victim = st["tensors"][2]  # flip one byte inside the third tensor
    with open(tmp, "r+b") as f:
        f.seek(victim["end"] - 40)
        b = f.read(1)
        f.seek(victim["end"] - 40)
        f.write(bytes([b[0] ^ 0xFF]))
    rep = _gguf_rerun(sig_src, out)
    assert rep["tensors_reused"] == {out.name: 2}
    assert out.read_bytes() == clean.read_bytes()


# ------------------------------------------------------------------------------------------------------------
# progress when stderr is not a terminal; the 80-column bar
# ------------------------------------------------------------------------------------------------------------

LINE = re.compile(r"^(?P<label>[\w-]+): (?P<done>[\d.]+ [MG]B)/(?P<total>[\d.]+ [MG]B) \((?P<pct>[\d.]+)%\) "
                  r"(?P<rate>[\d.]+ [MG]B/s|- MB/s) eta (?P<eta>-:--:--|\d+:\d\d:\d\d)(?: \| (?P<item>.*))?$")


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_plain_progress_lines_when_stderr_is_a_pipe(sig_src, tmp_path):
    out = tmp_path / "out"
    p = popen_cli("fp8-to-bf16", sig_src, "-o", out)  # stderr is a pipe, not a terminal
    _, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    lines = [m for m in map(LINE.match, se.splitlines()) if m]
    shards = sorted(x.name for x in out.glob("*.safetensors"))
    assert {m["item"] for m in lines} >= set(shards) | {"done"}  # a line at each shard boundary
    assert all(m["label"] == "fp8-to-bf16" for m in lines)
    assert lines[-1]["item"] == "done" and float(lines[-1]["pct"]) == 100.0
    assert lines[-1]["done"] == lines[-1]["total"]
    assert "\r" not in se and "\x1b[" not in se  # no terminal control in a log


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_plain_progress_lines_for_gguf_name_layers(sig_src, tmp_path):
    out = tmp_path / "m.gguf"
    p = popen_cli("gguf", sig_src, "-o", out, "--type", "Q8_0")
    _, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    items = [m["item"] for m in map(LINE.match, se.splitlines()) if m]
    for layer in range(12):  # one line at each layer boundary at least
        assert any(f"({layer + 1}/12)" in it for it in items), layer


def test_progress_lines_every_interval_without_progress():
    """A long computation that advances nothing still prints a line every ``interval`` seconds."""
    from dsconvert.convert.progress import ByteProgress

    buf = io.StringIO()
    with ByteProgress(1000, "quantize", stream=buf, mode="lines", interval=0.2) as bar:
        bar.describe("layer (1/3)", boundary=False)
        time.sleep(1.5)
    lines = buf.getvalue().splitlines()
    assert sum("| layer (1/3)" in ln for ln in lines) >= 2, lines  # ticker lines; no boundary was printed
    assert lines[-1].endswith("| done")


def test_progress_line_numbers_with_a_fake_clock():
    from dsconvert.convert.progress import ByteProgress

    now = [100.0]
    buf = io.StringIO()
    bar = ByteProgress(4_000_000_000, "gguf", stream=buf, mode="lines", interval=10, clock=lambda: now[0])
    bar.skip(1_000_000_000)  # found done on a resume: not part of the speed
    now[0] += 5
    bar.advance(500_000_000)
    assert buf.getvalue() == ""  # 5 s: no line yet
    now[0] += 5
    bar.advance(500_000_000)  # 10 s: a line; 1 GB in 10 s = 100 MB/s, 2 GB left = 20 s
    line = buf.getvalue().strip()
    m = LINE.match(line)
    assert m, line
    assert m["done"] == "2.000 GB" and m["total"] == "4.000 GB" and m["pct"] == "50.0"
    assert m["rate"] == "100.0 MB/s" and m["eta"] == "0:00:20"


def test_bar_fits_80_columns_and_shortens_the_file_name_first():
    from rich.console import Console

    from dsconvert.convert.progress import ByteProgress

    name = "DeepSeek-R1-0528-BF16/model-00123-of-000163.safetensors: model.layers.60.mlp.experts.255.down_proj"
    bar = ByteProgress(1_373_000_000_000, "fp8-to-bf16", stream=io.StringIO(), mode="bar", width=80)
    bar.advance(687_000_000_000)
    bar.describe(name)
    con = Console(file=io.StringIO(), width=80, record=True, color_system=None)
    con.print(bar._p.make_tasks_table(bar._p.tasks))
    text = con.export_text().rstrip("\n")
    lines = text.splitlines()
    assert len(lines) == 1, text  # nothing wraps
    line = lines[0]
    assert len(line) <= 80
    assert "50%" in line and "0.7/1.4 TB" in line and "eta" in line
    assert name not in line and "…" in line  # the name gave way, shortened in the middle
    item = line[line.index("eta"):]
    assert item.rstrip().endswith("down_proj")  # both ends of it kept


def test_shorten_keeps_both_ends():
    from dsconvert.convert.progress import shorten

    s = "model-00123-of-000163.safetensors"
    assert shorten(s, 80) == s
    assert shorten(s, 15) == "model-0…tensors"
    assert shorten(s, 0) == "" and shorten(s, 1) == "…"


# ------------------------------------------------------------------------------------------------------------
# manifest order, atomic writes
# ------------------------------------------------------------------------------------------------------------


def test_manifest_does_not_depend_on_finishing_order(tmp_path):
    from dsconvert.convert.manifest import Manifest

    names = [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    a = Manifest("fp8-to-bf16", "f" * 64, {"mtp": "keep"})
    b = Manifest("fp8-to-bf16", "f" * 64, {"mtp": "keep"})
    for n in names:
        a.files[n] = {"size": 1, "sha256": n}
    for n in [names[3], names[0], names[4], names[2], names[1]]:
        b.files[n] = {"size": 1, "sha256": n}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    ja, jb = (tmp_path / "a" / MANIFEST).read_bytes(), (tmp_path / "b" / MANIFEST).read_bytes()
    assert ja == jb
    assert list(json.loads(ja)["files"]) == names


def test_every_write_then_rename_fsyncs(tmp_path, monkeypatch):
    """copy_files, write_atomic and the calibration state all fsync the file before renaming it."""
    import os

    from dsconvert.convert import calibrated, files, manifest

    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        try:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            events.append(("fsync", fd))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def fsynced_before_rename(tmp: Path) -> bool:
        i = events.index(("replace", str(tmp)))
        return ("fsync", str(tmp)) in events[:i]

    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    out.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "sub" / "x.txt").write_text("x" * 100_000)
    rows = files.copy_files(src, out, ["tokenizer.json", "sub/x.txt"])
    assert rows[1]["sha256"] == hashlib.sha256(b"x" * 100_000).hexdigest()
    assert (out / "sub" / "x.txt").read_text() == "x" * 100_000
    assert fsynced_before_rename(out / "tokenizer.json.tmp") and fsynced_before_rename(out / "sub" / "x.txt.tmp")

    manifest.write_atomic(out / "config.json", b"{}")
    assert fsynced_before_rename(out / "config.json.tmp")

    import torch

    class Engine:
        hidden_states = [torch.zeros(2, 4)]
        next_layer = 1

    run = calibrated.CalibratedRun.__new__(calibrated.CalibratedRun)
    run.out_dir, run.engine = out, Engine()
    run._save_state()
    assert fsynced_before_rename(out / (calibrated.STATE_NAME + ".tmp"))
    assert not list(out.rglob("*.tmp"))


def test_write_atomic_leaves_no_tmp_when_interrupted(tmp_path, monkeypatch):
    import os

    from dsconvert.convert import cancel, manifest

    def boom(fd):
        raise cancel.Cancelled(signal.SIGINT)

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(cancel.Cancelled):
        manifest.write_atomic(tmp_path / "manifest.json", b"{}")
    assert list(tmp_path.iterdir()) == []
