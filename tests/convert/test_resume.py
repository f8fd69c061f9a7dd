"""Crash safety and resume of ``fp8-to-bf16``: SIGKILL at several points, rerun, and get a byte-identical output.

The fixture is the tiny layout scaled up (6 shards, 6 layers, 16 experts) so one conversion takes a few seconds
and can be killed mid-way. "Byte-identical" compares every file of OUT except ``report.json`` (which records
timings and whether the run resumed) with a clean, uninterrupted run; the resume manifest is compared as JSON.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from ..conftest import manifest_files, INDEX, guard_source, popen_cli, run_many, tree_hashes

MANIFEST = "manifest.json"


def outputs(out: Path) -> dict:
    """sha256 of every file except report.json; the resume manifest compared as JSON (its entries are recorded in
    completion order, which a resumed run may change)."""
    h = tree_hashes(out)
    h.pop("report.json", None)
    h[MANIFEST] = json.loads((out / MANIFEST).read_text())
    return h


@pytest.fixture(scope="module")
def resume_src(tmp_path_factory):
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path_factory.mktemp("resume") / "src", "tiny", num_shards=6, num_hidden_layers=6,
                           n_routed_experts=16, hidden_size=512, moe_intermediate_size=192, vocab_size=1024)
    guard_source(src)
    return src


@pytest.fixture(scope="module")
def clean(resume_src):
    out = resume_src.parent / "clean"
    p = popen_cli("fp8-to-bf16", resume_src, "-o", out, "-q")
    _, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    return out, outputs(out)


def run_until(src: Path, out: Path, cond, what: str, timeout: float = 120) -> None:
    """Start a conversion, SIGKILL it as soon as ``cond(out)`` holds; fail if it finished first."""
    p = popen_cli("fp8-to-bf16", src, "-o", out, "-q")
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < timeout:
            if cond(out):
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.003)
    finally:
        _, se = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run was not killed at '{what}' (rc {p.returncode}): {se}"
    assert not (out / INDEX).exists(), f"index written although killed at '{what}'"


def _tmp_shard(out: Path) -> bool:
    return any(out.glob("model-*.safetensors.tmp"))


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_kill_and_resume_is_byte_identical(resume_src, clean, tmp_path):
    clean_out, clean_h = clean
    n_shards = sum(1 for k in clean_h if k.endswith(".safetensors"))
    assert n_shards == 6
    out = tmp_path / "out"

    # 1. killed while writing the first shard
    run_until(resume_src, out, _tmp_shard, "first .tmp shard")
    assert not manifest_files(out)
    # 2. resumed, killed once two shards are recorded
    run_until(resume_src, out, lambda o: len(manifest_files(o)) >= 2, "two shards done")
    # 3. resumed, killed in the middle of a later shard
    run_until(resume_src, out, lambda o: len(manifest_files(o)) >= 4 and _tmp_shard(o), "fifth shard in flight")
    done_before = set(manifest_files(out))
    assert len(done_before) >= 4
    # a stray temp file from some other crash
    stray = out / "model-00006-of-000006.safetensors.tmp"
    stray.write_bytes(b"half a shard")

    # 4. resumed to the end
    p = popen_cli("fp8-to-bf16", resume_src, "-o", out, "--json")
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    rep = json.loads(so)
    assert rep["resumed"] is True and rep["already_complete"] is False
    assert rep["shards_reused"] == len(done_before) and rep["shards_written"] == n_shards - len(done_before)

    assert not list(out.rglob("*.tmp"))
    assert outputs(out) == clean_h


@pytest.fixture(scope="module")
def repair_runs(resume_src, clean, tmp_path_factory):
    """Three damaged copies of the clean output, rerun concurrently."""
    clean_out, _ = clean
    base = tmp_path_factory.mktemp("repair")
    dirs = {}
    for case in ("manifest_lost_last", "corrupt_shard", "complete_noop"):
        dirs[case] = base / case
        shutil.copytree(clean_out, dirs[case])

    # crash between a shard's rename and its manifest entry: the last entry never got recorded
    m = json.loads((dirs["manifest_lost_last"] / MANIFEST).read_text())
    last = list(m["files"])[-1]
    del m["files"][last]
    m["complete"] = False
    (dirs["manifest_lost_last"] / MANIFEST).write_text(json.dumps(m, indent=2))
    (dirs["manifest_lost_last"] / INDEX).unlink()
    (dirs["manifest_lost_last"] / "model-00002-of-000006.safetensors.tmp").write_bytes(b"junk")

    # a finished shard damaged on disk (same size, one byte flipped): the manifest hash no longer matches
    victim = sorted(dirs["corrupt_shard"].glob("*.safetensors"))[2]
    raw = bytearray(victim.read_bytes())
    raw[-7] ^= 0xFF
    victim.write_bytes(bytes(raw))

    mtimes = {p.name: p.stat().st_mtime_ns for p in dirs["complete_noop"].iterdir()}
    res = run_many({c: ("fp8-to-bf16", resume_src, "-o", d, "--json") for c, d in dirs.items()}, parallel=3)
    return dirs, res, last, victim.name, mtimes


def test_crash_between_rename_and_manifest_update(repair_runs, clean):
    dirs, res, last, _, _ = repair_runs
    r = res["manifest_lost_last"]
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["resumed"] is True and rep["shards_written"] == 1
    out = dirs["manifest_lost_last"]
    assert last in manifest_files(out)
    assert not list(out.rglob("*.tmp"))
    assert outputs(out) == clean[1]


def test_corrupted_finished_shard_is_rewritten(repair_runs, clean):
    dirs, res, _, victim, _ = repair_runs
    r = res["corrupt_shard"]
    assert r.rc == 0, str(r)
    assert r.json()["shards_written"] == 1
    assert outputs(dirs["corrupt_shard"]) == clean[1]


def test_complete_output_rerun_is_a_noop(repair_runs, clean):
    dirs, res, _, _, mtimes = repair_runs
    r = res["complete_noop"]
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["already_complete"] is True and rep["shards_written"] == 0
    out = dirs["complete_noop"]
    assert outputs(out) == clean[1]
    for p in out.glob("*.safetensors"):
        assert p.stat().st_mtime_ns == mtimes[p.name], f"{p.name} was rewritten"
