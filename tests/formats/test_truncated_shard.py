"""A truncated (or unreadable) shard gives one clear error naming it, and no shard is dropped from the counts
(issue 11, "Confusing"): the scale of a weight in another shard that lives in the damaged shard must not produce a
second, misleading "no weight_scale_inv partner anywhere" error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from ..conftest import read_index, run_cli

SCALE = "_scale_inv"


def _cross_shard_scale(src: Path) -> tuple[str, str]:
    """(shard holding a scale whose weight is in another shard, that scale's name), from the index alone."""
    wm = read_index(src)["weight_map"]
    for name, shard in sorted(wm.items()):
        if name.endswith(SCALE) and wm.get(name[: -len(SCALE)]) not in (None, shard):
            return shard, name
    raise AssertionError("the fixture has a scale in another shard")


def _cut(p: Path, keep: int) -> None:
    p.write_bytes(p.read_bytes()[:keep])


@pytest.fixture
def damaged(tiny_copy):
    shard, scale = _cross_shard_scale(tiny_copy)
    with safe_open(str(tiny_copy / shard), framework="pt") as h:
        assert scale in h.keys()
    return tiny_copy, shard, scale


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_truncated_shard_one_error_and_counts_kept(damaged, tmp_path):
    src, shard, scale = damaged
    raw = (src / shard).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    _cut(src / shard, 8 + n + 16)  # header intact, data cut short
    r = run_cli("fp8-to-bf16", src, "-o", tmp_path / "out")
    assert r.rc == 3, str(r)
    assert r.stderr.count("error:") == 1 and shard in r.stderr and "truncated" in r.stderr, str(r)
    assert "partner" not in r.stderr and "more problems" not in r.stderr, str(r)
    assert not (tmp_path / "out" / "manifest.json").exists()

    i = run_cli("inspect", src, "--json")
    assert i.rc == 3, str(i)
    rep = i.json()
    assert rep["tensors"] == len(read_index(src)["weight_map"])  # the truncated shard's tensors are counted
    fatal = [p for p in rep["problems"] if p.get("fatal", True)]
    assert [(p["kind"], p["file"]) for p in fatal] == [("truncated_shard", shard)], fatal


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_unreadable_header_one_error_and_counted_from_index(damaged):
    src, shard, _ = damaged
    p = src / shard
    raw = bytearray(p.read_bytes())
    raw[8:16] = b"{{{{{{{{"  # the JSON header no longer parses
    p.write_bytes(bytes(raw))
    i = run_cli("inspect", src, "--json")
    assert i.rc == 3, str(i)
    rep = i.json()
    fatal = [q for q in rep["problems"] if q.get("fatal", True)]
    assert [(q["kind"], q["file"]) for q in fatal] == [("bad_shard", shard)], fatal
    wm = read_index(src)["weight_map"]
    assert rep["tensors_unreadable"] == sum(1 for s in wm.values() if s == shard)
    assert rep["tensors"] + rep["tensors_unreadable"] == len(wm)
    h = run_cli("inspect", src)
    assert "in unreadable shards" in h.stdout, str(h)
