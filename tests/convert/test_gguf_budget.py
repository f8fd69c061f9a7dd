"""``dsconvert gguf --target-size``: per-tensor types chosen for a byte budget from measured sensitivities.

Oracles: the allocator against exhaustive search on small random instances; the weight-error measure against a
direct numpy sum (the forward measurement: tests/convert/test_gguf_sensitivity.py); the quality claim on the trained tiny DeepSeek-V3 (tests/data), measured on held-out text (validate's
default validation set, never the calibration text), through our reference forward on the written GGUF.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dsconvert.cli import app
from dsconvert.convert import gguf_export as ge
from dsconvert.quant.bit_alloc import Choice, allocate, weighted_rel_error


def cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    res.text = " ".join(res.output.split())
    return res


def _instance(g: np.random.Generator, n: int, k: int) -> dict[str, list[Choice]]:
    out = {}
    for i in range(n):
        sizes = np.cumsum(g.integers(1, 50, k))
        errs = np.sort(g.random(k))[::-1] * g.uniform(0.1, 10)  # decreasing, not necessarily convex
        out[f"t{i}"] = [Choice(f"q{j}", int(s), float(e)) for j, (s, e) in enumerate(zip(sizes, errs))]
    return out


def _brute(opts: dict[str, list[Choice]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*opts.values()):
        if sum(c.nbytes for c in combo) <= budget:
            best = min(best, sum(c.rel_error for c in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_fits_and_is_near_the_exhaustive_optimum(seed):
    g = np.random.default_rng(seed)
    opts = _instance(g, 4, 4)
    lo = sum(c[0].nbytes for c in opts.values())
    hi = sum(c[-1].nbytes for c in opts.values())
    max_step = max(b.nbytes - a.nbytes for cs in opts.values() for a, b in zip(cs, cs[1:]))
    for budget in np.linspace(lo, hi, 7).astype(int):
        got = allocate(opts, int(budget))
        assert sum(c.nbytes for c in got.values()) <= budget
        err = sum(c.rel_error for c in got.values())
        # a greedy walk on the convex hulls is optimal at its breakpoints: never worse than the exact optimum of a
        # budget one (largest) step smaller
        assert err <= _brute(opts, int(budget) - max_step) + 1e-12, (budget, err)
        assert err >= _brute(opts, int(budget)) - 1e-12
    assert {n: c.type for n, c in allocate(opts, hi).items()} == {n: cs[-1].type for n, cs in opts.items()}
    with pytest.raises(ValueError):
        allocate(opts, lo - 1)


def test_weighted_rel_error_is_the_weighted_sum():
    g = np.random.default_rng(1)
    x, xh, w = g.standard_normal((5, 8)), g.standard_normal((5, 8)), g.random(8)
    a, b = weighted_rel_error(torch.from_numpy(x).float(), torch.from_numpy(xh).float(), torch.from_numpy(w))
    x32, xh32 = x.astype(np.float32).astype(np.float64), xh.astype(np.float32).astype(np.float64)
    assert np.isclose(a, (w * (x32 - xh32) ** 2).sum()) and np.isclose(b, (w * x32 ** 2).sum())


def _types(path: Path) -> dict[str, str]:
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(path).tensors}


def _kld(path: Path, ref: Path) -> float:
    res = cli("validate", path, "--reference", ref, "--json", "-q", "--max-kld", "100", "--min-top1", "0")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["mean_kld"]


# Measured here (held-out validation text, our reference forward on each file; no imatrix; the forward
# sensitivity on the default 4 x 128 calibration tokens, about 4 s per run on 2 shared cores):
#   Q3_K (pure)  1.389 MB: KLD 0.0214; --target-size of the same bytes: --sensitivity weights 0.0204,
#                          forward 0.0090;
#   Q3_K_M       1.550 MB: KLD 0.0135; --sensitivity weights 0.0103, forward 0.0033.
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
@pytest.mark.parametrize("peer", ["Q3_K", "Q3_K_M"])
def test_target_size_beats_a_file_of_the_same_size(trained_src, tmp_path, peer):
    uni = tmp_path / f"{peer}.gguf"
    rep_u = ge.run(trained_src, uni, ge.GGUFOptions(type=peer), progress=False)
    budget = rep_u["plan"]["tensor_bytes"]["bytes"]
    dry = cli("gguf", trained_src, "--target-size", str(budget), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    b = json.loads(dry.stdout)["plan"]["target_size"]
    assert b["sensitivity"] == "forward"
    assert b["smallest"]["bytes"] <= b["planned"]["bytes"] <= budget <= b["largest"]["bytes"]
    kld = {"uniform": _kld(uni, trained_src)}
    for method in ("forward", "weights"):
        out = tmp_path / f"target-{method}.gguf"
        rep = ge.run(trained_src, out, ge.GGUFOptions(target_size=budget, sensitivity=method), progress=False)
        assert rep["plan"]["tensor_bytes"]["bytes"] <= budget
        chosen = rep["plan"]["target_size"]["choices"]
        if method == "forward":  # the dry run showed the choice that is written
            assert {n: c["type"] for n, c in chosen.items()} == {n: c["type"] for n, c in b["choices"].items()}
        types = _types(out)
        assert {n: c["type"] for n, c in chosen.items()} == {n: types[n] for n in chosen}
        assert len(set(c["type"] for c in chosen.values())) >= 2  # a real mix, not one type
        kld[method] = _kld(out, trained_src)
    assert kld["forward"] < kld["weights"] < kld["uniform"], kld
    assert kld["forward"] < 0.6 * kld["weights"], kld  # measured 0.44 (Q3_K) and 0.32 (Q3_K_M)


#: a small forward measurement (1 window of 32 tokens) for the tests about rules, not about the choice's quality
FAST = ("--sensitivity-samples", "1", "--sensitivity-seq-len", "32")


def test_target_size_keeps_user_rules_and_refuses_too_small(trained_src):
    r = cli("gguf", trained_src, "--type", "Q3_K", "--dry-run", "--json")
    budget = json.loads(r.stdout)["plan"]["tensor_bytes"]["bytes"]
    r2 = cli("gguf", trained_src, "--target-size", str(budget), "--tensor-type", "attn_output=q8_0", "--dry-run",
             "--json", *FAST)
    assert r2.exit_code == 0, r2.output
    p2 = json.loads(r2.stdout)["plan"]
    assert all("attn_output" not in n for n in p2["target_size"]["choices"])
    assert p2["tensor_bytes"]["bytes"] <= budget
    assert p2["types"]["Q8_0"]["tensors"] >= 3  # the three attn_output rules
    too_small = cli("gguf", trained_src, "--target-size", "1K", "--dry-run")
    assert too_small.exit_code == 2 and "is below the smallest this plan can be" in too_small.text


#: ``--target-size 1450000`` on the trained fixture as the weight proxy chose it before ``--sensitivity`` existed
#: (commit 0e47ccf's ``_budget_types``, run on the same fixture)
WEIGHTS_CHOICE_1450000 = {
    "Q3_K": ["blk.0.ffn_down", "blk.0.ffn_gate", "blk.0.ffn_up", "blk.1.ffn_gate_exps", "blk.1.ffn_up_exps",
             "blk.2.ffn_gate_exps", "blk.2.ffn_up_exps", "output", "token_embd"],
    "Q4_0": ["blk.0.attn_output", "blk.1.attn_output", "blk.1.attn_q_b", "blk.1.ffn_down_exps",
             "blk.1.ffn_down_shexp", "blk.2.attn_output", "blk.2.attn_q_b", "blk.2.ffn_down_exps",
             "blk.2.ffn_down_shexp"],
    "Q4_K": ["blk.0.attn_kv_a_mqa", "blk.0.attn_q_a", "blk.1.attn_kv_a_mqa", "blk.1.attn_q_a", "blk.1.ffn_gate_shexp",
             "blk.1.ffn_up_shexp", "blk.2.attn_kv_a_mqa", "blk.2.attn_q_a", "blk.2.ffn_gate_shexp",
             "blk.2.ffn_up_shexp"],
    "Q5_0": ["blk.0.attn_k_b", "blk.0.attn_q_b", "blk.0.attn_v_b", "blk.1.attn_k_b", "blk.1.attn_v_b",
             "blk.2.attn_k_b", "blk.2.attn_v_b"],
}


def test_sensitivity_weights_keeps_the_previous_choice(trained_src):
    r = cli("gguf", trained_src, "--target-size", "1450000", "--sensitivity", "weights", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    b = json.loads(r.stdout)["plan"]["target_size"]
    assert b["sensitivity"] == "weights" and "calibration" not in b
    want = {f"{n}.weight": q for q, ns in WEIGHTS_CHOICE_1450000.items() for n in ns}
    assert {n: c["type"] for n, c in b["choices"].items()} == want
    bad = cli("gguf", trained_src, "--target-size", "1450000", "--sensitivity", "kld", "--dry-run")
    assert bad.exit_code == 2 and "--sensitivity 'kld': unknown" in bad.text


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_dry_run_shows_the_forward_measurement(trained_src):
    r = cli("gguf", trained_src, "--target-size", "1450000", "--sensitivity-samples", "2", "--sensitivity-seq-len",
            "64", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    b = json.loads(r.stdout)["plan"]["target_size"]
    assert b["sensitivity"] == "forward"
    c = b["calibration"]
    assert c["dataset"] == "dsconvert:calibration.txt" and (c["sequences"], c["seq_len"], c["tokens"]) == (2, 64, 128)
    assert len(c["windows_sha256"]) == 64
    assert b["expert_sample"] == {"blk.1": list(range(8)), "blk.2": list(range(8))}
    assert {c["measure"] for c in b["choices"].values()} == {"layer_output", "expert_sample", "layer0_input",
                                                             "logits"}
    assert all(len(c["rel_error"]) >= 4 and c["type"] in c["rel_error"] for c in b["choices"].values())
    human = cli("gguf", trained_src, "--target-size", "1450000", "--sensitivity-samples", "2",
                "--sensitivity-seq-len", "64", "--dry-run")
    assert human.exit_code == 0 and "sensitivity forward on 2 x 64 calibration tokens" in human.text


def test_a_remote_unit_rebuilds_the_same_choice_from_rules(trained_src):
    ck = ge.open_checkpoint(trained_src)
    opts = ge.GGUFOptions(target_size=1_450_000, tensor_types=["attn_output=q8_0"], sensitivity_samples=1,
                          sensitivity_seq_len=32)
    plan = ge.make_plan(ck, opts, None)
    again = ge.make_plan(ck, ge._as_rules(opts, plan), None)
    assert again.budget is None and again.types == plan.types and again.ftype == plan.ftype


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_a_rerun_resumes_the_same_measured_choice_and_refuses_another(trained_src, tmp_path):
    out = tmp_path / "t.gguf"
    args = ("gguf", trained_src, "-o", out, "--target-size", "1450000", "-q", *FAST)
    first = cli(*args)
    assert first.exit_code == 0, first.output
    again = cli(*args, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["already_complete"], again.output
    other = cli(*args, "--sensitivity", "weights")
    assert other.exit_code == 2 and "--sensitivity: forward -> weights" in other.text, other.output
