"""fp16 scale overflow in the AutoAWQ / GPTQ layouts is refused at pre-flight (issue 11, "Found replaying public
bug reports"): the tensor and its file are named, the exit code is 3, the hint gives the two ways out (bf16-scale
compressed-tensors, or ``--ignore`` the module), and nothing is written (no ``manifest.json``).

The damaged checkpoints are edited with the safetensors library, and whether a tensor must overflow is computed
here independently: dequantize ``float32(w) * scale_inv`` per 128x128 block, take each 32-wide group's amax over
7.5 (int4 symmetric), compare with float16's largest finite value.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..conftest import INDEX, guard_source, run_many

MOD = "model.layers.1.mlp.experts.0.gate_proj"
SAFE = "model.layers.1.mlp.experts.1.gate_proj"
GPTQ = ["--scheme", "W4A16", "--group-size", "32", "--format", "gptq"]


def _edit(src: Path, name: str, fn) -> str:
    shard = json.loads((src / INDEX).read_text())["weight_map"][name]
    with safe_open(str(src / shard), "pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    fn(ts)
    save_file(ts, str(src / shard), metadata=meta)
    return shard


def _group_scale_max(w: torch.Tensor, s: torch.Tensor | None) -> float:
    w = w.float()
    if s is not None:
        w = w * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        w = w.to(torch.bfloat16).float()
    return float(w.reshape(w.shape[0], -1, 32).abs().amax(-1).max()) / 7.5


def _scale_up(name: str, value: float, shrink: float = 1.0):
    """Every block's scale_inv set to ``value``; the FP8 weights divided by ``shrink``."""
    def fn(ts):
        ts[name + ".weight_scale_inv"] = torch.full_like(ts[name + ".weight_scale_inv"], value)
        w = ts[name + ".weight"]
        ts[name + ".weight"] = (w.float() / shrink).to(torch.float8_e4m3fn)
    return fn


def _read(src: Path, name: str):
    shard = json.loads((src / INDEX).read_text())["weight_map"][name]
    with safe_open(str(src / shard), "pt") as f:
        s = f.get_tensor(name + "_scale_inv") if name + "_scale_inv" in f.keys() else None
        return f.get_tensor(name), s


@pytest.fixture(scope="module")
def cases(tiny_src, tmp_path_factory):
    from dsconvert.testing.fixtures import build_checkpoint

    base = tmp_path_factory.mktemp("ovf")
    fp8 = base / "fp8"
    shutil.copytree(tiny_src, fp8)
    shard = _edit(fp8, MOD + ".weight", _scale_up(MOD, 3000.0))
    # scale_inv as large, but weights small: the scale bound cannot prove it safe, the exact check must
    _edit(fp8, SAFE + ".weight", _scale_up(SAFE, 3000.0, shrink=64.0))
    bf16 = build_checkpoint(base / "bf16", "tiny", fp8=False)
    bshard = _edit(bf16, MOD + ".weight", lambda ts: ts[MOD + ".weight"].__setitem__((3, 5), 1e6))
    for s in (fp8, bf16):
        guard_source(s)
    jobs = {
        "fp8_gptq": ("quantize", fp8, "-o", base / "o1", *GPTQ, "--json"),
        "fp8_awq": ("quantize", fp8, "-o", base / "o2", "--scheme", "W4A16_ASYM", "--group-size", "32",
                    "--format", "awq"),
        "fp8_ct": ("quantize", fp8, "-o", base / "o3", "--scheme", "W4A16", "--group-size", "32"),
        "fp8_ignore": ("quantize", fp8, "-o", base / "o4", *GPTQ,
                       "--ignore", "re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\."),
        "bf16_gptq": ("quantize", bf16, "-o", base / "o5", *GPTQ),
    }
    return base, {"fp8": (fp8, shard), "bf16": (bf16, bshard)}, run_many(jobs)


def test_independent_oracle_agrees_on_which_tensors_overflow(cases):
    _, srcs, _ = cases
    fp8, _ = srcs["fp8"]
    assert _group_scale_max(*_read(fp8, MOD + ".weight")) > 65504
    assert _group_scale_max(*_read(fp8, SAFE + ".weight")) < 65504  # the exact check lets this one through
    w, s = _read(fp8, SAFE + ".weight")
    assert 448 * float(s.max()) / 7.5 > 65504  # while the scale bound alone could not prove it


@pytest.mark.parametrize("case,src", [("fp8_gptq", "fp8"), ("fp8_awq", "fp8"), ("bf16_gptq", "bf16")])
def test_overflow_refused_before_writing(cases, case, src):
    base, srcs, res = cases
    r = res[case]
    assert r.rc == 3, str(r)
    path, shard = srcs[src]
    err = " ".join(r.stderr.split())
    assert MOD + ".weight" in err and shard in err and "float16" in err, str(r)
    # an expert can only be kept with every routed expert of its layer (one FusedMoE group)
    assert "--format compressed-tensors" in err and "--ignore 're:model\\.layers\\.1\\.mlp\\.experts\\." in err, \
        str(r)
    assert "Traceback" not in r.stderr
    out = base / {"fp8_gptq": "o1", "fp8_awq": "o2", "bf16_gptq": "o5"}[case]
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    if case == "fp8_gptq":
        assert r.json()["exit_code"] == 3


@pytest.mark.parametrize("case", ["fp8_ct", "fp8_ignore"])
def test_the_advice_works(cases, case):
    r = cases[2][case]
    assert r.rc == 0, str(r)
