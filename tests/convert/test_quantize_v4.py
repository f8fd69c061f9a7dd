"""``dsconvert quantize`` of a DeepSeek-V4 release checkpoint (tiny ``v4_src`` fixture: FP8 dense linears with
E8M0 scales, FP4 e2m1 routed experts) to compressed-tensors ``pack-quantized`` W4A16 / W8A16 (RTN, group 128).

Oracles, all independent of the code under test:

* the exact BF16 weights come from ``dsconvert fp8-to-bf16`` of the same source (itself proven against a numpy
  decoder in tests/formats/test_deepseek_v4.py); each packed module is unpacked by the slow numpy unpacker and compared
  with a numpy min-max RTN of those BF16 weights (tests/convert/test_quantize.py ``rtn_oracle`` / ``unpack_ct``);
* every kept tensor is byte-identical to the fp8-to-bf16 output;
* the ``compressed_tensors`` library's own dequantizer reads the output and its ``ignore`` list names every kept
  Linear by its release name;
* ``dsconvert validate OUT --reference V4SRC`` runs the V4 reference forward on both: mean KLD bounded.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.conftest import read_tensors, run_cli, run_many
from tests.convert.test_quantize import read_all, rtn_oracle, unpack_ct

SCHEMES = {"W4A16": 4, "W8A16": 8}
# measured on the tiny fixture (random weights): W4A16 0.080, W8A16 0.0022
KLD_BOUND = {"W4A16": 0.2, "W8A16": 0.01}
# The quantized families, spelled out here (not taken from the policy under test).
QUANTIZED = re.compile(r"^(layers|mtp)\.\d+\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)"
                       r"|ffn\.experts\.\d+\.w[123]|ffn\.shared_experts\.w[123])$")


@pytest.fixture(scope="module")
def outs(v4_src, tmp_path_factory):
    d = tmp_path_factory.mktemp("q4")
    jobs = {"bf16": ("fp8-to-bf16", v4_src, "-o", d / "bf16", "-q")}
    jobs |= {s: ("quantize", v4_src, "-o", d / s, "--scheme", s, "--json", "-q") for s in SCHEMES}
    res = run_many(jobs, parallel=2)
    for k, r in res.items():
        assert r.rc == 0, r
    return {k: d / k for k in jobs} | {"reports": {s: json.loads(res[s].stdout) for s in SCHEMES}}


@pytest.fixture(scope="module")
def bf16(outs):
    return read_all(outs["bf16"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_packed_modules_are_rtn_of_exact_bf16(scheme, outs, bf16):
    """Every FP8 and FP4 linear: dequantized exactly (fp8-to-bf16's bytes), then symmetric RTN, group 128."""
    bits = SCHEMES[scheme]
    got = read_all(outs[scheme])
    mods = sorted({n.rsplit(".", 1)[0] for n in got if n.endswith(".weight_packed")})
    want_mods = sorted(n[: -len(".weight")] for n in bf16 if QUANTIZED.match(n[: -len(".weight")] if
                                                                              n.endswith(".weight") else ""))
    assert mods == want_mods and any(".ffn.experts." in m for m in mods) and any("indexer.wq_b" in m for m in mods)
    for m in mods:
        w = bf16[m + ".weight"].float().numpy()
        o = rtn_oracle(w, bits, 128, True, "ct")
        assert got[m + ".weight_shape"].tolist() == list(w.shape), m
        q = unpack_ct(got[m + ".weight_packed"], bits, w.shape[1], dim=1)
        assert np.array_equal(q, o["q"]), m
        assert got[m + ".weight_scale"].dtype == torch.bfloat16
        assert np.array_equal(got[m + ".weight_scale"].float().numpy(), o["scale"]), m
        assert m + ".weight" not in got


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kept_tensors_byte_identical_to_fp8_to_bf16(scheme, outs):
    ref, got = read_tensors(outs["bf16"]), read_tensors(outs[scheme])
    kept = [n for n in ref if n not in got]
    assert all(QUANTIZED.match(n[: -len(".weight")]) for n in kept), kept[:5]
    for n in got:
        if n in ref:
            assert got[n][:3] == ref[n][:3], n  # dtype, shape, bytes
    for n in ("layers.0.ffn.gate.tid2eid", "layers.1.hc_attn_fn", "layers.0.attn.attn_sink", "embed.weight",
              "head.weight", "layers.2.attn.compressor.wkv.weight", "mtp.0.e_proj.weight"):
        assert n in got, n
    cfg = json.loads((outs[scheme] / "config.json").read_text())
    assert "expert_dtype" not in cfg and cfg["quantization_config"]["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compressed_tensors_library_reads_output(scheme, outs, bf16):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.utils.match import match_name

    out = outs[scheme]
    deq = CompressedTensorsDequantizer(str(out), dtype=torch.bfloat16)
    tensors = read_all(out)
    result = deq.validate(dict(tensors))
    mods = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_packed")})
    for m in mods[:: max(1, len(mods) // 25)]:
        want = torch.from_numpy(rtn_oracle(bf16[m + ".weight"].float().numpy(), SCHEMES[scheme], 128, True,
                                           "ct")["deq_loader"]).to(torch.bfloat16)
        assert torch.equal(result[m + ".weight"], want), m
    ignore = deq.quant_config.ignore
    kept_linears = [n[: -len(".weight")] for n in bf16 if n.endswith(".weight") and len(bf16[n].shape) == 2
                    and not QUANTIZED.match(n[: -len(".weight")]) and n not in ("embed.weight",)]
    assert "head" in kept_linears and "layers.1.ffn.gate" in kept_linears and "mtp.0.h_proj" in kept_linears
    for m in kept_linears:
        assert any(match_name(m, p) for p in ignore), m
    for m in mods:
        assert not any(match_name(m, p) for p in ignore), m


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_validate_against_v4_release(scheme, outs, v4_src):
    r = run_cli("validate", outs[scheme], "--reference", v4_src, "--json", "-q")
    assert r.rc in (0, 4), r  # 4: the default thresholds are for real models, not random tiny weights
    rep = json.loads(r.stdout)
    assert 0 < rep["mean_kld"] < KLD_BOUND[scheme], rep["mean_kld"]


def test_dry_run_sizes_match_output(outs, v4_src, tmp_path):
    r = run_cli("quantize", v4_src, "-o", tmp_path / "dry", "--scheme", "W4A16", "--dry-run", "--json")
    assert r.rc == 0, r
    plan = json.loads(r.stdout)["plan"]
    assert not (tmp_path / "dry").exists()
    real = outs["reports"]["W4A16"]["plan"]
    assert plan["bytes_written"] == real["bytes_written"] and plan["quantized_modules"] == real["quantized_modules"]
    tensor_bytes = sum(len(v[2]) for v in read_tensors(outs["W4A16"]).values())
    assert plan["bytes_written"]["bytes"] == tensor_bytes
    n_q = sum(1 for n in read_all(outs["bf16"]) if n.endswith(".weight") and QUANTIZED.match(n[:-7]))
    assert plan["quantized_modules"] == n_q


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_resume_rewrites_only_the_missing_shard(outs, v4_src, tmp_path):
    """The V3 job runner: a shard lost after a run is rewritten on rerun, the others reused, bytes identical to
    the one-shard run's tensors."""
    out = tmp_path / "o"
    args = ("quantize", v4_src, "-o", out, "--scheme", "W8A16", "--max-shard-size", "400KB", "--json", "-q")
    assert run_cli(*args).rc == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3, shards
    before = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()
    r = run_cli(*args)
    assert r.rc == 0, r
    rep = json.loads(r.stdout)
    assert rep["resumed"] is True and rep["shards_written"] == 1 and rep["shards_reused"] == len(shards) - 1
    assert {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")} == before
    one = {k: v[:3] for k, v in read_tensors(outs["W8A16"]).items()}
    assert {k: v[:3] for k, v in read_tensors(out).items()} == one


@pytest.mark.parametrize("args, needle", [
    (("--gptq", "--preset", "experts-mxfp4"), "--gptq on a DeepSeek-V4 checkpoint takes one integer"),
    (("--awq", "--preset", "experts-mxfp4"), "--awq on a DeepSeek-V4 checkpoint takes one integer"),
    (("--format", "autoawq"), "--format autoawq on a DeepSeek-V4"),
    (("--scheme", "NVFP4"), "NVFP4 W4A4 on a DeepSeek-V4"),
])
def test_v4_refusals_name_what_works(args, needle, v4_src, tmp_path):
    r = run_cli("quantize", v4_src, "-o", tmp_path / "o", "--scheme", "W4A16", *args)
    assert r.rc == 2 and needle in r.stderr and "Traceback" not in r.stderr, r
    assert ("MXFP4" if "NVFP4" in needle else "RTN") in r.stderr, r
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_inspect_plans_and_reads_v4_quantize(outs, v4_src):
    real = outs["reports"]["W4A16"]["plan"]["quantized_modules"]
    src = json.loads(run_cli("inspect", v4_src, "--json").stdout)
    assert src["deepseek_v4"]["conversions"]["quantize"].startswith(f"{real} linears")
    r = run_cli("inspect", outs["W4A16"], "--json")
    assert r.rc == 0, r
    rep = json.loads(r.stdout)
    assert rep["ok"] and rep["format"] == "compressed-tensors" and rep["deepseek_v4"]["schedule"]
    assert rep["deepseek_v4"]["conversions"]["quantize"] == "already quantized"
    q = rep["quantization"]
    assert (q["scheme"], q["bits"], q["group_size"], q["quantized_modules"]) == ("W4A16", 4, 128, real)


# -- mixed: the release's FP4 routed experts as compressed-tensors MXFP4, unchanged ---------------------------------
@pytest.fixture(scope="module")
def mixed(v4_src, tmp_path_factory):
    d = tmp_path_factory.mktemp("q4mix")
    jobs = {"bf16": ("quantize", v4_src, "-o", d / "bf16", "--preset", "experts-mxfp4", "--json", "-q"),
            "w4": ("quantize", v4_src, "-o", d / "w4", "--preset", "experts-mxfp4", "--scheme", "W4A16", "--json",
                   "-q")}
    res = run_many(jobs, parallel=2)
    for r in res.values():
        assert r.rc == 0, r
    return {k: d / k for k in jobs}


@pytest.mark.parametrize("rest", ["bf16", "w4"])
def test_mxfp4_experts_pass_through_byte_for_byte(rest, mixed, v4_src, outs, bf16):
    src, got = read_tensors(v4_src), read_tensors(mixed[rest])
    experts = sorted(n[: -len(".weight")] for n in src if re.match(r"^(layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]"
                                                                   r"\.weight$", n))
    assert experts
    for m in experts:
        assert got[m + ".weight_packed"][0] == "uint8" and got[m + ".weight_scale"][0] == "uint8", m
        assert got[m + ".weight_packed"][1:3] == src[m + ".weight"][1:3], m  # shape, raw bytes
        assert got[m + ".weight_scale"][1:3] == src[m + ".scale"][1:3], m
    groups = {g["scheme"]: g for g in json.loads((mixed[rest] / "report.json").read_text())["plan"]["config_groups"]}
    assert groups["MXFP4"]["passed_through"] == groups["MXFP4"]["modules"] == len(experts)  # the report says so
    assert all(g["passed_through"] == 0 for k, g in groups.items() if k != "MXFP4")
    ref = read_tensors(outs["bf16"])
    others = [n for n in got if not n.startswith(tuple(m + "." for m in experts))]
    if rest == "bf16":  # everything else exactly as fp8-to-bf16 writes it
        assert sorted(others) == sorted(n for n in ref if n[: -len(".weight")] not in experts)
        assert all(got[n][:3] == ref[n][:3] for n in others)
    else:  # the other quantizable linears are the W4A16 RTN of their exact BF16
        t = read_all(mixed[rest])
        for m in ("layers.0.attn.wq_a", "layers.3.ffn.shared_experts.w2", "layers.1.attn.indexer.wq_b"):
            o = rtn_oracle(bf16[m + ".weight"].float().numpy(), 4, 128, True, "ct")
            assert np.array_equal(unpack_ct(t[m + ".weight_packed"], 4, o["q"].shape[1], dim=1), o["q"]), m


@pytest.mark.parametrize("rest", ["bf16", "w4"])
def test_compressed_tensors_decodes_passed_through_experts_exactly(rest, mixed, bf16):
    """compressed-tensors' own MXFP4 decoder (its nibble order and e8m0 rule) gives fp8-to-bf16's exact BF16."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    deq = CompressedTensorsDequantizer(str(mixed[rest]), dtype=torch.bfloat16)
    result = deq.validate(dict(read_all(mixed[rest])))
    experts = [n for n in bf16 if ".ffn.experts." in n]
    for n in experts[:: max(1, len(experts) // 40)]:
        assert torch.equal(result[n], bf16[n]), n
    groups = deq.quant_config.config_groups
    mx = [g for g in groups.values() if g.format == "mxfp4-pack-quantized"]
    assert len(mx) == 1 and mx[0].targets == [r"re:.*ffn\.experts\.\d+\.w[123]$"]  # release names


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_mxfp4_passthrough_validates_with_zero_kld(mixed, v4_src):
    """Weights only (no MX activation emulation): the passthrough output is the release, KLD exactly 0."""
    r = run_cli("validate", mixed["bf16"], "--reference", v4_src, "--json", "-q", "--no-emulate-activations")
    assert r.rc == 0, r
    rep = json.loads(r.stdout)
    assert rep["mean_kld"] == 0.0 and rep["same_top_p"] == 1.0


def test_v41_still_refused(v4_src, tmp_path):
    import shutil

    d = tmp_path / "src"
    shutil.copytree(v4_src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "deepseek_v41"
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("quantize", d, "-o", tmp_path / "o", "--scheme", "W4A16")
    assert r.rc == 3 and "V4.1" in r.stderr and not (tmp_path / "o").exists(), r


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_flash_base_fp8_experts_quantize_from_exact_bf16(v4_base_src, tmp_path):
    """V4-Flash-Base (FP8 experts, F32 scales): the experts too are the RTN of fp8-to-bf16's exact BF16."""
    res = run_many({"bf16": ("fp8-to-bf16", v4_base_src, "-o", tmp_path / "bf16", "-q"),
                    "q": ("quantize", v4_base_src, "-o", tmp_path / "q", "--scheme", "W4A16", "-q")}, parallel=2)
    assert all(r.rc == 0 for r in res.values()), res
    ref, got = read_all(tmp_path / "bf16"), read_all(tmp_path / "q")
    for m in ("layers.0.ffn.experts.0.w1", "layers.2.ffn.experts.5.w2", "mtp.0.ffn.experts.7.w3", "layers.3.attn.wo_a"):
        o = rtn_oracle(ref[m + ".weight"].float().numpy(), 4, 128, True, "ct")
        assert np.array_equal(unpack_ct(got[m + ".weight_packed"], 4, o["q"].shape[1], dim=1), o["q"]), m
        assert np.array_equal(got[m + ".weight_scale"].float().numpy(), o["scale"]), m
