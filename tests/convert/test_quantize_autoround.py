"""``dsconvert quantize --method autoround`` (SignRound, issue 12) end to end through the CLI.

Proven here against independent references: on the trained tiny DeepSeek-V3 the held-out Mean KLD measured by
``validate`` is below RTN's (bench/bench_quality.py measured it; README, Quality); the output reads back through
compressed-tensors' own decompressor; zero iterations write RTN's bytes; a killed run resumes to byte-identical
files; what autoround does not handle is refused with exit 2 before anything is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsconvert.testing.fixtures import build_checkpoint

from ..conftest import kill_after_shards, popen_cli, run_cli

#: W4A16 g64, held-out default windows, calibration seed 0 (bench/bench_quality.py, this CPU); RTN 5.894e-3
MEASURED_G64 = (3.333e-3, 0.9494)
MARGIN = 1.30  # the calibrated methods' margin (tests/convert/test_quality.py)
RTN_G64 = 5.894e-3


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ar") / "fx", "tiny")


def _quantize(src: Path, out: Path, *args, rc: int = 0):
    r = run_cli("quantize", str(src), "-o", str(out), "--group-size", "32", "--json", "-q", "--num-samples", "4",
                "--seq-len", "64", "--method", "autoround", *args, timeout=600)
    assert r.rc == rc, r
    return r


@pytest.mark.slow
def test_autoround_beats_rtn_on_held_out_text(trained_src, tmp_path):
    out = tmp_path / "o"
    r = run_cli("quantize", trained_src, "-o", out, "--scheme", "W4A16", "--group-size", "64", "--method",
                "autoround", "--json", "-q", timeout=900)
    assert r.rc == 0, r
    rep = r.json()
    assert rep["calibration"]["method"] == "autoround"
    assert [st["autoround"]["iters"] for st in rep["calibration"]["layers"]] == [200, 200, 200]
    v = run_cli("validate", out, "--reference", trained_src, "--max-kld", "1", "--min-top1", "0", "--json",
                timeout=600)
    assert v.rc == 0, v
    m = v.json()
    kld, top1 = MEASURED_G64
    assert math.isfinite(m["mean_kld"]) and m["mean_kld"] <= min(kld * MARGIN, RTN_G64), m["mean_kld"]
    assert m["same_top_p"] >= top1 - 0.01, m["same_top_p"]


@pytest.mark.slow
def test_autoround_output_reads_back_with_compressed_tensors_and_zero_iters_is_rtn(src, tmp_path):
    from ..formats.test_int_formats import assert_library_reads_modules

    out = tmp_path / "ar"
    rep = _quantize(src, out, "--iters", "3").json()
    assert rep["calibration"]["method"] == "autoround"
    assert_library_reads_modules(out, ("model.layers.1.mlp.experts.5.down_proj", "model.layers.0.self_attn.kv_b_proj"))
    # zero iterations: RTN's tensors byte for byte (the layer stream changes nothing without learning)
    zero, rtn = tmp_path / "zero", tmp_path / "rtn"
    _quantize(src, zero, "--iters", "0")
    r = run_cli("quantize", str(src), "-o", str(rtn), "--group-size", "32", "-q")
    assert r.rc == 0, r
    for f in sorted(rtn.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as a, safe_open(str(zero / f.name), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.slow
def test_autoround_resume_after_kill_is_byte_identical(tmp_path):
    src = build_checkpoint(tmp_path / "fx", "tiny", num_hidden_layers=5, num_shards=4)
    clean = tmp_path / "clean"
    _quantize(src, clean, "--iters", "20", "--max-shard-size", "300K")
    n_shards = len(list(clean.glob("model-*.safetensors")))
    assert n_shards >= 3
    out = tmp_path / "killed"
    p = popen_cli("quantize", str(src), "-o", str(out), "--group-size", "32", "-q", "--num-samples", "4",
                  "--seq-len", "64", "--method", "autoround", "--iters", "20", "--max-shard-size", "300K")
    kill_after_shards(p, out, n_shards)
    rep = _quantize(src, out, "--iters", "20", "--max-shard-size", "300K").json()
    assert rep["resumed"]
    for f in sorted(clean.glob("model-*.safetensors")) + [clean / "config.json", clean / "model.safetensors.index.json"]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (("--scheme", "W8A8"), "cannot be produced with --method autoround"),
    (("--scheme", "FP8_BLOCK"), "cannot be produced with --method autoround"),
    (("--lr", "0"), "--lr > 0"),
])
def test_autoround_refusals_exit_2_before_writing(src, tmp_path, args, words):
    out = tmp_path / "o"
    r = _quantize(src, out, *args, rc=2)
    assert words in r.stderr, r
    assert not out.exists()


@pytest.mark.slow
def test_autoround_refuses_v4(v4_src, tmp_path):
    out = tmp_path / "o"
    r = run_cli("quantize", str(v4_src), "-o", str(out), "--method", "autoround", "-q")
    assert r.rc == 2 and "DeepSeek-V4" in r.stderr, r
    assert not out.exists()


@pytest.mark.slow
def test_autoround_dry_run_counts_its_working_set(src):
    """--dry-run adds the SignRound estimate (convert/calib_signround.py) to the plan: above RTN's, growing
    with the calibration tokens by the estimate's own difference."""
    from dsconvert.convert.calib_signround import estimate_signround_bytes
    from dsconvert.model.config import ModelConfig

    def peak(*args) -> int:
        r = run_cli("quantize", str(src), "--dry-run", "--json", "-q", "--group-size", "32", *args)
        assert r.rc == 0, r
        return r.json()["plan"]["peak_memory_estimate"]["bytes"]

    rtn = peak()
    small = peak("--method", "autoround", "--num-samples", "2", "--seq-len", "64")
    big = peak("--method", "autoround", "--num-samples", "8", "--seq-len", "128")
    cfg = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    g = min(cfg.n_routed_experts, 32)
    assert big - small == (estimate_signround_bytes(cfg, 1024, expert_group=g, batch_tokens=1024, seq_len=128)
                           - estimate_signround_bytes(cfg, 128, expert_group=g, batch_tokens=128, seq_len=64)) > 0
    assert small > rtn
