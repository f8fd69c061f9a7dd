"""``inspect`` on what dsconvert writes: INT checkpoints (compressed-tensors, AutoAWQ, GPTQ) report their scheme,
quantized and kept linears, bits per weight and logical parameters (not packed int32 words); a fused group split
across precisions is flagged; a GGUF file is described from its header.

Oracles: the source checkpoint's own parameter count (inspect of the FP8 source), the quantize report's module
list, and gguf-py's reader for the GGUF file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..conftest import run_cli

G = ["--group-size", "32"]
FORMATS = {"ct": ["--format", "compressed-tensors"], "awq": ["--format", "awq"], "gptq": ["--format", "gptq"]}


@pytest.fixture(scope="module")
def src_params(tiny_src):
    r = run_cli("inspect", tiny_src, "--json")
    assert r.rc == 0, r
    return r.json()["parameters"]


@pytest.fixture(scope="module")
def int_outputs(tiny_src, tmp_path_factory):
    outs = {}
    for k, args in FORMATS.items():
        out = tmp_path_factory.mktemp(k) / "out"
        r = run_cli("quantize", tiny_src, "-o", out, "--scheme", "W4A16", *G, *args, "--json")
        assert r.rc == 0, r
        outs[k] = (out, r.json())
    return outs


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_inspect_int_checkpoint(fmt, int_outputs, src_params):
    out, qrep = int_outputs[fmt]
    r = run_cli("inspect", out, "--json")
    assert r.rc == 0, r
    rep = r.json()
    q = rep["quantization"]
    assert rep["format"] == q["format"] != "unquantized"
    # AutoAWQ GEMM always stores zero points (zero_point: true), so its config reads back as asymmetric
    assert (q["bits"], q["group_size"], q["symmetric"]) == (4, 32, fmt != "awq")
    assert rep["parameters"] == src_params  # logical weights, not packed words
    assert q["quantized_modules"] == qrep["plan"]["quantized_modules"] > 0
    assert 4.0 < q["bits_per_weight"] < 5.5
    assert rep["ok"] and not rep["problems"]
    human = run_cli("inspect", out)
    assert "quantized" in human.stdout and "bits/weight" in human.stdout and "unquantized" not in human.stdout


def _split_fused_group(int_outputs, tmp_path):
    """A copy of the compressed-tensors output with kv_a_proj_with_mqa of layer 0 put back in BF16 (hand-made,
    with the safetensors library) while q_a_proj stays quantized."""
    src, _ = int_outputs["ct"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    pre = "model.layers.0.self_attn.kv_a_proj_with_mqa"
    shard = idx["weight_map"][pre + ".weight_packed"]
    with safe_open(bad / shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    m, _ = tensors[pre + ".weight_shape"].tolist()
    k = int(tensors[pre + ".weight_shape"][1])
    for s in [n for n in tensors if n.startswith(pre + ".")]:
        del tensors[s]
        del idx["weight_map"][s]
    tensors[pre + ".weight"] = torch.zeros(m, k, dtype=torch.bfloat16)
    idx["weight_map"][pre + ".weight"] = shard
    save_file(tensors, bad / shard, metadata=meta)
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    return bad


def test_inspect_flags_split_fused_group(int_outputs, tmp_path):
    """q_a_proj quantized but kv_a_proj_with_mqa back in BF16: vLLM cannot fuse them (exit 3)."""
    bad = _split_fused_group(int_outputs, tmp_path)
    r = run_cli("inspect", bad, "--json")
    assert r.rc == 3, r
    probs = [p for p in r.json()["problems"] if p["kind"] == "fused_group_split"]
    assert probs and "q_a_proj" in probs[0]["message"] and "kv_a_proj_with_mqa" in probs[0]["message"]


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_validate_fails_a_split_fused_group(int_outputs, tiny_src, tmp_path):
    """The same hand-made checkpoint fails validate's named check fused_group_split (exit 4, before any forward
    pass), with loose thresholds the metrics alone would pass."""
    bad = _split_fused_group(int_outputs, tmp_path)
    r = run_cli("validate", bad, "--reference", tiny_src, "--max-kld", "100", "--min-top1", "0", "--json")
    assert r.rc == 4, r
    rep = r.json()
    (f,) = rep["failed_checks"]
    assert f["check"] == "fused_group_split" and "q_a_proj" in f["message"] and "kv_a_proj_with_mqa" in f["message"]
    assert rep["forward"].startswith("skipped") and not rep["passed"]
    h = run_cli("validate", bad, "--reference", tiny_src, "--max-kld", "100", "--min-top1", "0")
    assert h.rc == 4 and "fused_group_split" in h.stdout and "kv_a_proj_with_mqa" in h.stderr, h
    good, _ = int_outputs["ct"]
    ok = run_cli("validate", good, "--reference", tiny_src, "--max-kld", "100", "--min-top1", "0", "--json")
    assert ok.rc == 0 and ok.json()["forward"] == "run", ok


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_inspect_gguf(tiny_src, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "t.gguf"
    r = run_cli("gguf", tiny_src, "-o", out, "--type", "Q8_0", "--json")
    assert r.rc == 0, r
    r = run_cli("inspect", out, "--json")
    assert r.rc == 0, r
    rep = r.json()
    reader = GGUFReader(str(out))
    assert rep["architecture"] == "deepseek2" and rep["tensors"] == len(reader.tensors)
    want: dict[str, int] = {}
    for t in reader.tensors:
        want[t.tensor_type.name] = want.get(t.tensor_type.name, 0) + 1
    assert {k: v["tensors"] for k, v in rep["by_type"].items()} == want
    assert rep["layout"].startswith("mainline MLA") and rep["mtp"] is False and rep["ok"]
    human = run_cli("inspect", out)
    assert human.rc == 0 and "deepseek2" in human.stdout and "mainline MLA" in human.stdout
    missing = run_cli("inspect", tmp_path / "nope.gguf", "--json")
    assert missing.rc == 3
