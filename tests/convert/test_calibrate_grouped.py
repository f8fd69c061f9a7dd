"""The expert-grouped calibration engine (docs/int-formats.md §6-§7): routed experts are calibrated a group
at a time, their results spilled to disk, AWQ's MoE smoothing streamed over the experts; none of that may
change a byte. And the memory estimate that sizes the groups is checked against a measured run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dsconvert.convert.calibrate import CalibrationEngine, estimate_peak_bytes, plan_groups
from dsconvert.model.config import ModelConfig
from dsconvert.quant.rtn import AUTOAWQ, GPTQ, QuantSpec

SPEC = QuantSpec(4, 64, True)


def _policy(name: str, shape: tuple[int, int]):
    return SPEC if shape[1] % SPEC.group_size == 0 else None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: spin-waiting threads slow small ops down
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def moe16(tmp_path_factory):
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.testing.fixtures import build_checkpoint

    d = build_checkpoint(tmp_path_factory.mktemp("moe16") / "ck", "tiny", num_hidden_layers=3, n_routed_experts=16,
                         num_experts_per_tok=4, n_group=1, topk_group=1, tokenizer=False, extra_files=False)
    return CheckpointWeightSource(d)


def _run(src, method, **kw):
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (48, 48, 40, 7)]
    awq_candidates = kw.pop("awq_candidates", None)
    dispatch = kw.pop("_dispatch", None)
    linears = kw.pop("_linears", False)  # also every linear's statistics (tokens, output errors)
    eng = CalibrationEngine(src, _policy, method, AUTOAWQ if method == "awq" else GPTQ, calib, n_grid=6,
                            min_expert_tokens=24, **kw)
    if dispatch is not None:
        eng.expert_dispatch = dispatch(eng)
    if awq_candidates is not None:
        eng.awq_candidates = awq_candidates
    out = {}
    for i in range(eng.num_layers):
        r = eng.run_layer(i)
        for n in r.quantized:
            qt = r.quantized[n]
            out[n] = (qt.q, qt.scale, qt.zero)
        out.update({f"replaced:{k}": (v,) for k, v in r.replaced.items()})
        out[f"stats:{i}"] = (r.stats["experts"], {k: v["calibration"] for k, v in r.stats["linears"].items()})
        if linears:
            out[f"linears:{i}"] = r.stats["linears"]
        r.close()
    out["hidden"] = tuple(eng.hidden_states)
    return eng, out


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method,expert_policy", [("gptq", "all-tokens"), ("gptq", "rtn"), ("awq", "all-tokens"),
                                                  ("awq", "rtn")])
@pytest.mark.slow  # > 2 s each: kept out of `make test-fast`, run by `make test-slow`
def test_expert_group_size_does_not_change_bytes(moe16, tmp_path, method, expert_policy):
    """One expert in flight, spilled to disk, one AWQ candidate output at a time == all 16 experts at once in
    memory with every candidate at once: the same levels, scales, zero points, folded tensors, routing
    choices and residual stream, bit for bit (experts below 24 tokens take the stated fallback)."""
    spill = tmp_path / "spill"
    one, a = _run(moe16, method, expert_group=1, spill_dir=spill, awq_candidates=1, expert_policy=expert_policy)
    everything, b = _run(moe16, method, expert_group=16, awq_candidates=20, expert_policy=expert_policy)
    assert one.expert_group == 1 and everything.expert_group == 16
    assert set(a) == set(b)
    bad = [k for k in a if not _same(a[k], b[k])]
    assert not bad, bad[:5]
    fallbacks = [e for st in (a[f"stats:{i}"][0] for i in range(3)) for e in st.values() if e["policy"] != "routed"]
    assert fallbacks, "the fixture should route fewer than 24 tokens to some expert"
    assert not list(spill.glob("*")), "spilled results are deleted by close()"


def test_results_spill_one_file_per_group(moe16, tmp_path):
    """With a spill folder, a MoE layer's expert results live on disk (one file per group of 4) until close()."""
    g = torch.Generator().manual_seed(2)
    calib = [torch.randint(0, 512, (64,), generator=g).tolist()]
    eng = CalibrationEngine(moe16, _policy, "gptq", GPTQ, calib, expert_group=4, spill_dir=tmp_path)
    eng.run_layer(0)
    r = eng.run_layer(1)  # MoE
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    n = "model.layers.1.mlp.experts.13.down_proj"
    assert n in r.quantized and r.quantized[n].q.dtype == torch.uint8  # GPTQ levels are unsigned
    r.close()
    assert not list(tmp_path.glob("*"))


def test_plan_groups_follows_the_budget(moe16):
    """A larger budget never plans fewer experts in flight; the plan fits the budget; nothing fits -> (1, 1)."""
    cfg = ModelConfig.from_hf(moe16.config)
    sizes = []
    for budget in (2**24, 2**26, 2**28, 2**30):
        g, c = plan_groups(cfg, "gptq", 512, budget)
        sizes.append(g)
        if (g, c) != (1, 1):
            assert estimate_peak_bytes(cfg, "gptq", 512, expert_group=g, awq_candidates=c) <= budget
    assert sizes == sorted(sizes) and sizes[-1] == 16
    assert plan_groups(cfg, "awq", 512, 1) == (1, 1)


_CHILD = r"""
import json, sys, torch
import psutil
from dsconvert.report import peak_rss_bytes
from dsconvert.convert.calibrate import CalibrationEngine, estimate_peak_bytes
from dsconvert.convert.weights import CheckpointWeightSource
from dsconvert.quant.rtn import GPTQ, AUTOAWQ, QuantSpec
torch.set_num_threads(1)
method, ck = sys.argv[1], sys.argv[2]
spec = QuantSpec(4, 128, True)
src = CheckpointWeightSource(ck)
g = torch.Generator().manual_seed(0)
ids = [torch.randint(0, 512, (128,), generator=g).tolist() for _ in range(4)]
eng = CalibrationEngine(src, lambda n, s: spec if s[1] % 128 == 0 else None, method,
                        AUTOAWQ if method == "awq" else GPTQ, ids, n_grid=4, expert_group=8)
before = psutil.Process().memory_info().rss
eng.run_layer(0)
peak = peak_rss_bytes()  # VmHWM: ru_maxrss would carry the pytest parent's high-water mark across exec
print(json.dumps({"measured": peak - before, "estimate": eng.peak_memory_estimate(spilled=False)}))
"""


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_estimate_matches_a_measured_layer(tmp_path, method):
    """The estimator's formula against one measured MoE layer (1024 wide, 16 experts of 512, 8 in flight,
    512 tokens): the peak RSS the layer adds is within 0.4x-2.5x of estimate_peak_bytes (a generous margin
    for the allocator; the bench compares the real-size layer within +-25 %)."""
    from dsconvert.testing.fixtures import build_checkpoint

    d = build_checkpoint(tmp_path / "ck", "tiny", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                         num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=8, q_lora_rank=256,
                         kv_lora_rank=128, n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1,
                         vocab_size=512, tokenizer=False, extra_files=False)
    r = subprocess.run([sys.executable, "-c", _CHILD, method, str(d)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = got["measured"] / got["estimate"]
    print(f"\n{method}: measured {got['measured'] / 2**20:.0f} MiB, estimate {got['estimate'] / 2**20:.0f} MiB "
          f"-> {ratio:.2f}x")
    assert 0.4 < ratio < 2.5, got


def test_streamed_hessian_equals_the_cached_one():
    """GPTQ's Hessians accumulated at capture, from pieces of any length (sequences cross the 4096-row chunks),
    equal the Hessian of the concatenated input bit for bit, and keep the same token sample."""
    from dsconvert.convert.calib_base import STAT_TOKENS, hessian as _hessian
    from dsconvert.convert.calib_capture import StreamedHessian as _StreamedHessian

    g = torch.Generator().manual_seed(3)
    pieces = [torch.randn(n, 48, generator=g) for n in (1000, 3500, 7, 4096, 2500)]
    x = torch.cat(pieces)
    st = _StreamedHessian(48, x.shape[0], torch.device("cpu"))
    for p in pieces:
        st.add(p)
    st.finish()
    assert torch.equal(st.H, _hessian(x, torch.device("cpu")))
    assert st.n == x.shape[0] and torch.equal(st.sample, x[:: max(1, x.shape[0] // STAT_TOKENS)])


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.slow  # > 2 s each: kept out of `make test-fast`, run by `make test-slow`
def test_forward_chunks_do_not_change_bytes(moe16, monkeypatch, method):
    """Capture and propagate run a chunk of sequences at a time (CHUNK_TOKENS), each propagated chunk replacing
    its input: chunks of 50 tokens ([48], [48], [40, 7]) give the same levels, scales, folded tensors, per-linear
    statistics and residual stream, bit for bit, as all 143 tokens at once."""
    from dsconvert.convert import calibrate

    assert calibrate.token_chunks([torch.arange(n) for n in (48, 48, 40, 7)], 50) == [(0, 1), (1, 2), (2, 4)]
    assert calibrate.token_chunks([torch.arange(n) for n in (60, 3)], 50) == [(0, 1), (1, 2)]
    default = calibrate.CHUNK_TOKENS

    def run(chunk):
        monkeypatch.setattr(calibrate, "CHUNK_TOKENS", chunk)
        return _run(moe16, method, expert_group=16, _linears=True)[1]

    a, b = run(50), run(default)
    assert set(a) == set(b)
    bad = [k for k in a if not _same(a[k], b[k])]
    assert not bad, bad[:5]


def test_interrupted_propagate_stops_the_engine(moe16, monkeypatch):
    """A propagate forward that fails after its first chunk leaves the residual stream part advanced: the next
    run_layer refuses (UsageError) instead of calibrating on it, until restore() gives a consistent stream."""
    from dsconvert.convert import calibrate
    from dsconvert.errors import UsageError

    monkeypatch.setattr(calibrate, "CHUNK_TOKENS", 50)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (48, 48)]
    eng = CalibrationEngine(moe16, _policy, "gptq", GPTQ, calib)
    saved = [h.clone() for h in eng.hidden_states]
    real, calls = eng.model.layer_forward_seqwise, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*a, **kw)

    monkeypatch.setattr(eng.model, "layer_forward_seqwise", flaky)
    with pytest.raises(RuntimeError):
        eng.run_layer(0)
    assert not torch.equal(eng.hidden_states[0], saved[0]) and torch.equal(eng.hidden_states[1], saved[1])
    with pytest.raises(UsageError, match="propagate"):
        eng.run_layer(0)
    eng.restore(saved, 0)
    assert eng.run_layer(0).layer == 0
