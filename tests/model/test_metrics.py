"""Logit metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from dsconvert.model.metrics import compare_logits, layer_errors, nonfinite_summary


def test_identical_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 50, generator=g) * 3
    ids = torch.randint(0, 50, (10,), generator=g)
    m = compare_logits(logits, logits.clone(), ids)
    assert m["n_positions"] == 9
    assert m["mean_kld"] == pytest.approx(0.0, abs=1e-15)
    assert m["max_kld"] == pytest.approx(0.0, abs=1e-15)
    assert m["same_top_p"] == 1.0
    assert m["rms_dp"] == 0.0
    assert m["ln_ppl_ratio"] == 0.0
    assert m["ppl_reference"] == m["ppl_candidate"] > 1
    assert m["cand_nonfinite"]["ok"] and m["ref_nonfinite"]["ok"]


def test_two_class_by_hand():
    ln3 = math.log(3.0)
    # position 0: P_ref = (1/2, 1/2), P_cand = (3/4, 1/4), next token 1
    # position 1: P_ref = (3/4, 1/4), P_cand = (1/4, 3/4), next token 0
    # position 2: last, not scored
    ref = torch.tensor([[0.0, 0.0], [ln3, 0.0], [5.0, -5.0]], dtype=torch.float64)
    cand = torch.tensor([[ln3, 0.0], [0.0, ln3], [-5.0, 5.0]], dtype=torch.float64)
    ids = torch.tensor([0, 1, 0])
    m = compare_logits(ref, cand, ids)
    kl0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    kl1 = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # = 0.5 ln 3
    assert m["n_positions"] == 2
    assert m["mean_kld"] == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    assert m["mean_kld"] == pytest.approx(0.25 * math.log(4), rel=1e-12)
    assert m["max_kld"] == pytest.approx(kl1, rel=1e-12)
    assert m["p999_kld"] == pytest.approx(kl0 + 0.999 * (kl1 - kl0), rel=1e-12)
    # argmax: position 0 tie in ref -> index 0, cand index 0 (same); position 1 differs
    assert m["same_top_p"] == 0.5
    # Δp of the next token: 0.25 - 0.5 and 0.25 - 0.75
    assert m["mean_dp"] == pytest.approx((-0.25 - 0.5) / 2)
    assert m["rms_dp"] == pytest.approx(math.sqrt((0.25**2 + 0.5**2) / 2), rel=1e-12)
    assert m["max_abs_dp"] == pytest.approx(0.5)
    assert m["ppl_reference"] == pytest.approx(math.exp((math.log(2) + math.log(4 / 3)) / 2), rel=1e-12)
    assert m["ppl_candidate"] == pytest.approx(4.0, rel=1e-12)
    assert m["ln_ppl_ratio"] == pytest.approx(math.log(4.0) - 0.5 * math.log(8 / 3), rel=1e-12)


def test_kld_direction_is_ref_to_cand():
    # KL(P||Q) != KL(Q||P): P = (0.9, 0.1), Q = (0.5, 0.5)
    p = torch.tensor([[math.log(0.9), math.log(0.1)], [0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    m = compare_logits(p, q, torch.tensor([0, 0]))
    assert m["mean_kld"] == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-12)


def test_nonfinite_flagged():
    ref = torch.zeros(4, 3)
    cand = torch.zeros(4, 3)
    cand[1, 2] = float("nan")
    cand[2, 0] = float("inf")
    cand[2, 1] = float("-inf")
    s = nonfinite_summary(cand)
    assert s == {"n_nan": 1, "n_posinf": 1, "n_neginf": 1, "bad_positions": [1, 2], "ok": False}
    m = compare_logits(ref, cand, torch.tensor([0, 1, 2, 0]))
    assert not m["cand_nonfinite"]["ok"] and m["ref_nonfinite"]["ok"]
    assert math.isnan(m["mean_kld"])


def test_candidate_zero_probability_gives_inf_kld():
    ref = torch.zeros(2, 2)
    cand = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    m = compare_logits(ref, cand, torch.tensor([0, 0]))
    assert m["max_kld"] == math.inf


def test_shape_and_length_errors():
    with pytest.raises(ValueError):
        compare_logits(torch.zeros(3, 4), torch.zeros(3, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        compare_logits(torch.zeros(1, 4), torch.zeros(1, 4), torch.tensor([0]))
    with pytest.raises(ValueError):
        compare_logits(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 4]))


def test_layer_errors():
    a = [torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)]
    b = [torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)]
    errs = layer_errors(a, b)
    assert [e["layer"] for e in errs] == [0, 1, 2]
    assert errs[0]["rel_error"] == 0.0
    assert errs[1]["rel_error"] == pytest.approx(1.0)
    assert errs[1]["max_abs_error"] == 1.0
    assert errs[2]["rel_error"] == 0.0
    assert layer_errors([torch.zeros(1, 2)], [torch.ones(1, 2)])[0]["rel_error"] == math.inf
    with pytest.raises(ValueError):
        layer_errors(a, b[:2])
