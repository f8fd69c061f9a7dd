"""Pre-flight refusals that must come before anything is written (issue: the CLI contract).

* ``--report PATH`` that cannot be written is refused up front (exit 2), not after the whole job with a traceback;
* an output that does not fit on its disk is refused (exit 1, an I/O condition) before ``OUT/manifest.json`` or any
  shard exists, also under ``--dry-run``, with the shortfall in a unit that shows it;
* an output location that cannot be written is refused (exit 2).

The disk-full case runs the real CLI in-process with ``shutil.disk_usage`` replaced, so the refusal path is the
one a user meets; the others run the CLI as a subprocess.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple

import pytest
from typer.testing import CliRunner

from dsconvert.units import fmt_bytes

from ..conftest import run_cli


@pytest.mark.parametrize("cmd", [["fp8-to-bf16"], ["quantize", "--scheme", "W8A16", "--group-size", "32"]])
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_unwritable_report_path_is_refused_before_work(tiny_src, tmp_path, cmd):
    out = tmp_path / "out"
    for report, why in ((tmp_path, "is a directory"), (tmp_path / "missing" / "r.json", "does not exist")):
        r = run_cli(cmd[0], str(tiny_src), "-o", str(out), *cmd[1:], "--report", str(report), "--json")
        assert r.rc == 2, r
        assert why in r.stderr and "--report" in r.stderr
        assert json.loads(r.stdout)["exit_code"] == 2
        assert not out.exists(), "nothing may be written before the refusal"


def test_report_is_written_where_asked(tiny_src, tmp_path):
    rep = tmp_path / "r.json"
    r = run_cli("fp8-to-bf16", str(tiny_src), "--dry-run", "--report", str(rep), "--json")
    assert r.rc == 0, r
    assert json.loads(rep.read_text()) == json.loads(r.stdout)


def test_output_below_a_file_is_refused(tiny_src, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = run_cli("fp8-to-bf16", str(tiny_src), "-o", str(f / "out"))
    assert r.rc == 2, r
    assert "is a file" in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_parent_is_refused(tiny_src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = run_cli("fp8-to-bf16", str(tiny_src), "-o", str(ro / "out"))
        assert r.rc == 2 and "not writable" in r.stderr
    finally:
        ro.chmod(0o700)


_Usage = namedtuple("_Usage", "total used free")


@pytest.mark.parametrize("args", [
    ["fp8-to-bf16"],
    ["quantize", "--scheme", "W8A16", "--group-size", "32"],
    ["gguf", "--type", "Q8_0"],
])
def test_disk_shortfall_is_refused_before_anything_is_written(tiny_src, tmp_path, monkeypatch, args):
    from dsconvert import cli
    from dsconvert.convert import preflight

    free = 4000  # bytes: far below any output, and small enough that "0.00 GB" would hide it
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: _Usage(10**12, 10**12 - free, free))
    out = tmp_path / ("out.gguf" if args[0] == "gguf" else "out")
    r = CliRunner().invoke(cli.app, [args[0], str(tiny_src), "-o", str(out), *args[1:], "--json"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "short by" in doc["message"], doc
    assert "4.0 kB available" in doc["message"]
    assert not out.exists() and not list(tmp_path.glob("*manifest*")), "refused before writing anything"


def test_dry_run_reports_a_disk_shortfall(tiny_src, tmp_path, monkeypatch):
    """``--dry-run`` measures the disk too, and reports the shortfall (exit 0: it is a plan, not a refusal)."""
    from dsconvert import cli
    from dsconvert.convert import preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: _Usage(10**12, 10**12 - 4000, 4000))
    r = CliRunner().invoke(cli.app, ["fp8-to-bf16", str(tiny_src), "-o", str(tmp_path / "out"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["disk"]["fits"] is False and doc["disk"]["free"] == 4000
    assert doc["disk"]["needed"] == doc["plan"]["bytes_written"]["bytes"] or doc["disk"]["needed"] > 4000
    assert any("short by" in w for w in doc["warnings"])
    assert not (tmp_path / "out").exists()


def test_fmt_bytes_shows_small_shortfalls():
    assert fmt_bytes(4_000_000) == "4.00 MB (3.81 MiB)"
    assert fmt_bytes(4000) == "4.0 kB"
    assert fmt_bytes(12) == "12 B"


def test_closed_pipe_exits_quietly(tiny_src):
    """``dsconvert inspect SRC | head -1``: no traceback, no 'I/O error', exit 141 (128 + SIGPIPE)."""
    import subprocess

    from ..conftest import cli_cmd, cli_env, REPO

    p = subprocess.Popen(cli_cmd("inspect", tiny_src), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()  # the reader leaves after one byte
    err = p.stderr.read().decode()
    p.wait(60)
    assert p.returncode in (0, 141), (p.returncode, err)  # 0 if everything fit in the pipe buffer first
    assert "Traceback" not in err and "error" not in err.lower(), err
