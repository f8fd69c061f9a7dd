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
    from dsconvert.quant.fp4 import e8m0_to_float32

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
    from dsconvert.quant.fp4 import dequant_fp4

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


def test_fp8_e8m0_dequant_matches_numpy_every_byte_partial_blocks():
    """FP8 e4m3 with e8m0 block scales through dsconvert's fast CPU kernel, on a 200x300 weight (partial blocks on
    both axes) holding every byte value, against the numpy decoder + RNE."""
    from dsconvert.quant.fp4 import e8m0_grid_to_float32
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
    from dsconvert.quant.fp4 import dequant_fp4, e8m0_grid_to_float32, quantize_fp4, quantize_fp8_e8m0
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


def test_make_fixture_cli(tmp_path):
    pytest.importorskip("transformers.models.deepseek_v4")
    from tests.conftest import run_cli

    r = run_cli("make-fixture", tmp_path / "a", "--arch", "v4", "--variant", "flash-base", "--no-mtp")
    assert r.rc == 0, r
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4" and cfg["expert_dtype"] == "fp8" and cfg["num_nextn_predict_layers"] == 0
    assert run_cli("make-fixture", tmp_path / "b", "--arch", "v4", "--variant", "pro").rc == 2
    assert run_cli("make-fixture", tmp_path / "c", "--variant", "flash").rc == 2
