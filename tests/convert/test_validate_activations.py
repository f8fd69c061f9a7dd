"""validate emulates the candidate's declared activation quantization (docs/int-formats.md §13)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ..conftest import run_cli
from .._reference import E2M1_TABLE, fp8_e4m3fn_table

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from dsconvert.testing.fixtures import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("va") / "src-fp8", "tiny")


@pytest.fixture(scope="module")
def nvfp4_out(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("va-out") / "nvfp4"
    r = run_cli("quantize", src, "-o", out, "--scheme", "NVFP4", "--num-samples", "2", "--seq-len", "32")
    assert r.rc == 0, str(r)
    return out


def _nearest(table: list[float], v: float) -> float:
    """Nearest entry, ties to the one with the even index in its binade-ordered table."""
    best = min(range(len(table)), key=lambda i: (abs(table[i] - v), i % 2))
    return table[best]


def _nvfp4_slow(x: torch.Tensor, gs: float) -> torch.Tensor:
    """Per token, per 16 channels, scalar by scalar: e4m3 local scale from the absmax, e2m1 values."""
    fp8 = sorted(set(v for v in fp8_e4m3fn_table().tolist() if not math.isnan(v) and v >= 0))
    out = torch.empty_like(x)
    for t in range(x.shape[0]):
        for g0 in range(0, x.shape[1], 16):
            grp = x[t, g0:g0 + 16]
            amax = float(grp.abs().max())
            s = float(torch.tensor(gs, dtype=torch.float32) * torch.tensor(amax / 6.0, dtype=torch.float32))
            s = _nearest(fp8, min(s, 448.0)) if s > 0 else 0.0
            s = s or 0.125
            eff = float(torch.tensor(s, dtype=torch.float32) / torch.tensor(gs, dtype=torch.float32))
            for j in range(16):
                v = float(torch.tensor(float(grp[j])) / torch.tensor(eff))
                a = _nearest(list(E2M1_TABLE), min(abs(v), 6.0))
                out[t, g0 + j] = float(torch.tensor(math.copysign(a, v) if a else 0.0) * torch.tensor(eff))
    return out


def test_hook_on_one_linear_matches_slow_reference(nvfp4_out):
    from dsconvert.convert.validate import activation_hook
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model.layers import linear

    source = CheckpointWeightSource(nvfp4_out)
    hook, summary = activation_hook(source)
    assert hook is not None and summary["groups"]["group_0"]["input_activations"] == "float4 tensor_group 16"
    name = "model.layers.0.self_attn.q_a_proj"
    gs = float(source.get_raw(name + ".input_global_scale"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((6, 320), generator=g) * torch.logspace(-2, 1, 6).unsqueeze(1)
    want_x = _nvfp4_slow(x, gs)
    got_x = hook(name, x)
    assert torch.equal(got_x, want_x)
    w = source.get(name + ".weight").float()
    y = linear(x, lambda n: source.get(n).float(), name, hook)
    assert torch.equal(y, F.linear(want_x, w))
    assert not torch.equal(y, F.linear(x, w))
    assert hook("model.layers.1.mlp.gate", x) is None  # the router is ignored: never emulated
    assert hook("lm_head", x[:, :320]) is None


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_emulation_changes_kld_and_is_reported(nvfp4_out, src):
    reps = {}
    for flag in ("--emulate-activations", "--no-emulate-activations"):
        r = run_cli("validate", nvfp4_out, "--reference", src, "--max-kld", "50", "--min-top1", "0", flag, "--json",
                    "--num-samples", "1", "--seq-len", "64")
        assert r.rc == 0, str(r)
        reps[flag] = r.json()
    on, off = reps["--emulate-activations"], reps["--no-emulate-activations"]
    assert off["activation_emulation"] is None
    assert on["activation_emulation"]["modules_emulated"] > 0
    assert on["mean_kld"] != off["mean_kld"]
    assert on["mean_kld"] > off["mean_kld"]  # 4-bit inputs on top of 4-bit weights: strictly worse here


def test_weight_only_candidate_has_no_emulation(src, tmp_path):
    from dsconvert.convert.validate import activation_hook
    from dsconvert.convert.weights import CheckpointWeightSource

    out = tmp_path / "a16"
    r = run_cli("quantize", src, "-o", out, "--scheme", "NVFP4A16")
    assert r.rc == 0, str(r)
    assert activation_hook(CheckpointWeightSource(out)) == (None, None)
