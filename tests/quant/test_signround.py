"""SignRound kernel (dsconvert.quant.signround) against independent references: RTN's bytes at zero iterations,
a per-group Python loop for the quantize rule with offsets and clipping, and the block output error it optimizes
(on held-out rows)."""

from __future__ import annotations

import pytest
import torch

from dsconvert.errors import UsageError
from dsconvert.quant.rtn import AUTOAWQ, COMPRESSED_TENSORS, GPTQ, QuantSpec, dequantize, qrange, quantize
from dsconvert.quant.signround import SignRoundWeight, signround

CONVS = [COMPRESSED_TENSORS, AUTOAWQ, GPTQ]


def _same(a, b) -> bool:
    return (torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
            and ((a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)))


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c.name)
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, -1, True),
                                  QuantSpec(4, -1, False)], ids=str)
def test_zero_iterations_is_rtn_bytes(conv, spec):
    if conv is AUTOAWQ and spec.bits == 8:
        pytest.skip("AutoAWQ is 4-bit only")
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    sw = SignRoundWeight(w, spec, conv)
    res = signround({"w": sw}, lambda q, b: torch.zeros(()), 4, iters=0)
    assert res.loss_init is None and res.best_iter == -1
    ref = quantize(w, spec, conv)
    assert _same(res.quantized["w"], ref)
    assert torch.equal(SignRoundWeight(w, spec, conv).fake_quant().detach(), dequantize(ref))


def _loop_reference(w, v, alpha, beta, spec, conv):
    """q, scale, zero by a plain loop over groups and elements (float64 maths, the scale rounded to the storage
    dtype as the convention stores it)."""
    M, N = w.shape
    g = N if spec.group_size == -1 else spec.group_size
    levels = 2 ** spec.bits - 1
    off = 2 ** (spec.bits - 1)
    qmin, qmax = qrange(spec.bits, conv.signed)
    q = torch.empty(M, N)
    scales, zeros = torch.empty(M, N // g), torch.empty(M, N // g)
    for m in range(M):
        for j in range(N // g):
            grp = [float(x) for x in w[m, j * g:(j + 1) * g]]
            if spec.symmetric:
                s = max(abs(x) for x in grp) * float(beta[m, j]) / (levels / 2)
            else:
                lo = min(min(grp), 0.0) * float(alpha[m, j])
                hi = max(max(grp), 0.0) * float(beta[m, j])
                s = max(hi - lo, conv.range_floor) / levels
            s = float(torch.tensor(s, dtype=torch.float32).to(conv.scale_dtype).float())
            if spec.symmetric:
                z = 0.0 if conv.signed else float(off)
            else:
                zu = min(max(round(-lo / s), 0), levels)
                z = zu - off if conv.signed else zu
            scales[m, j], zeros[m, j] = s, z
            for i in range(g):
                x = float(torch.tensor(grp[i], dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
                          + v[m, j * g + i])
                q[m, j * g + i] = min(max(round(x) + z, qmin), qmax)
    return q, scales, zeros


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c.name)
@pytest.mark.parametrize("sym", [True, False])
def test_offsets_and_clipping_match_a_loop_reference(conv, sym):
    gen = torch.Generator().manual_seed(2)
    spec = QuantSpec(4, 8, sym)
    w = torch.randn(5, 16, generator=gen)
    sw = SignRoundWeight(w, spec, conv)
    with torch.no_grad():
        sw.v.copy_(torch.rand(5, 16, generator=gen) - 0.5)
        sw.beta.copy_(0.5 + 0.5 * torch.rand(5, 2, generator=gen))
        if sw.alpha is not None:
            sw.alpha.copy_(0.5 + 0.5 * torch.rand(5, 2, generator=gen))
    qt = sw.qtensor()
    alpha = sw.alpha if sw.alpha is not None else torch.ones(5, 2)
    q, s, z = _loop_reference(w, sw.v.detach(), alpha.detach(), sw.beta.detach(), spec, conv)
    assert torch.equal(qt.q.float(), q)
    assert torch.equal(qt.scale, s)
    if qt.zero is not None:
        assert torch.equal(qt.zero.float(), z)
    # the trial weight of the forward is the stored weight's dequantization
    assert torch.equal(sw.fake_quant().detach(), dequantize(qt))


def _correlated(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * torch.logspace(0, -2, k)[:, None]
    return torch.randn(n, k, generator=gen) @ mix + 0.3 * torch.randn(k, generator=gen)


def test_learned_rounding_lowers_held_out_output_error_and_stays_within_one_step():
    """Trained on 16 samples of correlated inputs, the learned weight's output MSE on 16 other samples is below
    RTN's; without clipping, every V in [-0.5, 0.5] keeps every integer within 1 of RTN's."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    x = _correlated(32 * 24, 128, 4).view(32, 24, 128)
    train, test = x[:16], x[16:]
    spec = QuantSpec(4, 32, True)
    rtn = quantize(w, spec)

    def err(wq, xs):
        return float(((xs @ wq.T - xs @ w.T) ** 2).mean())

    for minmax in (True, False):
        sw = SignRoundWeight(w, spec, COMPRESSED_TENSORS, minmax=minmax)
        res = signround({"w": sw}, lambda q, b: ((train[b] @ q["w"].T - train[b] @ w.T) ** 2).mean(), 16, iters=100)
        qt = res.quantized["w"]
        assert res.loss_best <= res.loss_init
        assert float(sw.v.detach().abs().max()) <= 0.5
        assert err(dequantize(qt), test) < 0.8 * err(dequantize(rtn), test), minmax
        if not minmax:
            assert torch.equal(qt.scale, rtn.scale)
            assert int((qt.q.int() - rtn.q.int()).abs().max()) <= 1


def test_seeded_batches_are_deterministic():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    x = _correlated(32 * 8, 64, 6).view(32, 8, 64)
    outs = []
    for seed in (0, 0, 1):
        sw = SignRoundWeight(w, QuantSpec(4, 32, False), AUTOAWQ)
        res = signround({"w": sw}, lambda q, b: ((x[b] @ q["w"].T - x[b] @ w.T) ** 2).mean(), 32, iters=20,
                        batch_size=4, seed=seed)
        outs.append(res)
    assert _same(outs[0].quantized["w"], outs[1].quantized["w"]) and outs[0].losses == outs[1].losses
    assert outs[0].losses != outs[2].losses


@pytest.mark.parametrize("kw", [{"iters": -1}, {"batch_size": 0}, {"lr": -0.1}])
def test_bad_settings_are_usage_errors(kw):
    sw = SignRoundWeight(torch.randn(4, 32), QuantSpec(4, 32, True), COMPRESSED_TENSORS)
    with pytest.raises(UsageError):
        signround({"w": sw}, lambda q, b: q["w"].sum(), 4, **{"iters": 5, **kw})
