"""``dsconvert quantize --awq`` / ``--gptq`` end to end through the CLI (issue 5).

What is proven here, against independent references:
* both methods write every policy-quantized module of every layer in each output layout, and the output reads
  back through the same decoders ``validate`` uses and through compressed-tensors' own decompressor;
* quality: on held-out tokens (a text the calibration never saw), the Mean KLD against the FP8 source, measured by
  ``validate``, is lower for GPTQ and AWQ than for RTN at the same scheme and group size;
* AWQ folding writes changed norms and router weights (the float model they define is the source's, checked
  through the reference forward with the quantized linears replaced by the folded float weights in
  tests/quant/test_gptq_awq.py); here: the router weight differs from the source and no other kept tensor does;
* a run killed mid-way resumes to byte-identical files, from the saved per-layer calibration state;
* experts that receive no calibration tokens get the stated policy and are reported, never crash.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsconvert.testing.fixtures import build_checkpoint

from ..conftest import kill_after_shards, popen_cli, read_tensors, run_cli

HELD_OUT = ("A lighthouse keeper counts the ships that pass each night and writes their names in a ledger. "
            "When fog rolls in from the cold sea she lights the lamp early and listens for horns. " * 6)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("calib") / "fx", "tiny")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("heldout") / "held_out.txt"
    p.write_text(HELD_OUT)
    return p


def _quantize(src: Path, out: Path, *args) -> dict:
    r = run_cli("quantize", str(src), "-o", str(out), "--group-size", "32", "--json", "-q", "--num-samples", "4",
                "--seq-len", "96", *args, timeout=600)
    assert r.rc == 0, r
    return r.json()


def _kld(cand: Path, src: Path, prompts: Path) -> float:
    r = run_cli("validate", str(cand), "--reference", str(src), "--prompts", str(prompts), "--json", "-q",
                "--max-kld", "100", "--min-top1", "0", "--seq-len", "64", "--num-samples", "3")
    assert r.rc == 0, r
    return r.json()["mean_kld"]


@pytest.mark.slow
def test_awq_and_gptq_beat_rtn_on_held_out_text(src, held_out, tmp_path):
    klds = {}
    for method, fmt in (("rtn", "compressed-tensors"), ("awq", "awq"), ("gptq", "gptq")):
        out = tmp_path / method
        rep = _quantize(src, out, "--format", fmt, "--method", method)
        assert rep["plan"]["quantized_modules"] == 104
        if method != "rtn":
            cal = rep["calibration"]
            assert cal["method"] == method and cal["layers_calibrated"] == 3
            assert cal["mtp_modules_rtn"] > 0  # the MTP block is not part of the forward: RTN, and reported
        klds[method] = _kld(out, src, held_out)
    assert klds["gptq"] < klds["rtn"], klds
    assert klds["awq"] < klds["rtn"], klds


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_awq_folds_router_and_norms_only(src, tmp_path):
    out = tmp_path / "awq"
    _quantize(src, out, "--awq", "--format", "compressed-tensors")
    a, b = read_tensors(src), read_tensors(out)
    changed = sorted(n for n in b if n in a and a[n][2] != b[n][2])
    # AWQ rewrites the norms feeding smoothed linears and compensates the routers; no other kept tensor changes.
    assert changed, "AWQ folded nothing"
    allowed = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_a_layernorm.weight",
               "kv_a_layernorm.weight", "mlp.gate.weight")
    assert all(n.endswith(allowed) for n in changed), changed
    assert any(n.endswith("mlp.gate.weight") for n in changed)
    assert not any(".layers.3." in n for n in changed)  # the MTP block is not calibrated
    assert not (out / "calibration-state.safetensors").exists()  # removed once complete


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_gptq_output_reads_back_with_compressed_tensors(src, tmp_path):
    from ..formats.test_int_formats import assert_library_reads_modules

    out = tmp_path / "gptq-ct"
    _quantize(src, out, "--gptq", "--format", "compressed-tensors")
    assert_library_reads_modules(out, ("model.layers.1.mlp.experts.5.down_proj", "model.layers.0.self_attn.kv_b_proj"))

@pytest.mark.slow
def test_gptq_resume_after_kill_is_byte_identical(tmp_path):
    # several layers, one per shard, so a kill lands between shards and the per-layer state is used
    src = build_checkpoint(tmp_path / "fx", "tiny", num_hidden_layers=5, num_shards=4)
    clean = tmp_path / "clean"
    _quantize(src, clean, "--gptq", "--max-shard-size", "300K")
    n_shards = len(list(clean.glob("model-*.safetensors")))
    assert n_shards >= 3
    out = tmp_path / "killed"
    p = popen_cli("quantize", str(src), "-o", str(out), "--group-size", "32", "-q", "--num-samples", "4",
                  "--seq-len", "96", "--gptq", "--max-shard-size", "300K")
    kill_after_shards(p, out, n_shards)
    rep = _quantize(src, out, "--gptq", "--max-shard-size", "300K")
    assert rep["resumed"]
    for f in sorted(clean.glob("model-*.safetensors")) + [clean / "config.json", clean / "model.safetensors.index.json"]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_experts_without_tokens_get_the_stated_policy(tmp_path):
    # a router bias that sends every token to expert 0 (and its group): most experts see no token
    src = build_checkpoint(tmp_path / "fx", "tiny", num_experts_per_tok=1, n_group=1, topk_group=1,
                           extra_config={"n_group": 1, "topk_group": 1})
    from safetensors.torch import load_file, save_file

    idx = json.loads((src / "model.safetensors.index.json").read_text())
    for name, shard in idx["weight_map"].items():
        if name.endswith("e_score_correction_bias"):
            t = load_file(str(src / shard))
            bias = torch.full_like(t[name], -50.0)
            bias[0] = 50.0
            t[name] = bias
            save_file(t, str(src / shard), metadata={"format": "pt"})
    rep = _quantize(src, tmp_path / "out", "--gptq")
    layers = rep["calibration"]["layers"]
    experts = layers[1]["experts"]
    assert int(experts["0"]["tokens_routed"] if "0" in experts else experts[0]["tokens_routed"]) > 0
    policies = {str(k): v["policy"] for k, v in experts.items()}
    assert set(policies.values()) <= {"routed", "all-tokens", "rtn"}
    assert sum(1 for v in policies.values() if v != "routed") >= 6, policies
    # nothing zeroed: every written expert weight reads back non-zero
    from dsconvert.convert.weights import CheckpointWeightSource

    s = CheckpointWeightSource(tmp_path / "out")
    for e in range(8):
        assert s.get(f"model.layers.1.mlp.experts.{e}.down_proj.weight").abs().sum() > 0


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_calibrated_dry_run_estimates_activations_and_max_memory_refuses(src, tmp_path):
    """--dry-run of a calibrated run counts the calibration activations (more tokens, more memory; above the RTN
    plan); --max-memory below that estimate shrinks the expert group to fit, and below the smallest plan
    exits 2 before anything is written."""
    from dsconvert.convert.calibrate import estimate_peak_bytes
    from dsconvert.model.config import ModelConfig

    def peak(*args) -> int:
        r = run_cli("quantize", str(src), "--dry-run", "--json", "-q", "--group-size", "32", *args)
        assert r.rc == 0, r
        return r.json()["plan"]["peak_memory_estimate"]["bytes"]

    rtn = peak()
    small = peak("--gptq", "--num-samples", "2", "--seq-len", "64")
    big = peak("--gptq", "--num-samples", "8", "--seq-len", "128")
    cfg = ModelConfig.from_hf(json.loads((src / "config.json").read_text()))
    # the growth is the activation terms of the engine's estimate, 2 x 64 -> 8 x 128 tokens
    assert big - small == estimate_peak_bytes(cfg, "gptq", 1024) - estimate_peak_bytes(cfg, "gptq", 128) > 0
    assert small > rtn - 1
    # a cap below the default plan: fewer experts in flight, and the plan fits the cap
    capped = peak("--gptq", "--num-samples", "8", "--seq-len", "128", "--max-memory", str(big - 2**20))
    assert capped <= big - 2**20
    # a cap below even one expert in flight: refused before anything is written
    out = tmp_path / "o"
    r = run_cli("quantize", str(src), "-o", str(out), "--gptq", "--group-size", "32", "--num-samples", "8", "--seq-len", "128",
                "--max-memory", str(rtn), "-q")
    assert r.rc == 2, r
    assert "max-memory" in r.stderr and not out.exists()
