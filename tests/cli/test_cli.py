"""The CLI surface: ``--json`` reports, ``--dry-run``, JSON errors, ``inspect`` (tiny and the full 671B layout from
headers only), and golden ``--help`` texts.

Expected figures for the full layout come from the docs (docs/checkpoint-layout.md §1-2), not from
dsconvert. The headers-only fixture reproduces the release's tensor names, shapes and dtypes exactly, so tensor
counts, FP8 weight count, tensor bytes and the BF16 output size must match the release; it does not reproduce the
release's shard boundaries (it packs greedily into 162 shards of <= 4.3 GB, the release has 163, and no scale
lands in a different shard than its weight), so shard count and cross-shard pairs are not asserted against the
release.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ..conftest import INDEX, REPO, read_index, read_tensors, run_cli, run_many

GOLDEN = REPO / "tests" / "golden"
ST_DTYPE = {"float8_e4m3fn": "F8_E4M3", "bfloat16": "BF16", "float32": "F32"}


def only_json(stdout: str) -> dict:
    """stdout must be exactly one JSON document (plus whitespace)."""
    obj, end = json.JSONDecoder().raw_decode(stdout.lstrip())
    assert not stdout.lstrip()[end:].strip(), f"extra output after the JSON document: {stdout[end:][:200]!r}"
    return obj


# --- conversion reports ----------------------------------------------------------------------------------------

def test_json_report_is_one_document_with_required_keys(tiny_run, tiny_src):
    out, r = tiny_run
    rep = only_json(r.stdout)
    for k in ("source", "output", "plan", "seconds", "peak_rss", "version", "argv"):
        assert k in rep, k
    assert rep["argv"][1:] == ["fp8-to-bf16", str(tiny_src), "-o", str(out), "--json"]
    import dsconvert
    assert rep["version"] == dsconvert.__version__
    assert rep["output"]["path"] == str(out)
    assert rep["peak_rss"]["bytes"] > 0 and rep["seconds"] > 0
    got = read_tensors(out)
    assert rep["output"]["tensors"] == len(got)
    assert rep["output"]["total_size"] == sum(len(v[2]) for v in got.values())
    assert json.loads((out / "report.json").read_text())["output"] == rep["output"]


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_dry_run_writes_nothing_and_prints_plan(tiny_src, tmp_path):
    out = tmp_path / "never"
    jobs = {"human": ("fp8-to-bf16", tiny_src, "-o", out, "--dry-run"),
            "json": ("fp8-to-bf16", tiny_src, "-o", out, "--dry-run", "--json"),
            "no_out": ("fp8-to-bf16", tiny_src, "--dry-run", "--json")}
    res = run_many(jobs)
    assert not out.exists()
    for r in res.values():
        assert r.rc == 0, str(r)

    n_src_shards = len(set(read_index(tiny_src)["weight_map"].values()))
    human = res["human"].stdout
    assert "plan for" in human and "nothing written" in human
    assert f"output shards: {n_src_shards}" in human

    src_t = read_tensors(tiny_src)
    expected_written = sum(len(raw) * (2 if dt == "float8_e4m3fn" else 1)
                           for n, (dt, _, raw, _) in src_t.items() if not n.endswith("_scale_inv"))
    for key in ("json", "no_out"):
        rep = only_json(res[key].stdout)
        assert rep["dry_run"] is True
        for k in ("source", "plan", "version", "argv"):
            assert k in rep
        p = rep["plan"]
        for k in ("output_shards", "tensors", "dropped", "files_copied", "bytes_read", "bytes_written",
                  "peak_memory_estimate", "disk_needed"):
            assert k in p, k
        assert len(p["output_shards"]) == n_src_shards
        assert p["bytes_written"]["bytes"] == expected_written
        assert p["bytes_read"]["bytes"] == sum(len(v[2]) for v in src_t.values())
    assert not out.exists()


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_errors_in_json_mode_are_json_on_stdout(tiny_copy, tmp_path):
    # damage: one FP8 weight loses its scale (index entry too)
    idx = read_index(tiny_copy)
    name = next(n for n in sorted(idx["weight_map"]) if n.endswith("_scale_inv"))
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard = tiny_copy / idx["weight_map"].pop(name)
    with safe_open(str(shard), framework="pt") as h:
        ts = {k: h.get_tensor(k) for k in h.keys() if k != name}
    save_file(ts, str(shard), metadata={"format": "pt"})
    (tiny_copy / INDEX).write_text(json.dumps(idx))

    res = run_many({"bad": ("fp8-to-bf16", tiny_copy, "-o", tmp_path / "o", "--json"),
                    "usage": ("fp8-to-bf16", tiny_copy, "-o", tmp_path / "o2", "--dtype", "int3", "--json"),
                    "inspect": ("inspect", tiny_copy, "--json")})
    r = res["bad"]
    assert r.rc == 3, str(r)
    e = only_json(r.stdout)
    assert e["exit_code"] == 3 and e["error"] and name.removesuffix("_scale_inv") in e["message"]
    assert "Traceback" not in r.stderr
    r = res["usage"]
    assert r.rc == 2, str(r)
    assert only_json(r.stdout)["exit_code"] == 2
    # inspect lists the problem and exits 3, still one JSON document
    r = res["inspect"]
    assert r.rc == 3, str(r)
    rep = only_json(r.stdout)
    assert rep["ok"] is False and any(name.removesuffix("_scale_inv") in p["message"] for p in rep["problems"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


# --- inspect ---------------------------------------------------------------------------------------------------

def test_inspect_tiny(tiny_src, tiny_out):
    res = run_many({"json": ("inspect", tiny_src, "--json"), "human": ("inspect", tiny_src)})
    r = res["json"]
    assert r.rc == 0, str(r)
    rep = only_json(r.stdout)
    src_t = read_tensors(tiny_src)
    wm = read_index(tiny_src)["weight_map"]

    by_dtype: dict[str, int] = {}
    for dt, _, _, _ in src_t.values():
        by_dtype[ST_DTYPE[dt]] = by_dtype.get(ST_DTYPE[dt], 0) + 1
    assert rep["tensors"] == len(src_t)
    assert {k: v["tensors"] for k, v in rep["by_dtype"].items()} == by_dtype
    assert rep["bytes"]["bytes"] == sum(len(v[2]) for v in src_t.values())
    assert rep["shards"] == len(set(wm.values()))

    fp8 = [n for n, v in src_t.items() if v[0] == "float8_e4m3fn"]
    cross = [n for n in fp8 if wm[n] != wm[n + "_scale_inv"]]
    assert rep["fp8_pairs"] == {"weights": len(fp8), "with_scale": len(fp8), "scale_in_other_shard": len(cross)}
    assert len(cross) == 1

    # bytes read / written equal what the real conversion read and wrote
    out, _ = tiny_out
    out_t = read_tensors(out)
    plan = rep["fp8_to_bf16"]
    assert plan["bytes_read"]["bytes"] == sum(len(v[2]) for v in src_t.values())
    assert plan["bytes_written"]["bytes"] == sum(len(v[2]) for v in out_t.values())
    assert plan["bytes_written"]["bytes"] == read_index(out)["metadata"]["total_size"]
    assert plan["output_tensors"] == len(out_t)
    assert rep["ok"] is True and rep["problems"] == []

    r = res["human"]  # the human rendering
    assert r.rc == 0 and f"{len(src_t):,}" in r.stdout and "no problems found" in r.stdout, str(r)


# Figures of the real DeepSeek-V3/R1 release (docs/checkpoint-layout.md §1-2).
REAL = {"tensors": 91_991, "fp8": 45_808, "non_fp8": 375, "after_dequant": 46_183,
        "bytes": 688_574_839_360, "bf16_out": 1_368_979_721_216, "router_biases": 59}


@pytest.fixture(scope="module")
def full_layout(tmp_path_factory):
    from dsconvert.testing.fixtures import real_v3_spec, write_headers_only

    d = write_headers_only(tmp_path_factory.mktemp("v3_671b") / "src", real_v3_spec())
    res = run_many({"inspect": ("inspect", d, "--json"),
                    "dry": ("fp8-to-bf16", d, "-o", d.parent / "out", "--dry-run", "--json")}, parallel=2)
    return d, res


def test_full_layout_is_sparse(full_layout):
    d, _ = full_layout
    apparent = sum(p.stat().st_size for p in d.iterdir())
    used = sum(p.stat().st_blocks * 512 for p in d.iterdir())
    assert apparent > 600e9 and used < 200e6


def test_inspect_full_671b_layout_from_headers(full_layout):
    d, res = full_layout
    r = res["inspect"]
    assert r.rc == 0, str(r)
    rep = only_json(r.stdout)
    assert rep["tensors"] == REAL["tensors"]
    assert rep["by_dtype"]["F8_E4M3"]["tensors"] == REAL["fp8"]
    assert rep["fp8_pairs"]["weights"] == rep["fp8_pairs"]["with_scale"] == REAL["fp8"]
    assert rep["by_dtype"]["F32"]["tensors"] == REAL["fp8"] + REAL["router_biases"]
    assert rep["by_dtype"]["BF16"]["tensors"] + REAL["router_biases"] == REAL["non_fp8"]
    assert rep["bytes"]["bytes"] == REAL["bytes"]
    assert rep["fp8_to_bf16"]["bytes_read"]["bytes"] == REAL["bytes"]
    assert rep["fp8_to_bf16"]["bytes_written"]["bytes"] == REAL["bf16_out"]
    assert rep["fp8_to_bf16"]["output_tensors"] == REAL["after_dequant"]
    assert rep["layers"]["num_hidden_layers"] == 61 and rep["layers"]["mtp_layers"] == [61]
    # layer 61: 5 attention + 257 * 3 MoE linears (each + scale), 4 norms, router + bias, 6 MTP extras
    assert rep["layers"]["mtp_tensors"] == (5 + 257 * 3) * 2 + 4 + 2 + 6
    # the headers-only layout ships no tokenizer: a warning, not an error
    assert rep["ok"] is True and [p["kind"] for p in rep["problems"]] == ["tokenizer_missing"]


def test_dry_run_full_671b_layout(full_layout):
    d, res = full_layout
    r = res["dry"]
    assert r.rc == 0, str(r)
    rep = only_json(r.stdout)
    assert rep["plan"]["bytes_written"]["bytes"] == REAL["bf16_out"]
    assert rep["plan"]["bytes_read"]["bytes"] == REAL["bytes"]
    assert rep["plan"]["tensors"]["dequantized"] == REAL["fp8"]
    assert rep["source"]["tensors"] == REAL["tensors"]
    assert not (d.parent / "out").exists()


# --- golden --help ---------------------------------------------------------------------------------------------

def _help(*args) -> str:
    r = run_cli(*args, "--help")
    assert r.rc == 0, str(r)
    text = r.stdout.replace("python -m dsconvert.cli", "dsconvert")
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


@pytest.mark.parametrize("cmd,golden", [((), "help_top.txt"), (("fp8-to-bf16",), "help_fp8_to_bf16.txt")])
def test_help_matches_golden(cmd, golden):
    """Regenerate after an intended CLI change with DSCONVERT_UPDATE_GOLDEN=1 and commit the diff."""
    text = _help(*cmd)
    path = GOLDEN / golden
    if os.environ.get("DSCONVERT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing {path}; run with DSCONVERT_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"--help of {' '.join(cmd) or 'dsconvert'} changed"


def test_inspect_flags_bf16_directory_whose_config_still_claims_fp8(tiny_out, tmp_path, tiny_src):
    """docs/known-failures.md item 3: BF16 shards next to the untouched FP8 config.json ('Unknown quantization type')."""
    out, _ = tiny_out
    bad = tmp_path / "bf16-with-fp8-config"
    shutil.copytree(out, bad)
    shutil.copy(tiny_src / "config.json", bad / "config.json")
    r = run_cli("inspect", str(bad), "--json")
    rep = r.json()
    kinds = [p["kind"] for p in rep["problems"]]
    assert "stale_quantization_config" in kinds, rep["problems"]
    assert rep["format"] == "unquantized"
