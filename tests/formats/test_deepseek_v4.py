"""DeepSeek-V4: the release-layout fixture writer, the e2m1/e8m0/e4m3 kernels, reading and converting.

Oracles: transformers' ``DeepseekV4ForCausalLM.from_pretrained`` (its own FP8/FP4 decoder in
``integrations/finegrained_fp8.py``) and an independent numpy decoder written here from the format definitions
(docs/checkpoint-layout.md §13), bit by bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dsconvert.formats import deepseek_v4 as v4


# -- an independent numpy decoder (format definitions only) ------------------------------------------------------

def np_e8m0(b: np.ndarray) -> np.ndarray:
    """e8m0 byte -> float32: 2**(b-127), computed in float64 (exact) and narrowed (exact: powers of two >= 2**-149)."""
    with np.errstate(over="ignore"):
        out = np.power(2.0, b.astype(np.float64) - 127.0).astype(np.float32)
    out[b == 255] = np.nan
    return out


def np_e4m3(b: np.ndarray) -> np.ndarray:
    """e4m3fn byte -> float32: sign bit 7, exponent bits 6-3 (bias 7), mantissa bits 2-0; exponent 0 subnormal;
    0x7F/0xFF NaN."""
    b = b.astype(np.int64)
    s = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = b & 0x7
    v = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * np.power(2.0, e - 7.0))
    v = (s * v).astype(np.float32)
    v[(b & 0x7F) == 0x7F] = np.nan
    return v


def np_e2m1(c: np.ndarray) -> np.ndarray:
    """4-bit e2m1 code -> float32: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 subnormal."""
    c = c.astype(np.int64)
    e = (c >> 1) & 3
    m = c & 1
    v = np.where(e == 0, m * 0.5, (1 + m / 2.0) * np.power(2.0, e - 1.0))
    return np.where(c & 8, -v, v).astype(np.float32)


def np_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


def np_dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[M, N/2] bytes (element 2j low nibble) + [M, N/32] e8m0 -> float32 [M, N]."""
    u = packed.view(np.uint8)
    m = u.shape[0]
    codes = np.stack([u & 0xF, u >> 4], axis=-1).reshape(m, -1)
    s = np.repeat(np_e8m0(scale.view(np.uint8)), 32, axis=1)
    with np.errstate(over="ignore"):
        return np_e2m1(codes) * s  # float32 * float32: one IEEE multiply


def np_dequant_fp8(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[M, N] e4m3 bytes + [ceil(M/128), ceil(N/128)] e8m0 bytes (or float32 multipliers) -> float32 [M, N]."""
    m, n = w.shape
    s = scale if scale.dtype == np.float32 else np_e8m0(scale.view(np.uint8))
    s = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:m, :n]
    with np.errstate(over="ignore"):
        return np_e4m3(w.view(np.uint8)) * s


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy() if t.element_size() == 1 else t.numpy()


# -- kernels -----------------------------------------------------------------------------------------------------

def test_e8m0_decode_every_byte():
    from dsconvert.quant.fp4_decode import e8m0_to_float32

    b = torch.arange(256, dtype=torch.uint8)
    got = e8m0_to_float32(b).numpy()
    want = np_e8m0(b.numpy())
    assert np.array_equal(got.view(np.uint32)[:255], want.view(np.uint32)[:255])
    assert np.isnan(got[255])
    # torch's own float8_e8m0fnu cast agrees on every finite byte
    assert torch.equal(e8m0_to_float32(b)[:255], b.view(torch.float8_e8m0fnu).float()[:255])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp4_dequant_rounding_rule_every_code_and_extreme_scales(out_dtype):
    """Every byte (two codes) against scales from 2**-127 to 2**127: float32 product then one RNE cast, bit for bit
    (exact in the normal range, IEEE gradual underflow below it, inf on overflow)."""
    from dsconvert.quant.fp4_decode import dequant_fp4

    scales = np.array([0, 1, 2, 3, 100, 120, 127, 140, 200, 250, 253, 254], dtype=np.uint8)
    packed = np.tile(np.arange(256, dtype=np.uint8), (len(scales), 1)).reshape(len(scales), 256)  # N = 512
    scale = np.repeat(scales[:, None], 512 // 32, axis=1)
    got = dequant_fp4(torch.from_numpy(packed.view(np.int8)), torch.from_numpy(scale).view(torch.float8_e8m0fnu),
                      out_dtype)
    ref = np_dequant_fp4(packed, scale)
    if out_dtype == torch.bfloat16:
        assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), np_bf16_bits(ref))
    else:
        assert np.array_equal(got.numpy().view(np.uint32), ref.view(np.uint32))
    # in the normal range the BF16 result is exact: it equals the float64 product
    mid = (scales > 20) & (scales < 230)
    exact = np.repeat(np_e8m0(scales)[:, None].astype(np.float64), 512, 1) * np.asarray(
        np_e2m1(np.stack([packed & 0xF, packed >> 4], -1).reshape(len(scales), -1)), np.float64)
    assert np.array_equal(got.float().numpy()[mid].astype(np.float64), exact[mid])


def test_fp4_bf16_bit_path_equals_rule_in_normal_range():
    """The BF16 fast path (bits built from a table + exponent shift, taken when every scale byte is in [2, 250])
    gives the rule's bytes: every byte value under random scales spanning that whole range, and the boundary."""
    from dsconvert.quant.fp4_decode import dequant_fp4

    g = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (64, 256), generator=g, dtype=torch.int32).to(torch.uint8)
    packed[0] = torch.arange(256, dtype=torch.uint8)
    scale = torch.randint(2, 251, (64, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scale[0, :2] = torch.tensor([2, 250], dtype=torch.uint8)
    got = dequant_fp4(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu))
    ref = np_dequant_fp4(packed.numpy(), scale.numpy())
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), np_bf16_bits(ref))
    # the float32 path (forced through a float32 scale grid) agrees byte for byte
    slow = dequant_fp4(packed.view(torch.int8), scale.view(torch.float8_e8m0fnu).float())
    assert torch.equal(slow.view(torch.int16), got.view(torch.int16))


def test_fp8_e8m0_dequant_matches_numpy_every_byte_partial_blocks():
    """FP8 e4m3 with e8m0 block scales through dsconvert's fast CPU kernel, on a 200x300 weight (partial blocks on
    both axes) holding every byte value, against the numpy decoder + RNE."""
    from dsconvert.quant.fp4_decode import e8m0_grid_to_float32
    from dsconvert.quant.fp8_block import dequant_fp8_block

    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (200, 300), generator=g, dtype=torch.int32).to(torch.uint8)
    w.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    w[w == 0x7F] = 0x7E
    w[w == 0xFF] = 0xFE
    sb = torch.tensor([[1, 127, 140], [200, 254, 60]], dtype=torch.uint8)
    got = dequant_fp8_block(w.view(torch.float8_e4m3fn), e8m0_grid_to_float32(sb), (128, 128), torch.bfloat16)
    ref = np_dequant_fp8(w.numpy(), sb.numpy())
    assert np.array_equal(got.view(torch.int16).numpy().view(np.uint16), np_bf16_bits(ref))


def test_quantizers_round_trip_within_format():
    """The fixture's FP4/FP8 encoders pick power-of-two scales that keep every value in range."""
    from dsconvert.quant.fp4_decode import dequant_fp4, e8m0_grid_to_float32, quantize_fp4, quantize_fp8_e8m0
    from dsconvert.quant.fp8_block import dequant_fp8_block

    w = torch.randn(130, 96, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp4(w)
    assert q.shape == (130, 48) and s.shape == (130, 3) and s.dtype == torch.float8_e8m0fnu
    d = dequant_fp4(q, s, torch.float32)
    amax = w.view(130, 3, 32).abs().amax(-1, keepdim=True)
    # amax / scale lies in (3, 6], where e2m1 levels are 2 apart: the error is at most one scale, a third of amax
    assert float(((d - w).view(130, 3, 32).abs() / amax).max()) <= 1 / 3 + 1e-6
    q8, s8 = quantize_fp8_e8m0(w)
    d8 = dequant_fp8_block(q8, e8m0_grid_to_float32(s8), (128, 128), torch.float32)
    assert float((d8 - w).abs().max()) <= float(w.abs().max()) * 2 ** -3


# -- the fixture writer, checked by transformers ------------------------------------------------------------------

def _expected(src):
    return v4.geometry(json.loads((src / "config.json").read_text()))


@pytest.mark.parametrize("which", ["v4_src", "v4_base_src"])
def test_fixture_release_layout(which, request):
    src = request.getfixturevalue(which)
    g = _expected(src)
    heads = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                heads[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    assert not any(k.startswith("model.") for k in heads)
    assert heads["layers.0.attn.wq_a.weight"] == ("F8_E4M3", (128, 256))
    assert heads["layers.0.attn.wq_a.scale"] == ("F8_E8M0", (1, 2))
    assert heads["layers.0.ffn.gate.tid2eid"] == ("I64", (512, 2))
    assert "layers.0.ffn.gate.bias" not in heads and heads["layers.2.ffn.gate.bias"] == ("F32", (8,))
    assert heads["layers.1.attn.compressor.ape"] == ("F32", (4, 256))  # CSA: overlap doubles the width
    assert heads["layers.2.attn.compressor.ape"] == ("F32", (128, 128))  # HCA
    assert "layers.2.attn.indexer.wq_b.weight" not in heads and "layers.0.attn.compressor.wkv.weight" not in heads
    assert heads["layers.0.hc_attn_fn"] == ("F32", (24, 1024)) and heads["layers.0.attn.attn_sink"][0] == "F32"
    assert heads["mtp.0.e_proj.weight"][0] == "F8_E4M3" and "mtp.0.hc_head_fn" in heads
    if which == "v4_src":
        assert heads["layers.0.ffn.experts.0.w1.weight"] == ("I8", (128, 128))
        assert heads["layers.0.ffn.experts.0.w1.scale"] == ("F8_E8M0", (128, 8))
        assert heads["layers.0.ffn.experts.0.w2.scale"] == ("F8_E8M0", (256, 4))
    else:
        assert heads["layers.0.ffn.experts.0.w1.weight"] == ("F8_E4M3", (128, 256))
        assert heads["layers.0.ffn.experts.0.w1.scale"] == ("F32", (1, 2))
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0" and len(cfg["compress_ratios"]) == g.layers + g.mtp
    assert cfg["expert_dtype"] == ("fp4" if which == "v4_src" else "fp8")


@pytest.mark.parametrize("which", ["v4_src", "v4_base_src"])
def test_transformers_loads_fixture_exactly(which, request):
    """transformers' own FP8/FP4 decoder reproduces, bit for bit, the values the writer encoded (decoded here by
    numpy), with no missing or unexpected keys: the writer's names, packing, scales and config are what
    transformers reads."""
    pytest.importorskip("accelerate")
    from transformers import DeepseekV4ForCausalLM

    src = request.getfixturevalue(which)
    g = _expected(src)
    model, info = DeepseekV4ForCausalLM.from_pretrained(src, dtype=torch.float32, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}
    sd = model.state_dict()
    stored = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            stored.update({k: h.get_tensor(k) for k in h.keys()})

    def np_value(name):
        w = stored[name]
        sname = v4.scale_name(name) if name.endswith(".weight") else None
        if sname in stored:
            s = stored[sname]
            if w.dtype == torch.int8:
                return torch.from_numpy(np_dequant_fp4(_raw(w), _raw(s)))
            return torch.from_numpy(np_dequant_fp8(_raw(w), _raw(s) if s.element_size() == 1 else s.numpy()))
        return w.float() if w.dtype.is_floating_point else w

    checked = 0
    for e in v4.expected_tensors(g):
        if e.hf is not None:
            got = sd[e.hf]
            want = np_value(e.name)
            assert torch.equal(got if not want.dtype.is_floating_point else got.float(), want.to(got.dtype)), e.name
            checked += 1
    for i in range(g.layers):
        gu, dn = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], sd[f"model.layers.{i}.mlp.experts.down_proj"]
        for x in range(g.experts):
            p = f"layers.{i}.ffn.experts.{x}."
            assert torch.equal(gu[x], torch.cat([np_value(p + "w1.weight"), np_value(p + "w3.weight")])), p
            assert torch.equal(dn[x], np_value(p + "w2.weight")), p
            checked += 1
    assert checked == len([e for e in v4.expected_tensors(g) if e.hf is not None]) + g.layers * g.experts


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_make_fixture_cli(tmp_path):
    pytest.importorskip("transformers.models.deepseek_v4")
    from tests.conftest import run_cli

    r = run_cli("make-fixture", tmp_path / "a", "--arch", "v4", "--variant", "flash-base", "--no-mtp")
    assert r.rc == 0, r
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4" and cfg["expert_dtype"] == "fp8" and cfg["num_nextn_predict_layers"] == 0
    assert run_cli("make-fixture", tmp_path / "b", "--arch", "v4", "--variant", "pro").rc == 2
    assert run_cli("make-fixture", tmp_path / "c", "--variant", "flash").rc == 2


# -- reading: detection and pre-flight -----------------------------------------------------------------------------

def _copy(src, tmp_path):
    import shutil

    d = tmp_path / "src"
    shutil.copytree(src, d)
    return d


def _shard_of(src, name):
    return src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]


def _edit_shard(path, fn):
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as h:
        t = {k: h.get_tensor(k) for k in h.keys()}
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def _edit_index(src, fn):
    p = src / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


def _edit_config(src, fn):
    p = src / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _drop(name):
    def damage(src):
        _edit_shard(_shard_of(src, name), lambda t: t.pop(name))
        _edit_index(src, lambda wm: wm.pop(name))
    return damage


def _replace(name, fn):
    return lambda src: _edit_shard(_shard_of(src, name), lambda t: t.__setitem__(name, fn(t[name])))


def _nan_scale(t):
    b = t.view(torch.uint8).clone()
    b.view(-1)[3] = 255
    return b.view(torch.float8_e8m0fnu)


def _add_unknown(src):
    name = "layers.1.attn.wq_c.weight"
    shard = _shard_of(src, "layers.1.attn.wq_a.weight")
    _edit_shard(shard, lambda t: t.__setitem__(name, torch.zeros(4, 4, dtype=torch.bfloat16)))
    _edit_index(src, lambda wm: wm.__setitem__(name, shard.name))


def _v41(cfg):
    cfg["quantization_config"]["weight_block_size"] = [32, 32]


BAD_V4 = {
    "missing FP4 scale": (_drop("layers.2.ffn.experts.3.w2.scale"), "layers.2.ffn.experts.3.w2.weight"),
    "missing FP8 scale": (_drop("layers.0.attn.wkv.scale"), "layers.0.attn.wkv.weight"),
    "missing tensor": (_drop("layers.1.attn.indexer.compressor.ape"), "layers.1.attn.indexer.compressor.ape"),
    "wrong FP4 grid": (_replace("layers.0.ffn.experts.0.w1.scale", lambda t: t[:, :4].contiguous()),
                       "layers.0.ffn.experts.0.w1.scale"),
    "e8m0 NaN": (_replace("layers.3.attn.wo_b.scale", _nan_scale), "layers.3.attn.wo_b.scale"),
    "e8m0 NaN in FP4 scale": (_replace("layers.1.ffn.experts.7.w3.scale", _nan_scale),
                              "layers.1.ffn.experts.7.w3.scale"),
    "unknown tensor": (_add_unknown, "layers.1.attn.wq_c.weight"),
    "expert_dtype lies": (lambda src: _edit_config(src, lambda c: c.__setitem__("expert_dtype", "fp8")),
                          "expert_dtype"),
    "tid2eid out of range": (_replace("layers.1.ffn.gate.tid2eid", lambda t: t.index_fill(0, torch.tensor([7]), 8)),
                             "layers.1.ffn.gate.tid2eid"),
    "V4.1 32x32 blocks": (lambda src: _edit_config(src, _v41), "V4.1"),
    "V4.1 model_type": (lambda src: _edit_config(src, lambda c: c.__setitem__("model_type", "deepseek_v41")),
                        "V4.1"),
}


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_v4_bad_inputs_refused_before_writing(v4_src, tmp_path):
    """Every damaged copy: exit 3 before anything is written, the message names the tensor (or key) at fault."""
    from tests.conftest import run_many

    jobs, outs = {}, {}
    for i, (case, (damage, _)) in enumerate(BAD_V4.items()):
        d = _copy(v4_src, tmp_path / f"c{i}")
        damage(d)
        outs[case] = tmp_path / f"c{i}" / "out"
        jobs[case] = ("fp8-to-bf16", d, "-o", outs[case])
    res = run_many(jobs, parallel=2)
    for case, (_, needle) in BAD_V4.items():
        r = res[case]
        assert r.rc == 3, f"{case}: {r}"
        assert needle in r.stderr and "Traceback" not in r.stderr, f"{case}: {r}"
        assert not outs[case].exists() or not any(outs[case].glob("*.safetensors")), case


def test_v4_detected_and_header_problems_listed(v4_src):
    from dsconvert.formats.checkpoint import open_checkpoint

    ck = open_checkpoint(v4_src)
    assert ck.v4 is not None and ck.v4.expert_dtype == "fp4" and ck.problems == []
    assert ck.scale_of("layers.0.attn.wq_a.weight") == "layers.0.attn.wq_a.scale"
    assert ck.is_fp4_weight("layers.0.ffn.experts.0.w1.weight") and not ck.is_fp4_weight("layers.0.attn.wq_a.weight")
    assert ck.is_mtp("mtp.0.e_proj.weight") and not ck.is_mtp("layers.3.attn.wq_a.weight")


def test_v4_hash_layer_gate_bias_is_tolerated_and_copied(v4_src, tmp_path):
    """A hash layer's ``ffn.gate.bias`` (unused by routing) is a warning, and is copied byte for byte."""
    d = _copy(v4_src, tmp_path)
    name, shard = "layers.0.ffn.gate.bias", _shard_of(d, "layers.0.ffn.gate.weight")
    bias = torch.randn(8)
    _edit_shard(shard, lambda t: t.__setitem__(name, bias))
    _edit_index(d, lambda wm: wm.__setitem__(name, shard.name))
    from tests.conftest import read_tensors, run_cli

    r = run_cli("fp8-to-bf16", d, "-o", tmp_path / "out", "--json")
    assert r.rc == 0, r
    assert any(w.get("tensor") == name for w in r.json()["warnings"])
    assert read_tensors(tmp_path / "out")[name][2] == bias.numpy().tobytes()


# -- fp8-to-bf16 ---------------------------------------------------------------------------------------------------

def _stored(src):
    out = {}
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _check_bf16_output(src, out, mtp=True):
    """Every quantized weight equals the numpy decoder's BF16 bits; every other tensor is byte-identical;
    release names kept; no scale left."""
    from tests.conftest import read_tensors

    s = _stored(src)
    got = read_tensors(out)
    g = _expected(src)
    want_names = {e.name for e in v4.expected_tensors(g) if mtp or e.layer < g.layers}
    assert set(got) == want_names
    n_deq = 0
    for name, (dtype, shape, raw, _) in got.items():
        w = s[name]
        sname = v4.scale_name(name) if name.endswith(".weight") else None
        if sname in s:
            sc = s[sname]
            ref = (np_dequant_fp4(_raw(w), _raw(sc)) if w.dtype == torch.int8 else
                   np_dequant_fp8(_raw(w), _raw(sc) if sc.element_size() == 1 else sc.numpy()))
            assert dtype == "bfloat16" and shape == ref.shape, name
            assert raw == np_bf16_bits(ref).tobytes(), name
            n_deq += 1
        else:
            assert raw == w.contiguous().view(torch.uint8).numpy().tobytes(), name
            assert dtype == str(w.dtype).replace("torch.", ""), name
    return n_deq


@pytest.mark.parametrize("which", ["v4_src", "v4_base_src", "v4_odd_src"])
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_v4_fp8_to_bf16_matches_numpy_decoder(which, request, tmp_path):
    from tests.conftest import run_cli

    src = request.getfixturevalue(which)
    out = tmp_path / "out"
    r = run_cli("fp8-to-bf16", src, "-o", out, "--json")
    assert r.rc == 0, r
    n = _check_bf16_output(src, out)
    g = _expected(src)
    assert n == r.json()["plan"]["tensors"]["dequantized"] == sum(
        1 for e in v4.expected_tensors(g) if v4.stored_dtype(e, g))
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg
    assert {k: v for k, v in src_cfg.items() if k not in ("quantization_config", "expert_dtype")} == cfg
    for f in ("encoding/encoding_dsv4.py", "inference/model.py", "tokenizer.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_v4_bf16_output_gives_transformers_the_same_logits(v4_src, tmp_path):
    """transformers on the FP8/FP4 release directory and on our BF16 output: identical logits (fp32 and bf16
    loads), over 160 tokens (longer than the sliding window 16 and the HCA ratio 128)."""
    pytest.importorskip("accelerate")
    from transformers import DeepseekV4ForCausalLM

    from tests.conftest import run_cli

    out = tmp_path / "out"
    assert run_cli("fp8-to-bf16", v4_src, "-o", out).rc == 0
    ids = torch.randint(0, 512, (1, 160), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        logits = []
        for d in (v4_src, out):
            m = DeepseekV4ForCausalLM.from_pretrained(d, dtype=dtype)
            with torch.no_grad():
                logits.append(m(input_ids=ids, use_cache=False).logits)
        assert torch.isfinite(logits[0]).all()
        assert torch.equal(logits[0], logits[1]), dtype


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_v4_mtp_drop_dry_run_and_resume(v4_src, tmp_path):
    from tests.conftest import run_cli, tree_hashes

    out = tmp_path / "out"
    dry = run_cli("fp8-to-bf16", v4_src, "-o", out, "--mtp", "drop", "--dry-run", "--json")
    assert dry.rc == 0 and not out.exists(), dry
    planned = dry.json()["plan"]["bytes_written"]["bytes"]
    r = run_cli("fp8-to-bf16", v4_src, "-o", out, "--mtp", "drop", "--json")
    assert r.rc == 0, r
    assert planned == json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    _check_bf16_output(v4_src, out, mtp=False)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    first = tree_hashes(out)
    shard = sorted(out.glob("*.safetensors"))[1]
    shard.unlink()
    r2 = run_cli("fp8-to-bf16", v4_src, "-o", out, "--mtp", "drop", "--json")
    assert r2.rc == 0 and r2.json()["shards_written"] == 1, r2
    again = tree_hashes(out)
    assert {k: v for k, v in again.items() if k not in ("report.json", "manifest.json")} == \
        {k: v for k, v in first.items() if k not in ("report.json", "manifest.json")}


# -- inspect and the commands that do not take V4 yet ------------------------------------------------------------

@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_v4_inspect_schedule_bytes_and_conversions(v4_src):
    from tests.conftest import run_cli

    r = run_cli("inspect", v4_src, "--json")
    assert r.rc == 0, r
    rep = r.json()
    d = rep["deepseek_v4"]
    cfg = json.loads((v4_src / "config.json").read_text())
    assert [x["compress_ratio"] for x in d["schedule"]] == cfg["compress_ratios"]
    assert [x["attention"] for x in d["schedule"]] == ["sliding", "csa", "hca", "csa", "sliding"]
    assert [x["moe"] for x in d["schedule"]] == ["hash", "hash", "routed", "routed", "routed"]
    assert d["schedule"][-1]["name"] == "mtp.0"
    # byte counts from the files themselves (safetensors library), not from dsconvert's reader
    heads = {}
    for f in v4_src.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                heads[k] = (t.dtype, t.numel() * t.element_size(), t.numel())
    fp8 = [k for k, v in heads.items() if v[0] == torch.float8_e4m3fn]
    fp4 = [k for k, v in heads.items() if v[0] == torch.int8]
    q = d["quantized"]
    assert q["fp8"]["weights"] == len(fp8) and q["fp8"]["bytes"] == sum(heads[k][1] for k in fp8)
    assert q["fp4"]["weights"] == len(fp4) and q["fp4"]["bytes"] == sum(heads[k][1] for k in fp4)
    assert q["fp4"]["scale_bytes"] == sum(heads[v4.scale_name(k)][1] for k in fp4)
    assert q["fp4"]["bf16_bytes"] == 4 * q["fp4"]["bytes"] and q["fp8"]["bf16_bytes"] == 2 * q["fp8"]["bytes"]
    assert rep["fp8_to_bf16"]["bytes_written"]["bytes"] == q["fp8"]["bf16_bytes"] + q["fp4"]["bf16_bytes"] + \
        q["other"]["bytes"]
    assert rep["ok"] and rep["parameters"] == sum(v[2] * (2 if v[0] == torch.int8 else 1)
                                                  for k, v in heads.items() if not k.endswith(".scale"))
    human = run_cli("inspect", v4_src)
    assert "S C H C | MTP S" in human.stdout and "fp4 e2m1" in human.stdout, human


def test_v4_weight_source_serves_exact_bf16(v4_src, tmp_path):
    """The reference forward's weight source decodes V4 FP8/FP4 by the same rule as fp8-to-bf16."""
    from dsconvert.convert.weights import CheckpointWeightSource

    ws = CheckpointWeightSource(v4_src)
    s = _stored(v4_src)
    for name in ("layers.0.attn.wq_b.weight", "layers.2.ffn.experts.5.w2.weight", "mtp.0.e_proj.weight"):
        w, sc = s[name], s[v4.scale_name(name)]
        ref = (np_dequant_fp4(_raw(w), _raw(sc)) if w.dtype == torch.int8 else np_dequant_fp8(_raw(w), _raw(sc)))
        got = ws.get(name)
        assert got.dtype == torch.bfloat16 and got.view(torch.int16).numpy().view(np.uint16).tobytes() == \
            np_bf16_bits(ref).tobytes(), name
    assert not ws.has("layers.0.attn.wq_b.scale")


@pytest.mark.slow
def test_v4_flash_full_size_headers_inspect_and_dry_run(tmp_path):
    """V4-Flash's real dimensions (headers only, sparse shards): the counts follow from the published geometry
    (43 layers + 1 MTP, 256 experts x 3 FP4 weights each; 8 FP8 linears per layer, an FP8 indexer wq_b in each of
    the 21 CSA layers, e_proj/h_proj in MTP), and fp8-to-bf16 --dry-run plans every FP4 byte as 4 BF16 bytes."""
    from dsconvert.testing.deepseek_v4 import flash_spec, write_v4_headers_only
    from tests.conftest import run_cli

    src = write_v4_headers_only(tmp_path / "flash", flash_spec())
    r = run_cli("inspect", src, "--json", timeout=300)
    assert r.rc == 0, r
    d = r.json()["deepseek_v4"]
    assert d["attention_kinds"] == {"sliding": 3, "csa": 21, "hca": 20} and d["moe_kinds"] == {"hash": 3, "routed": 41}
    q = d["quantized"]
    assert q["fp4"]["weights"] == 44 * 256 * 3 and q["fp8"]["weights"] == 44 * 8 + 21 + 2
    assert q["fp4"]["bytes"] == 44 * 256 * 3 * 2048 * 4096 // 2
    assert q["fp4"]["scale_bytes"] == 44 * 256 * 3 * 2048 * 4096 // 32
    dry = run_cli("fp8-to-bf16", src, "-o", tmp_path / "out", "--dry-run", "--json", timeout=300)
    assert dry.rc == 0, dry
    assert dry.json()["plan"]["bytes_written"]["bytes"] == q["fp8"]["bf16_bytes"] + q["fp4"]["bf16_bytes"] + \
        q["other"]["bytes"]
    assert not (tmp_path / "out").exists()
