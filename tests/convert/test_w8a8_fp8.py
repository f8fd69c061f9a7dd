"""W8A8 (compressed-tensors int-quantized), FP8_BLOCK (float-quantized) and DeepSeek's native FP8 layout
(``--format deepseek-fp8`` / ``bf16-to-fp8``), end to end through ``dsconvert quantize``.

Oracles, none of them dsconvert's own code:

* the ``compressed_tensors`` library (0.20.1): its presets (``W8A8``, ``FP8_BLOCK``), its compressors
  (``decompress`` of our tensors, module by module, against our dequantized weights), the ``quantization_config``
  ``ModelCompressor.update_config`` writes, and transformers' ``CompressedTensorsConfig`` parsing ours;
* DeepSeek's block rule on the fixture's own quantizer (``dsconvert.testing.fixtures.quantize_fp8_block``, written
  independently): a release quantized from BF16 masters -> fp8-to-bf16 -> bf16-to-fp8 gives its tensor bytes back;
* the table decoder of tests/_reference.py for power-of-two (ue8m0) payloads;
* transformers' fine-grained FP8 loader (dequantizes on CPU) for the deepseek-fp8 output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsconvert.formats.registry import get_format
from dsconvert.quant.fp8_quant import FP8_E4M3_MAX
from dsconvert.quant.schemes import get_scheme
from tests._reference import dequant_fp8_block_reference
from tests.conftest import read_index, read_tensors, run_cli

ct = pytest.importorskip("compressed_tensors")

SCALE = "weight_scale_inv"


def _weight(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, n, generator=g) * 0.02).bfloat16()


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with the safetensors library."""
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _library(cfg: dict):
    """(QuantizationScheme of group_0, compressor) from a quantization_config, parsed the way transformers does."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from transformers.utils.quantization_config import CompressedTensorsConfig

    mc = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(json.loads(json.dumps(cfg))))
    qc = mc.quantization_config
    return qc.config_groups["group_0"], BaseCompressor.get_value_from_registry(qc.format)


# --- schemes match the library's presets ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["W8A8", "FP8_BLOCK"])
def test_scheme_descriptions_match_compressed_tensors_presets(name):
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    d = get_scheme(name).describe()
    lib = preset_name_to_scheme(name, ["Linear"])
    w, a = d.weights, d.input_activations
    assert (w.type, w.bits, w.strategy, w.symmetric, w.group_size) == (
        lib.weights.type, lib.weights.num_bits, lib.weights.strategy, lib.weights.symmetric, lib.weights.group_size)
    assert (list(w.block) if w.block else None) == lib.weights.block_structure
    la = lib.input_activations
    assert (a.type, a.bits, a.strategy, a.dynamic, a.symmetric, a.group_size) == (
        la.type, la.num_bits, la.strategy, la.dynamic, la.symmetric, la.group_size)


# --- the codecs against the library, module by module ---------------------------------------------------------

@pytest.mark.parametrize("scheme,shape", [("W8A8", (72, 384)), ("FP8_BLOCK", (200, 300)), ("FP8_BLOCK", (256, 384))])
def test_library_decompresses_our_module_exactly(scheme, shape):
    desc = get_scheme(scheme).describe()
    codec = get_format("compressed-tensors").bind(desc)
    w = _weight(*shape, seed=5)
    payload, _ = get_scheme(scheme).quantize_with_error(w, desc.spec, codec.storage(desc))
    enc = {k: v for k, v in codec.encode_qtensor("", payload).items()}
    assert [(k, v.dtype, tuple(v.shape)) for k, v in enc.items()] == [
        (p.name, p.dtype, p.shape) for p in codec.plan("", shape, desc.spec)]
    cfg = codec.model_quantization_config(desc.spec, default_ignore=["lm_head"])
    lib_scheme, compressor = _library(cfg)
    assert set(compressor.compression_param_names(lib_scheme)) == set(enc)
    lib = compressor.decompress(dict(enc), lib_scheme)["weight"]
    assert lib.dtype == torch.bfloat16 and tuple(lib.shape) == shape
    assert torch.equal(lib.float(), codec.decode(enc, desc.spec))


def test_library_compresses_to_our_fp8_block_bytes():
    """compressed-tensors' own compress() under our scales gives our payload when it divides in float32 (same
    padding, division and cast). Given the BF16 weight itself it divides in bf16 and rounds twice: then a few
    percent of the codes differ, by one e4m3 step at most (docs/int-formats.md §10)."""
    desc = get_scheme("FP8_BLOCK").describe()
    codec = get_format("compressed-tensors").bind(desc)
    w = _weight(200, 300, seed=6)
    enc = codec.encode_qtensor("", get_scheme("FP8_BLOCK").quantize_with_error(w, desc.spec, torch.bfloat16)[0])
    lib_scheme, compressor = _library(codec.model_quantization_config(desc.spec))
    ours = enc["weight"].view(torch.uint8).to(torch.int16)
    out = compressor.compress({"weight": w.float(), "weight_scale": enc["weight_scale"]}, lib_scheme)
    assert torch.equal(out["weight"].view(torch.uint8).to(torch.int16), ours)
    out = compressor.compress({"weight": w, "weight_scale": enc["weight_scale"]}, lib_scheme)
    diff = (out["weight"].view(torch.uint8).to(torch.int16) - ours).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.1


def _update_config(weights: dict, acts: dict, fmt: str, ignore: list[str], tmp_path) -> dict:
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**acts), format=fmt)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                            ignore=ignore)
    ModelCompressor(quantization_config=qc).update_config(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("scheme,fmt", [("W8A8", "int-quantized"), ("FP8_BLOCK", "float-quantized")])
def test_quantization_config_equals_what_the_library_writes(scheme, fmt, tmp_path):
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    desc = get_scheme(scheme).describe()
    codec = get_format("compressed-tensors").bind(desc)
    ignore = ["lm_head", "re:.*mlp\\.gate$"]
    ours = json.loads(json.dumps(codec.model_quantization_config(desc.spec, default_ignore=ignore)))
    preset = preset_name_to_scheme(scheme, ["Linear"])
    lib = _update_config(preset.weights.model_dump(), preset.input_activations.model_dump(), fmt, ignore, tmp_path)
    assert ours["format"] == fmt
    assert {**lib, "version": None} == {**ours, "version": None}


def test_deepseek_fp8_codec_is_deepseeks_block_rule():
    from dsconvert.testing.fixtures import quantize_fp8_block as deepseek_rule

    fmt = get_format("deepseek-fp8")
    desc = get_scheme("FP8_BLOCK").describe()
    assert fmt.bind(desc) is fmt
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(7)) * 0.02
    enc = fmt.encode("m", w, desc.spec)
    q, s = deepseek_rule(w)
    assert torch.equal(enc["m.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(enc["m.weight_scale_inv"], s)
    assert [(p.name, p.dtype, p.shape) for p in fmt.plan("m", (200, 300), desc.spec)] == [
        ("m.weight", torch.float8_e4m3fn, (200, 300)), ("m.weight_scale_inv", torch.float32, (2, 3))]
    assert torch.equal(fmt.decode(enc, desc.spec), dequant_fp8_block_reference(q, s).float())


# --- end to end through the CLI -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct_outputs(tiny_src, tmp_path_factory):
    base = tmp_path_factory.mktemp("w8a8_fp8")
    outs = {}
    for key, args in {"W8A8": ["--scheme", "W8A8"], "W8A8_gptq": ["--scheme", "W8A8", "--gptq"],
                      "FP8_BLOCK": ["--scheme", "FP8_BLOCK"]}.items():
        r = run_cli("quantize", tiny_src, "-o", base / key, *args, "--json")
        assert r.rc == 0, r
        outs[key] = (base / key, r.json())
    return outs


@pytest.mark.parametrize("key", ["W8A8", "W8A8_gptq", "FP8_BLOCK"])
def test_library_decompresses_whole_output_to_what_validate_reads(ct_outputs, key):
    from dsconvert.convert.weights import CheckpointWeightSource

    out, rep = ct_outputs[key]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    lib_scheme, compressor = _library(cfg)
    tensors = _tensors(out)
    src = CheckpointWeightSource(out)
    mods = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    assert len(mods) == rep["plan"]["quantized_modules"] > 0
    for m in mods:
        names = compressor.compression_param_names(lib_scheme)
        lib = compressor.decompress({n: tensors[f"{m}.{n}"] for n in names}, lib_scheme)["weight"]
        assert torch.equal(lib.float(), src.get(m + ".weight")), m


def test_w8a8_output_layout_and_inspect(ct_outputs):
    out, rep = ct_outputs["W8A8"]
    t = read_tensors(out)
    q = "model.layers.0.self_attn.q_b_proj"
    assert t[q + ".weight"][:2] == ("int8", (4 * 48, 96)) and t[q + ".weight_scale"][:2] == ("bfloat16", (192, 1))
    assert not any(k.endswith(("weight_zero_point", "weight_packed")) for k in t)
    assert t["model.layers.1.mlp.gate.weight"][0] == "bfloat16"  # the router stays BF16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "float32"
    assert rep["scheme"]["input_activations"] == {"type": "int", "bits": 8, "strategy": "token", "dynamic": True,
                                                  "symmetric": True, "group_size": None}
    r = run_cli("inspect", out, "--json")
    assert r.rc == 0, r
    qi = r.json()["quantization"]
    assert (qi["format"], qi["compression_format"], qi["scheme"]) == ("compressed-tensors", "int-quantized", "W8A8")
    assert qi["quantized_modules"] == rep["plan"]["quantized_modules"] and qi["kept_linear_modules"] == 0
    # bits per weight: int8 payload plus one bf16 scale per row of K elements
    assert qi["bits_per_weight"] == rep["plan"]["bits_per_weight_quantized"]
    assert 8 < qi["bits_per_weight"] < 8.25


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_fp8_block_inspect_and_dry_run_sizes(ct_outputs, tiny_src):
    out, rep = ct_outputs["FP8_BLOCK"]
    r = run_cli("inspect", out, "--json")
    qi = r.json()["quantization"]
    assert (qi["compression_format"], qi["scheme"], qi["weights"]["block"]) == ("float-quantized", "FP8_BLOCK",
                                                                                [128, 128])
    assert r.json()["format"] == "compressed-tensors"  # its F8_E4M3 tensors are not DeepSeek FP8 weights
    for key in ("W8A8", "FP8_BLOCK"):
        o, full = ct_outputs[key]
        dry = run_cli("quantize", tiny_src, "--dry-run", "--json", "--scheme", key)
        assert dry.rc == 0, dry
        on_disk = sum(len(raw) for _, _, raw, _ in read_tensors(o).values())
        assert dry.json()["plan"]["bytes_written"]["bytes"] == on_disk == read_index(o)["metadata"]["total_size"]


@pytest.mark.parametrize("key,max_kld", [("W8A8", 0.1), ("W8A8_gptq", 0.1), ("FP8_BLOCK", 0.1)])
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_validate_reads_new_outputs(ct_outputs, tiny_src, key, max_kld):
    out, _ = ct_outputs[key]
    r = run_cli("validate", out, "--reference", tiny_src, "--json", "--max-kld", max_kld, "--min-top1", 0.5)
    assert r.rc == 0, r
    rep = r.json()
    assert rep["passed"] and 0 < rep["mean_kld"] < max_kld


# --- refusals: exit 2 before anything is written, naming the module -------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--scheme", "FP8_BLOCK", "--format", "awq"], "cannot store scheme FP8_BLOCK for module model.layers."),
    (["--scheme", "W8A8", "--format", "gptq"], "cannot store scheme W8A8 for module model.layers."),
    (["--scheme", "W8A8", "--format", "deepseek-fp8"], "cannot store scheme W8A8 for module model.layers."),
    (["--scheme", "W4A16", "--format", "deepseek-fp8"], "cannot store scheme W4A16 for module model.layers."),
    (["--scheme", "FP8_BLOCK", "--scale-fmt", "ue8m0"], "power-of-two (ue8m0) scales for module model.layers."),
    (["--scheme", "FP8_BLOCK", "--gptq"], "cannot be produced with --gptq"),
    (["--scheme", "W8A8", "--awq"], "cannot be produced with --awq"),
    (["--scheme", "W8A8", "--group-size", "64"], "per output channel"),
    (["--scheme", "FP8_BLOCK", "--group-size", "64"], "128x128 blocks"),
    (["--scheme", "W4A16", "--scale-fmt", "ue8m0"], "no scale_fmt option"),
    (["--scheme", "FP8_BLOCK", "--format", "deepseek-fp8", "--scale-fmt", "e5m2"], "not a scale format"),
])
def test_unstorable_scheme_exits_2_before_writing(tiny_src, tmp_path, args, needle):
    out = tmp_path / "out"
    r = run_cli("quantize", tiny_src, "-o", out, *args)
    assert r.rc == 2, r
    assert needle in " ".join(r.stderr.split()), r
    assert not out.exists()


# --- DeepSeek's native layout ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_master_release(tmp_path_factory) -> Path:
    from dsconvert.testing.fixtures import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("rel") / "src", "tiny", bf16_masters=True)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_release_bf16_fp8_round_trip_gives_release_bytes(bf16_master_release, tmp_path):
    src = bf16_master_release
    bf16, back = tmp_path / "bf16", tmp_path / "fp8"
    assert run_cli("fp8-to-bf16", src, "-o", bf16).rc == 0
    r = run_cli("bf16-to-fp8", bf16, "-o", back, "--json")
    assert r.rc == 0, r
    want, got = read_tensors(src), read_tensors(back)
    assert sorted(want) == sorted(got)
    bad = [n for n in want if want[n][:3] != got[n][:3]]
    assert not bad, f"{len(bad)}/{len(want)} tensors differ, e.g. {bad[:3]}"
    assert sum(1 for v in got.values() if v[0] == "float8_e4m3fn") == r.json()["plan"]["quantized_modules"]
    cfg_src = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((back / "config.json").read_text())
    assert cfg_out["quantization_config"] == cfg_src["quantization_config"]
    assert cfg_out["torch_dtype"] == "bfloat16"
    # the same from the FP8 release directly: its payload is dequantized and re-derived, giving the same bytes
    direct = tmp_path / "direct"
    assert run_cli("quantize", src, "-o", direct, "--scheme", "FP8_BLOCK", "--format", "deepseek-fp8").rc == 0
    assert {n: v[:3] for n, v in read_tensors(direct).items()} == {n: v[:3] for n, v in want.items()}
    # inspect sees DeepSeek's layout as FP8_BLOCK in deepseek-fp8
    qi = run_cli("inspect", back, "--json").json()["quantization"]
    assert (qi["format"], qi["scheme"], qi["quantized_modules"]) == ("deepseek-fp8", "FP8_BLOCK",
                                                                      r.json()["plan"]["quantized_modules"])


def test_fp32_master_release_payload_round_trips(tiny_src, tmp_path):
    """A release quantized from float32 masters (the tiny fixture): the payload comes back exactly; scales are
    re-derived from the BF16 weights (within 2^-8 relative), never copied under a different payload."""
    out = tmp_path / "fp8"
    assert run_cli("quantize", tiny_src, "-o", out, "--scheme", "FP8_BLOCK", "--format", "deepseek-fp8").rc == 0
    want, got = _tensors(tiny_src), _tensors(out)
    for n, t in want.items():
        if n.endswith(SCALE):
            assert float(((got[n] - t) / t).abs().max()) <= 2 ** -8, n
        elif t.dtype == torch.float8_e4m3fn:
            assert torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), n
        else:
            assert torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), n


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_ue8m0_requantizes_payload_under_the_rounded_scale(tiny_src, tmp_path):
    out = tmp_path / "ue8m0"
    r = run_cli("bf16-to-fp8", tiny_src, "-o", out, "--scale-fmt", "ue8m0", "--json")
    assert r.rc == 0, r
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                  "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    from dsconvert.convert.weights import CheckpointWeightSource

    ref = CheckpointWeightSource(tiny_src)  # the source's BF16 weights (fp8-to-bf16 rule)
    got = _tensors(out)
    n_checked = 0
    for n, s in got.items():
        if not n.endswith(SCALE):
            continue
        w = n[: -len(SCALE) - 1] + ".weight"
        x = ref.get(w).float()
        m, e = torch.frexp(s)
        assert bool((m == 0.5).all()), f"{n}: not a power of two"
        # the smallest power of two >= amax / 448 of each zero-padded block
        gm, gn = s.shape
        pad = torch.zeros(gm * 128, gn * 128)
        pad[: x.shape[0], : x.shape[1]] = x
        amax = pad.view(gm, 128, gn, 128).abs().amax(dim=(1, 3))
        assert bool((s >= amax / FP8_E4M3_MAX).all()) and bool((s / 2 < amax / FP8_E4M3_MAX).all()), n
        # the payload is e4m3(w / s) under the stored scale: decoded by the table, every element is within half an
        # e4m3 step of the source (a scale rounded under the source's payload would be off by up to 2x)
        deq = dequant_fp8_block_reference(got[w], s, out_dtype=torch.float32)
        ok = (deq - x).abs() <= x.abs() * 2 ** -4 + s.repeat_interleave(128, 0).repeat_interleave(128, 1)[
            : x.shape[0], : x.shape[1]] * 2 ** -9
        assert bool(ok.all()), n
        n_checked += 1
    assert n_checked == r.json()["plan"]["quantized_modules"]
    v = run_cli("validate", out, "--reference", tiny_src, "--json", "--max-kld", 0.1, "--min-top1", 0.5)
    assert v.rc == 0, v


@pytest.mark.slow
def test_transformers_loads_deepseek_fp8_output(tmp_path):
    """transformers' fine-grained FP8 loader (dequantizing on CPU) reads our output: no missing keys, its weights
    are the stored payload times the stored scales, its logits match those of the source release it loads the same way.

    The fixture's widths are multiples of 128 or at most 128: transformers' CPU dequantizer derives the block from
    the scale grid (shape / grid), which is only DeepSeek's 128 when every partial block is a whole dimension.
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path / "src", "tiny", hidden_size=256, intermediate_size=256, qk_nope_head_dim=48,
                           qk_rope_head_dim=16, v_head_dim=16)
    bf16, out = tmp_path / "bf16", tmp_path / "fp8"
    assert run_cli("fp8-to-bf16", src, "-o", bf16).rc == 0
    assert run_cli("bf16-to-fp8", bf16, "-o", out).rc == 0
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    ids = torch.tensor([[0, 5, 17, 100, 300, 2, 511, 42, 7, 256]])
    logits = {}
    for key, d in (("src", src), ("out", out)):
        model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                         output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        assert all(k.startswith(f"model.layers.{n_layers}.") for k in info["unexpected_keys"])
        if key == "out":  # its float32 weights are float32(q) * scale_inv, as the table decoder computes them
            stored = _tensors(out)
            checked = 0
            for name, p in model.state_dict().items():
                if name + "_scale_inv" in stored:
                    want = dequant_fp8_block_reference(stored[name], stored[name + "_scale_inv"],
                                                       out_dtype=torch.float32)
                    assert torch.equal(p, want), name
                    checked += 1
            assert checked > 0
        with torch.no_grad():
            logits[key] = model.eval()(ids).logits.float()
    lp, lq = torch.log_softmax(logits["src"], -1), torch.log_softmax(logits["out"], -1)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert torch.isfinite(logits["out"]).all() and kld < 1e-2, kld
    assert bool((logits["src"].argmax(-1) == logits["out"].argmax(-1)).float().mean() >= 0.9)
