"""How SRC paths are resolved and refused: a Hugging Face cache repo folder resolves through ``refs/main``; a
missing path, a file, and an un-downloaded hub id get errors that say which and what to do (exit 3)."""

from __future__ import annotations

import json
import shutil

import pytest

from ..conftest import run_cli


def _hub_cache(tmp_path, src):
    """The layout huggingface_hub writes: blobs/, snapshots/<rev>/ of symlinks, refs/main naming <rev>."""
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-V3-tiny"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            blob = repo / "blobs" / f.name
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_hub_cache_repo_folder_resolves_through_refs_main(tiny_src, tmp_path):
    repo = _hub_cache(tmp_path, tiny_src)
    r = run_cli("inspect", repo, "--json")
    assert r.rc == 0, r
    assert r.json()["ok"] is True
    r = run_cli("fp8-to-bf16", repo, "--dry-run", "--json")
    assert r.rc == 0, r


@pytest.mark.parametrize("cmd", [("inspect",), ("fp8-to-bf16", "--dry-run"), ("validate", "--reference", "{ok}")])
def test_hub_id_that_was_not_downloaded(cmd, tiny_src):
    args = [str(tiny_src) if a == "{ok}" else a for a in cmd[1:]]
    r = run_cli(cmd[0], "deepseek-ai/DeepSeek-R1", *args, "--json")
    assert r.rc == 3, r
    doc = r.json()
    assert "Hugging Face repo id" in doc["message"] and "hf download deepseek-ai/DeepSeek-R1" in doc["hint"]
    assert "SRC" not in doc["message"] + doc["hint"]


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_missing_path_and_file_say_which(tmp_path):
    r = run_cli("inspect", tmp_path / "nope", "--json")
    assert r.rc == 3 and "no such checkpoint directory" in r.json()["message"]
    f = tmp_path / "config.json"
    f.write_text(json.dumps({}))
    r = run_cli("inspect", f, "--json")
    assert r.rc == 3 and "is a file" in r.json()["message"]
