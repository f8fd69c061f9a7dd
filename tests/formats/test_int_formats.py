"""On-disk integer formats (dsconvert.formats.{compressed_tensors,autoawq,gptq,registry}).

compressed-tensors is checked against the installed library itself (its decompressor and its config
writer); AWQ and GPTQ against slow per-element unpackers written here from the reference doc.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsconvert.errors import ShapeError, UnsupportedError, UsageError
from dsconvert.formats.autoawq import check_modules_to_not_convert
from dsconvert.formats.registry import FORMATS, detect_format, get_format, register_format, registered_formats
from dsconvert.quant.rtn import QuantSpec, dequantize, quantize

U32 = 0xFFFFFFFF
W4A16 = QuantSpec(4, 128, True)
W4A16_ASYM = QuantSpec(4, 128, False)
W8A16 = QuantSpec(8, 128, True)
W8A16_CH = QuantSpec(8, -1, True)

FORMAT_SPECS = [
    ("compressed-tensors", W4A16), ("compressed-tensors", W4A16_ASYM), ("compressed-tensors", W8A16),
    ("compressed-tensors", W8A16_CH), ("compressed-tensors", QuantSpec(4, -1, False)),
    ("autoawq", W4A16_ASYM), ("autoawq", W4A16), ("autoawq", QuantSpec(4, 64, False)),
    ("gptq", W4A16), ("gptq", W8A16), ("gptq", QuantSpec(4, -1, True)),
    ("gptq_v2", W4A16), ("gptq_v2", W4A16_ASYM), ("gptq_v2", QuantSpec(8, 128, False)),
]
IDS = [f"{f}-{s.bits}b-g{s.group_size}-{'sym' if s.symmetric else 'asym'}" for f, s in FORMAT_SPECS]


def weight(n, k, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(dtype)


# ---------------------------------------------------------------------------------------------
# common contract: plan == encode, decode == RTN dequant rounded to the scale dtype
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_name,spec", FORMAT_SPECS, ids=IDS)
def test_plan_matches_encode_and_decode_matches_rtn(fmt_name, spec):
    fmt = get_format(fmt_name)
    prefix = "model.layers.3.mlp.experts.7.down_proj"
    w = weight(64, 256)
    enc = fmt.encode(prefix, w, spec)
    plan = fmt.plan(prefix, (64, 256), spec)
    assert [(p.name, p.dtype, p.shape) for p in plan] == [(k, v.dtype, tuple(v.shape)) for k, v in enc.items()]
    assert sum(p.nbytes for p in plan) == sum(v.numel() * v.element_size() for v in enc.values())
    assert set(fmt.tensor_names(prefix, spec)) == set(enc)
    assert set(fmt.tensor_names(prefix)) >= set(enc)
    qt = quantize(w, spec, fmt.convention)
    want = dequantize(qt, out_dtype=fmt.convention.scale_dtype).float()
    suffixed = {k.rsplit(".", 1)[-1]: v for k, v in enc.items()}
    assert torch.equal(fmt.decode(suffixed, spec), want)
    assert torch.equal(fmt.decode(enc, fmt.quantization_config(spec)), want)  # config instead of spec


@pytest.mark.parametrize("fmt_name", ["compressed-tensors", "autoawq", "gptq", "gptq_v2"])
def test_kv_b_proj_like_round_trip(fmt_name):
    # kv_b_proj is 512 -> 32768 in DeepSeek-V3 (4 groups along K); 512 rows keep the test fast.
    fmt = get_format(fmt_name)
    spec = W4A16_ASYM if fmt_name in ("autoawq", "gptq_v2") else W4A16
    w = weight(512, 512, seed=11)
    prefix = "model.layers.0.self_attn.kv_b_proj"
    enc = fmt.encode(prefix, w, spec)
    deq = fmt.decode(enc, spec)
    assert deq.shape == (512, 512) and deq.dtype == torch.float32
    qt = quantize(w, spec, fmt.convention)
    s = qt.scale.repeat_interleave(128, dim=1)
    # |w - deq| <= (1/2 + storage rounding of the scale) step, plus the final rounding to the scale dtype
    u = 2.0 ** -8 if fmt.convention.scale_dtype == torch.bfloat16 else 2.0 ** -11
    bound = s * (0.5 + 16 * u) + deq.abs() * u
    assert ((w.float() - deq).abs() <= bound + 1e-12).all()
    rel = ((w.float() - deq).norm() / w.float().norm()).item()
    assert rel < 0.12  # int4 g128 on Gaussian weights: ~0.1


# ---------------------------------------------------------------------------------------------
# compressed-tensors: the library reads our tensors + our config
# ---------------------------------------------------------------------------------------------
ct_lib = pytest.importorskip("compressed_tensors")


def library_decompress(cfg: dict, tensors: dict) -> torch.Tensor:
    """Decompress one module with compressed-tensors' own API, config parsed the way transformers does."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from transformers.utils.quantization_config import CompressedTensorsConfig

    mc = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(json.loads(json.dumps(cfg))))
    qc = mc.quantization_config
    scheme = qc.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    names = compressor.compression_param_names(scheme)
    assert set(names) == set(tensors), (names, list(tensors))
    return compressor.decompress(dict(tensors), scheme)["weight"]


def assert_library_reads_modules(out, modules) -> None:
    """Every module of ``modules`` in the compressed-tensors checkpoint ``out``: compressed-tensors' own
    decompression equals what dsconvert reads back (``CheckpointWeightSource``)."""
    from safetensors import safe_open

    from dsconvert.convert.weights import CheckpointWeightSource

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ours = CheckpointWeightSource(out)
    for name in modules:
        state = {}
        for shard in out.glob("model-*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                state.update({k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")})
        assert state, f"{name} not written"
        assert torch.equal(library_decompress(cfg, state).float(), ours.get(name + ".weight").float()), name


@pytest.mark.parametrize("spec", [W4A16, W4A16_ASYM, W8A16, W8A16_CH, QuantSpec(4, 32, False)],
                         ids=["W4A16", "W4A16_ASYM", "W8A16", "W8A16-channel", "W4A16_ASYM-g32"])
def test_compressed_tensors_library_decompress_is_bit_equal(spec):
    fmt = get_format("compressed-tensors")
    w = weight(72, 384, seed=3)  # N = 72: zero points pack 9 rows per word column, ragged
    enc = fmt.encode("", w, spec)
    cfg = fmt.quantization_config(spec, ignore=["lm_head"])
    lib = library_decompress(cfg, enc)
    assert lib.dtype == torch.bfloat16 and lib.shape == (72, 384)
    ours = fmt.decode(enc, spec)
    assert torch.equal(lib.float(), ours)


def library_written_config(weights_kwargs: dict, ignore: list[str], tmp_path) -> dict:
    """What ModelCompressor.update_config writes for a pack-quantized model (llm-compressor's save path)."""
    from compressed_tensors.compressors.model_compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights_kwargs),
                                format="pack-quantized")
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                            quantization_status="compressed", ignore=ignore)
    ModelCompressor(quantization_config=qc).update_config(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("preset,spec", [("W4A16", W4A16), ("W4A16_ASYM", W4A16_ASYM), ("W8A16", W8A16)])
def test_compressed_tensors_config_equals_library(preset, spec, tmp_path):
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    fmt = get_format("compressed-tensors")
    ignore = ["lm_head", "re:.*mlp\\.gate$"]
    ours = json.loads(json.dumps(fmt.quantization_config(spec, ignore)))
    # the preset's weight args are what llm-compressor writes for this scheme name
    assert preset_name_to_scheme(preset, ["Linear"]).weights.model_dump() == ours["config_groups"]["group_0"]["weights"]
    lib = library_written_config(dict(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                                      strategy="group", group_size=spec.group_size, dynamic=False),
                                 ignore, tmp_path)
    assert {**lib, "version": None} == {**ours, "version": None}
    assert ours["version"] == "0.20.1"


def test_compressed_tensors_channel_config_equals_library(tmp_path):
    fmt = get_format("compressed-tensors")
    ours = json.loads(json.dumps(fmt.quantization_config(W8A16_CH, [])))
    lib = library_written_config(dict(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
                                 [], tmp_path)
    assert {**lib, "version": None} == {**ours, "version": None}


def test_compressed_tensors_tensor_layout():
    fmt = get_format("ct")
    enc = fmt.encode("m", weight(72, 256), W4A16_ASYM)
    assert enc["m.weight_packed"].shape == (72, 32) and enc["m.weight_packed"].dtype == torch.int32
    assert enc["m.weight_scale"].shape == (72, 2) and enc["m.weight_scale"].dtype == torch.bfloat16
    assert enc["m.weight_shape"].tolist() == [72, 256] and enc["m.weight_shape"].dtype == torch.int64
    assert enc["m.weight_zero_point"].shape == (9, 2) and enc["m.weight_zero_point"].dtype == torch.int32
    assert "m.weight_zero_point" not in fmt.encode("m", weight(72, 256), W4A16)


# ---------------------------------------------------------------------------------------------
# AutoAWQ GEMM against a slow per-element reader
# ---------------------------------------------------------------------------------------------
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column AWQ_ORDER[i]


def awq_reference_decode(qweight, qzeros, scales, g):
    k, n8 = qweight.shape
    n = n8 * 8
    out = torch.empty(n, k, dtype=torch.float32)
    qw, qz, sc = qweight.tolist(), qzeros.tolist(), scales.float().tolist()
    for kk in range(k):
        for nn in range(n):
            nib = AWQ_ORDER.index(nn % 8)
            q = ((qw[kk][nn // 8] & U32) >> (4 * nib)) & 0xF
            z = ((qz[kk // g][nn // 8] & U32) >> (4 * nib)) & 0xF
            val = torch.tensor((q - z) * sc[kk // g][nn], dtype=torch.float32).to(torch.float16)
            out[nn, kk] = val.float()
    return out


@pytest.mark.parametrize("spec", [W4A16_ASYM, QuantSpec(4, 32, True)], ids=["asym-g128", "sym-g32"])
def test_awq_decode_matches_reference(spec):
    fmt = get_format("awq")
    w = weight(16, 128, seed=5, dtype=torch.float32)
    enc = fmt.encode("", w, spec)
    assert enc["qweight"].shape == (128, 2) and enc["qzeros"].shape == (128 // spec.group_size, 2)
    assert enc["scales"].shape == (128 // spec.group_size, 16) and enc["scales"].dtype == torch.float16
    ref = awq_reference_decode(enc["qweight"], enc["qzeros"], enc["scales"], spec.group_size)
    assert torch.equal(fmt.decode(enc, spec), ref)
    if spec.symmetric:  # symmetric is stored with zero 8 in every nibble
        assert {v & U32 for v in enc["qzeros"].flatten().tolist()} == {0x88888888}


def test_awq_rejects_8bit_and_bad_shapes():
    fmt = get_format("autoawq")
    with pytest.raises(UsageError, match="4-bit"):
        fmt.supports(W8A16)
    with pytest.raises(UsageError):
        fmt.encode("x", weight(16, 128), W8A16)
    with pytest.raises(ShapeError):
        fmt.plan("x", (12, 128), W4A16_ASYM)  # N not a multiple of 8
    with pytest.raises(ShapeError):
        fmt.plan("x", (16, 10944), W4A16_ASYM)


def test_awq_config_and_modules_to_not_convert():
    fmt = get_format("awq")
    assert fmt.quantization_config(W4A16_ASYM) == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }
    modules = ["model.layers.1.mlp.gate", "model.layers.1.mlp.gate_proj", "model.layers.10.mlp.down_proj",
               "model.layers.1.mlp.down_proj", "lm_head"]
    with pytest.raises(UsageError, match="gate_proj"):
        check_modules_to_not_convert(["model.layers.1.mlp.gate"], modules)
    with pytest.raises(UsageError, match="layers.10"):  # "layers.1" is a substring of "layers.10"
        fmt.quantization_config(W4A16_ASYM, ["model.layers.1"], module_names=["model.layers.10.mlp.down_proj"])
    with pytest.raises(UsageError):
        fmt.quantization_config(W4A16_ASYM, ["lm_head"])  # no module names to check against
    cfg = fmt.quantization_config(W4A16_ASYM, ["lm_head"], module_names=modules)
    assert cfg["modules_to_not_convert"] == ["lm_head"]


# ---------------------------------------------------------------------------------------------
# GPTQ against a slow per-element reader
# ---------------------------------------------------------------------------------------------
def gptq_reference_decode(qweight, qzeros, scales, g_idx, bits, v1):
    per = 32 // bits
    mask = (1 << bits) - 1
    k = qweight.shape[0] * per
    n = qweight.shape[1]
    qw, qz, sc, gi = qweight.tolist(), qzeros.tolist(), scales.float().tolist(), g_idx.tolist()
    out = torch.empty(n, k, dtype=torch.float32)
    for kk in range(k):
        grp = gi[kk]
        for nn in range(n):
            q = ((qw[kk // per][nn] & U32) >> (bits * (kk % per))) & mask
            z = ((qz[grp][nn // per] & U32) >> (bits * (nn % per))) & mask
            if v1:
                z += 1
            val = torch.tensor((q - z) * sc[grp][nn], dtype=torch.float32).to(torch.float16)
            out[nn, kk] = val.float()
    return out


@pytest.mark.parametrize("fmt_name,spec", [("gptq", W4A16), ("gptq", QuantSpec(8, 32, True)),
                                           ("gptq_v2", W4A16_ASYM), ("gptq_v2", QuantSpec(8, 64, False))],
                         ids=["v1-4b", "v1-8b-g32", "v2-4b-asym", "v2-8b-asym-g64"])
def test_gptq_decode_matches_reference(fmt_name, spec):
    fmt = get_format(fmt_name)
    w = weight(16, 128, seed=6, dtype=torch.float32)
    enc = fmt.encode("", w, spec)
    ref = gptq_reference_decode(enc["qweight"], enc["qzeros"], enc["scales"], enc["g_idx"], spec.bits,
                                v1=fmt_name == "gptq")
    assert torch.equal(fmt.decode(enc, spec), ref)


def test_gptq_decode_honours_permuted_g_idx():
    fmt = get_format("gptq")
    enc = fmt.encode("", weight(16, 256, seed=7), W4A16)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    enc["g_idx"] = enc["g_idx"][perm].contiguous()  # act-order style (values are still valid groups)
    ref = gptq_reference_decode(enc["qweight"], enc["qzeros"], enc["scales"], enc["g_idx"], 4, v1=True)
    assert torch.equal(fmt.decode(enc, W4A16), ref)


def test_gptq_v1_shapes_and_golden_qzeros():
    fmt = get_format("gptq")
    enc = fmt.encode("", weight(64, 256), W4A16)  # the reference doc's K = 256, N = 64, g = 128 example
    assert enc["qweight"].shape == (32, 64) and enc["qzeros"].shape == (2, 8)
    assert enc["scales"].shape == (2, 64) and enc["scales"].dtype == torch.float16
    assert enc["g_idx"].shape == (256,) and enc["g_idx"].dtype == torch.int32
    assert enc["g_idx"].tolist() == [i // 128 for i in range(256)]
    assert {v & U32 for v in enc["qzeros"].flatten().tolist()} == {0x77777777}


def test_gptq_v1_refuses_asymmetric_and_config_keys():
    v1, v2 = get_format("gptq"), get_format("gptq_v2")
    with pytest.raises(UsageError) as ei:
        v1.supports(W4A16_ASYM)
    assert "gptq_v2" in ei.value.hint
    cfg = v1.quantization_config(W4A16)
    assert cfg == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                   "checkpoint_format": "gptq", "static_groups": False, "true_sequential": True,
                   "damp_percent": 0.01, "lm_head": False, "pack_dtype": "int32"}
    cfg2 = v2.quantization_config(W4A16_ASYM, ["model.layers.3.mlp.gate"])
    assert cfg2["checkpoint_format"] == "gptq_v2" and cfg2["sym"] is False
    assert cfg2["dynamic"] == {r"-:^model\.layers\.3\.mlp\.gate$": {}}
    with pytest.raises(ShapeError):
        v1.plan("x", (12, 128), W4A16)  # N * 4 bits not a whole number of words


# ---------------------------------------------------------------------------------------------
# registry and detection
# ---------------------------------------------------------------------------------------------
def test_format_registry():
    assert registered_formats() == ["autoawq", "compressed-tensors", "deepseek-fp8", "gptq", "gptq_v2"]
    assert type(get_format("Pack_Quantized")).__name__ == "CompressedTensorsFormat"
    assert type(get_format("AWQ")).__name__ == "AutoAWQFormat"
    assert get_format("GPTQ V2").checkpoint_format == "gptq_v2"
    with pytest.raises(KeyError) as ei:
        get_format("gguf-int4")
    for n in ("autoawq", "compressed-tensors", "gptq", "gptq_v2", "awq", "ct"):
        assert n in str(ei.value)
    with pytest.raises(ValueError):
        @register_format("compressed_tensors")
        class Dup:  # noqa: F841
            pass
    assert len(FORMATS) == 5


@pytest.mark.parametrize("fmt_name,spec", [("compressed-tensors", W4A16), ("compressed-tensors", W8A16_CH),
                                           ("autoawq", W4A16_ASYM), ("gptq", W4A16), ("gptq_v2", W4A16_ASYM)])
def test_detect_round_trip(fmt_name, spec):
    fmt = get_format(fmt_name)
    cfg = json.loads(json.dumps(fmt.quantization_config(spec)))
    found = detect_format(cfg)
    assert found is not None and found.name == fmt_name
    read = found.spec_from_config(cfg)
    assert (read.bits, read.group_size) == (spec.bits, spec.group_size)
    if fmt_name != "autoawq":  # AWQ always stores zero points
        assert read.symmetric == spec.symmetric


def test_detect_foreign_and_legacy_configs():
    ds = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert detect_format(ds).name == "deepseek-fp8"
    legacy_awq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM", "zero_point": True}
    f = detect_format(legacy_awq)
    assert f.name == "autoawq" and f.spec_from_config(legacy_awq).group_size == 64
    assert detect_format({"quant_method": "awq", "bits": 4, "version": "gemv"}) is None
    assert detect_format({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True}).name == "gptq"
    assert detect_format({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}) is None
    # float-quantized is a compressed-tensors codec now; the pack-quantized codec still refuses its config
    fp8_ct = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "config_groups": {"group_0": {"weights": {"type": "float", "num_bits": 8}}}}
    assert detect_format(fp8_ct).name == "compressed-tensors"
    with pytest.raises(UnsupportedError):
        get_format("compressed-tensors").spec_from_config(fp8_ct)
    mxfp = {"quant_method": "compressed-tensors", "format": "mxfp8-quantized",
            "config_groups": {"group_0": {"weights": {"type": "float", "num_bits": 8}}}}
    assert detect_format(mxfp) is None
