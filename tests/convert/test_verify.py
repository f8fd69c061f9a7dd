"""``dsconvert verify OUT`` and ``--verify size|full`` on reruns (issue 11 "Missing", issue 10 item 4).

The damage is done with independent tools (byte edits, ``safetensors.torch.save_file``, plain JSON edits), and
every expectation is the README's contract: exit 0 when the output matches its manifest, 3 otherwise, each problem
naming the file and the expected and found values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ..conftest import INDEX, run_cli


@pytest.fixture
def out_copy(tiny_out, tmp_path) -> Path:
    out, _ = tiny_out
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    return dst


def _flip_byte(p: Path, offset_from_end: int = 1) -> None:
    b = bytearray(p.read_bytes())
    b[-offset_from_end] ^= 0xFF
    p.write_bytes(bytes(b))


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _problems(r) -> list[dict]:
    return r.json()["problems"]


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_verify_ok_full_and_quick(tiny_out):
    out, _ = tiny_out
    r = run_cli("verify", out, "--json")
    assert r.rc == 0, str(r)
    rep = r.json()
    assert rep["ok"] and rep["problems"] == [] and rep["mode"] == "full"
    files = {p.name for p in out.iterdir()} - {"manifest.json", "report.json"}
    assert rep["files_checked"] == len(files)  # shards, index, config and every copied file
    assert rep["bytes_hashed"] == sum((out / f).stat().st_size for f in files)
    q = run_cli("verify", out, "--quick", "--json")
    assert q.rc == 0 and q.json()["bytes_hashed"] == 0, str(q)
    h = run_cli("verify", out)
    assert h.rc == 0 and "OK" in h.stdout, str(h)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_flipped_byte_caught_by_full_not_by_quick(out_copy):
    shard = _shards(out_copy)[1]
    _flip_byte(shard)
    r = run_cli("verify", out_copy, "--json")
    assert r.rc == 3, str(r)
    (p,) = _problems(r)
    assert p["file"] == shard.name and p["check"] == "sha256" and p["expected"] != p["found"]
    # --quick checks sizes, manifest and index only: the documented trade-off
    assert run_cli("verify", out_copy, "--quick").rc == 0
    h = run_cli("verify", out_copy)
    assert h.rc == 3 and shard.name in h.stderr and "FAILED" in h.stdout, str(h)


def test_truncated_shard_and_missing_config(out_copy):
    shard = _shards(out_copy)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    (out_copy / "config.json").unlink()
    r = run_cli("verify", out_copy, "--quick", "--json")
    assert r.rc == 3, str(r)
    got = {(p["file"], p["check"]) for p in _problems(r)}
    assert (shard.name, "size") in got and ("config.json", "missing") in got
    size = next(p for p in _problems(r) if p["check"] == "size")
    assert (size["expected"], size["found"]) == (len(data), len(data) - 100)


def test_index_pointing_at_the_wrong_shard(out_copy):
    idx = json.loads((out_copy / INDEX).read_text())
    name, shard = next(iter(sorted(idx["weight_map"].items())))
    other = next(s.name for s in _shards(out_copy) if s.name != shard)
    idx["weight_map"][name] = other
    (out_copy / INDEX).write_text(json.dumps(idx, indent=2))
    r = run_cli("verify", out_copy, "--quick", "--json")
    assert r.rc == 3, str(r)
    msgs = [p["message"] for p in _problems(r)]
    assert any(INDEX in p["file"] and p["check"] == "size" for p in _problems(r))  # the index itself changed
    assert any(name in m and other in m and "does not hold it" in m for m in msgs), msgs
    assert any(name in m and "omits" in m or name in m and f"maps it to {other}" in m for m in msgs), msgs


def test_tensor_with_another_shape_is_named(out_copy):
    """A shard rewritten by the safetensors library with one tensor's shape changed (same bytes): verify names the
    tensor with the recorded and found dtype/shape."""
    import torch
    from safetensors.torch import load_file, save_file

    shard = _shards(out_copy)[0]
    ts = load_file(str(shard))
    name = next(n for n, t in sorted(ts.items()) if t.dim() == 2 and t.shape[0] != t.shape[1])
    before = list(ts[name].shape)
    ts[name] = ts[name].reshape(before[1], before[0]).contiguous()
    save_file(ts, str(shard), metadata={"format": "pt"})
    r = run_cli("verify", out_copy, "--quick", "--json")
    assert r.rc == 3, str(r)
    (p,) = [p for p in _problems(r) if p["check"] == "tensor"]
    assert p["file"] == shard.name and name in p["message"]
    assert p["expected"].endswith(str(before)) and p["found"].endswith(str([before[1], before[0]]))
    assert torch.equal(ts[name].reshape(before), load_file(str(shard))[name].reshape(before))


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_no_manifest_or_incomplete(out_copy, tmp_path):
    man = json.loads((out_copy / "manifest.json").read_text())
    man["complete"] = False
    (out_copy / "manifest.json").write_text(json.dumps(man))
    r = run_cli("verify", out_copy, "--json")
    assert r.rc == 3 and _problems(r)[0]["check"] == "complete", str(r)
    (out_copy / "manifest.json").unlink()
    r = run_cli("verify", out_copy, "--json")
    assert r.rc == 3 and "manifest" in r.json()["message"], str(r)
    r = run_cli("verify", tmp_path / "nowhere")
    assert r.rc == 3 and "no such output" in r.stderr, str(r)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_gguf_output(tiny_src, tmp_path):
    f = tmp_path / "tiny-Q8_0.gguf"
    r = run_cli("gguf", tiny_src, "-o", f, "--type", "Q8_0", "-q")
    assert r.rc == 0, str(r)
    ok = run_cli("verify", f, "--json")
    assert ok.rc == 0 and ok.json()["bytes_hashed"] == f.stat().st_size, str(ok)
    _flip_byte(f)
    bad = run_cli("verify", f, "--json")
    assert bad.rc == 3 and [(p["file"], p["check"]) for p in _problems(bad)] == [(f.name, "sha256")], str(bad)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cut = run_cli("verify", f, "--quick", "--json")
    checks = {p["check"] for p in _problems(cut)}
    assert cut.rc == 3 and "size" in checks and checks & {"tensor", "header"}, str(cut)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_rerun_verify_modes(tiny_src, tmp_path):
    """A rerun of a finished output shows progress while it hashes (stderr is a pipe here: plain lines);
    ``--verify size`` trusts sizes (instant) and so keeps a same-size corrupted shard, ``full`` rewrites it."""
    out = tmp_path / "out"
    assert run_cli("fp8-to-bf16", tiny_src, "-o", out, "-q").rc == 0
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out)
    assert r.rc == 0 and "already complete" in r.stdout, str(r)
    assert "fp8-to-bf16: verifying:" in r.stderr and "safetensors" in r.stderr, r.stderr
    shard = _shards(out)[0]
    good = shard.read_bytes()
    _flip_byte(shard, 10)
    s = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--verify", "size", "--json")
    assert s.rc == 0 and s.json()["already_complete"] and "verifying" not in s.stderr, str(s)
    assert shard.read_bytes() != good
    f = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--verify", "full", "--json")
    assert f.rc == 0 and not f.json()["already_complete"] and f.json()["shards_written"] == 1, str(f)
    assert shard.read_bytes() == good
    assert run_cli("verify", out).rc == 0
    bad = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--verify", "sha", "--json")
    assert bad.rc == 2 and "--verify" in bad.json()["message"], str(bad)
