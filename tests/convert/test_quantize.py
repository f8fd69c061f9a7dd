"""``dsconvert quantize`` end to end on the tiny FP8 fixture, through the CLI in subprocesses.

Every expectation is computed here, independently of the code under test:

* the source FP8 weights are decoded with a numpy e4m3 decoder written from the bit layout, multiplied by their
  128x128 block scale in float32 and rounded once to bf16 (RNE by bit arithmetic);
* they are quantized with a slow, obvious per-group RTN written from docs/int-formats.md
  (sections 1-3; scales rounded to their storage dtype before q, as dsconvert's ``quant/rtn.py`` documents);
* the output is read with ``safetensors`` and unpacked with per-slot numpy unpackers written from the reference
  doc's bit layouts; for compressed-tensors the library's own checkpoint dequantizer
  (``CompressedTensorsDequantizer``: output directory's config.json + its whole state dict) must return exactly
  our dequantized weights, and for AutoAWQ the library's ``AutoAWQConverter`` + pack-quantized decompressor too.

Mean KLD bounds (``dsconvert validate OUT --reference SRC`` defaults: 2 sequences x 128 tokens of the bundled
text, float32 forward; tiny fixture; measured when this test was written, bounds about 2x above):

==================================  ========  =====
output                              measured  bound
==================================  ========  =====
compressed-tensors W8A16 g32        0.0111    0.03
compressed-tensors W8A16 channel    0.0121    0.03
compressed-tensors W4A16 g32        0.302     0.6
compressed-tensors W4A16_ASYM g32   0.290     0.6
AWQ W4A16 g32 (fp16 scales)         0.292     0.6
AWQ W4A16_ASYM g32                  0.310     0.6
GPTQ v1 W4A16 g32                   0.292     0.6
GPTQ v2 W4A16_ASYM g32              0.310     0.6
==================================  ========  =====

The tiny fixture is a random-weight model (near-uniform next-token distribution, 8 experts top-2 with near ties),
so a small weight error already flips some routing decisions: W8A16 sits well above the quadratic-in-error
estimate. The bounds catch a broken layout (a wrong nibble order, scale orientation or zero point gives several
nats) and a regression of about 2x. `dsconvert validate` runs through the CLI for one output per format; all eight
are bounded in the ``slow`` tier (`test_mean_kld_bound`, same computation, reference logits computed once).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from .._reference import bf16_rne, e4m3fn_decode

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
G = 32  # tiny fixture: K in {320, 96, 64, 128}; 32 divides all of them, 64 does not divide 96

# id -> (CLI format args, scheme, group size, storage convention, checkpoint_format)
CONFIGS = {
    "ct-W4A16": (["--format", "compressed-tensors"], "W4A16", G, "ct", None),
    "ct-W4A16_ASYM": (["--format", "compressed-tensors"], "W4A16_ASYM", G, "ct", None),
    "ct-W8A16": (["--format", "compressed-tensors"], "W8A16", G, "ct", None),
    "ct-W8A16-channel": (["--format", "compressed-tensors"], "W8A16", -1, "ct", None),
    "awq-W4A16": (["--format", "awq"], "W4A16", G, "awq", None),
    "awq-W4A16_ASYM": (["--format", "awq"], "W4A16_ASYM", G, "awq", None),
    "gptq-W4A16": (["--format", "gptq"], "W4A16", G, "gptq", "gptq"),
    "gptq_v2-W4A16_ASYM": (["--format", "gptq", "--checkpoint-format", "gptq_v2"], "W4A16_ASYM", G, "gptq",
                           "gptq_v2"),
}
SCHEMES = {"W4A16": (4, True), "W4A16_ASYM": (4, False), "W8A16": (8, True)}
# Mean KLD bounds (module docstring)
KLD_BOUND = {"W8A16": 0.03, "W8A16-channel": 0.03, "W4A16": 0.6, "W4A16_ASYM": 0.6}
SUFFIXES = {"ct": {"weight_packed", "weight_scale", "weight_shape"}, "awq": {"qweight", "qzeros", "scales"},
            "gptq": {"qweight", "qzeros", "scales", "g_idx"}}


def kld_bound(cid: str) -> float:
    _, scheme, g, _, _ = CONFIGS[cid]
    return KLD_BOUND[scheme + ("-channel" if g == -1 else "")]


# ---------------------------------------------------------------------------------------------
# CLI helpers
# ---------------------------------------------------------------------------------------------
def cli(*args, check: bool | None = True, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", "dsconvert.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "400", **(env or {})})
    if check:
        assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    return r


def quantize_cli(src: Path, out: Path, cid: str, *extra, env: dict | None = None) -> dict:
    fmt_args, scheme, g, _, _ = CONFIGS[cid]
    r = cli("quantize", src, "-o", out, "--scheme", scheme, "--group-size", g, *fmt_args, "--json", "-q", *extra,
            env=env)
    return json.loads(r.stdout)


def read_all(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard listed in the index (safetensors library, not dsconvert's reader)."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = f.get_tensor(k)
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# independent oracles (numpy)
# ---------------------------------------------------------------------------------------------
def fp16_rne(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)  # IEEE RNE conversion


def fp8_dequant_oracle(w: torch.Tensor, scale_inv: torch.Tensor) -> np.ndarray:
    """DeepSeek block dequant: decode * the 128x128 block's float32 scale (one float32 multiply), then bf16 RNE."""
    vals = e4m3fn_decode(w.view(torch.uint8).numpy())
    m, n = vals.shape
    s = scale_inv.numpy().astype(np.float32)
    s_full = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:m, :n]
    return bf16_rne(vals * s_full)


def source_float(src_t: dict, name: str) -> np.ndarray:
    """float32 values of a source weight (FP8 dequantized by the oracle; BF16 widened)."""
    t = src_t[name]
    if t.dtype == torch.float8_e4m3fn:
        return fp8_dequant_oracle(t, src_t[name + "_scale_inv"])
    return t.float().numpy()


def rtn_oracle(w: np.ndarray, bits: int, g: int, symmetric: bool, conv: str) -> dict:
    """Per-group min-max RTN, spelled out from docs/int-formats.md.

    conv "ct": signed q and zero, bf16 scales; "awq"/"gptq": unsigned q and zero, fp16 scales (AWQ floors
    max - min at 1e-5). Scales are rounded to the storage dtype first and a zero scale becomes that dtype's eps.
    """
    n, k = w.shape
    g = k if g == -1 else g
    levels = 2 ** bits - 1
    half = 2 ** (bits - 1)
    grp = w.astype(np.float32).reshape(n, k // g, g)
    store, eps = (bf16_rne, 2.0 ** -7) if conv == "ct" else (fp16_rne, 2.0 ** -10)
    if symmetric:
        scale = store(np.abs(grp).max(axis=-1) / np.float32(levels / 2))
        scale = np.where(scale == 0, np.float32(eps), scale).astype(np.float32)
        zero_u = np.full(scale.shape, half, dtype=np.int64)
    else:
        lo = np.minimum(grp.min(axis=-1), np.float32(0))
        hi = np.maximum(grp.max(axis=-1), np.float32(0))
        rng = (hi - lo).astype(np.float32)
        if conv == "awq":
            rng = np.maximum(rng, np.float32(1e-5))
        scale = store(rng / np.float32(levels))
        scale = np.where(scale == 0, np.float32(eps), scale).astype(np.float32)
        zero_u = np.clip(np.round(-lo / scale), 0, levels).astype(np.int64)
    q_u = np.clip(np.round(grp / scale[..., None]) + zero_u[..., None], 0, levels).astype(np.int64)
    deq_exact = (q_u - zero_u[..., None]).astype(np.float64) * scale[..., None].astype(np.float64)
    deq_loader = store(deq_exact.astype(np.float32))  # exact in float32 (<= 9-bit int x 8/11-bit scale)
    signed = conv == "ct"
    return {
        "q": (q_u - half if signed else q_u).reshape(n, k),
        "zero": (zero_u - half if signed else zero_u),
        "scale": scale,
        "deq_exact": deq_exact.reshape(n, k),
        "deq_loader": deq_loader.reshape(n, k),
        "g": g,
    }


# slow, obvious unpackers (reference doc bit layouts); all return int64 numpy arrays
def _u32(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.int32
    return t.numpy().view(np.uint32).astype(np.int64)


def unpack_ct(packed: torch.Tensor, bits: int, size: int, dim: int) -> np.ndarray:
    """compressed-tensors pack_to_int32: element i of a row at bit i*b of word i // (32/b), value + 2^(b-1)."""
    w = _u32(packed)
    if dim == 0:
        w = w.T
    per = 32 // bits
    out = np.zeros((w.shape[0], w.shape[1] * per), dtype=np.int64)
    for slot in range(per):
        out[:, slot::per] = (w >> (bits * slot)) & (2 ** bits - 1)
    out = out[:, :size] - 2 ** (bits - 1)
    return out.T if dim == 0 else out


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column AWQ_ORDER[i] of its 8-column block


def unpack_awq(packed: torch.Tensor) -> np.ndarray:
    """[rows, N/8] int32 -> [rows, N]: nibble i of word j is column 8 j + AWQ_ORDER[i]."""
    w = _u32(packed)
    out = np.zeros((w.shape[0], w.shape[1] * 8), dtype=np.int64)
    for i in range(8):
        out[:, AWQ_ORDER[i]::8] = (w >> (4 * i)) & 0xF
    return out


def unpack_seq(w: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Sequential LSB-first packing along ``axis`` (GPTQ qweight: axis 0; qzeros: axis 1)."""
    per = 32 // bits
    if axis == 0:
        w = w.T
    out = np.zeros((w.shape[0], w.shape[1] * per), dtype=np.int64)
    for j in range(per):
        out[:, j::per] = (w >> (bits * j)) & (2 ** bits - 1)
    return out.T if axis == 0 else out


def decode_module(conv: str, tensors: dict, mod: str, bits: int, symmetric: bool, ckfmt: str | None) -> dict:
    """q (convention's signedness, [N, K]), zero ([N, G]), scale ([N, G] float32) read back from disk."""
    t = {s: tensors[f"{mod}.{s}"] for s in SUFFIXES[conv] | {"weight_zero_point"} if f"{mod}.{s}" in tensors}
    if conv == "ct":
        n, k = t["weight_shape"].tolist()
        q = unpack_ct(t["weight_packed"], bits, k, dim=1)
        scale = t["weight_scale"]
        assert scale.dtype == torch.bfloat16
        zero = unpack_ct(t["weight_zero_point"], bits, n, dim=0) if "weight_zero_point" in t else None
        return {"q": q, "zero": zero, "scale": scale.float().numpy()}
    scale = t["scales"]
    assert scale.dtype == torch.float16
    if conv == "awq":
        q = unpack_awq(t["qweight"]).T  # [K, N] -> [N, K]
        zero = unpack_awq(t["qzeros"]).T  # [G, N] -> [N, G]
    else:
        q = unpack_seq(_u32(t["qweight"]), bits, axis=0).T
        zero = unpack_seq(_u32(t["qzeros"]), bits, axis=1)
        if ckfmt == "gptq":
            zero = zero + 1  # v1 stores zero - 1
        zero = zero.T
        k = q.shape[1]
        g = k // scale.shape[0]
        assert np.array_equal(t["g_idx"].numpy(), np.arange(k) // g)
    return {"q": q, "zero": zero, "scale": scale.float().numpy().T}


# ---------------------------------------------------------------------------------------------
# fixtures: one tiny FP8 source, every format x scheme quantized once (two at a time: 2 cores)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from dsconvert.testing.fixtures import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("q") / "src-fp8", "tiny")


@pytest.fixture(scope="module")
def src_tensors(src) -> dict:
    return read_all(src)


@pytest.fixture(scope="module")
def outputs(src, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    base = tmp_path_factory.mktemp("outs")

    def one(cid):
        out = base / cid
        return cid, (out, quantize_cli(src, out, cid, env={"OMP_NUM_THREADS": "1"}))  # two at a time

    with ThreadPoolExecutor(2) as ex:
        return dict(ex.map(one, list(CONFIGS)))


@pytest.fixture(scope="module")
def oracle(src_tensors):
    """Source float weights and per-(config) RTN oracles, computed lazily and cached."""
    floats: dict[str, np.ndarray] = {}
    cache: dict[tuple, dict] = {}

    def get(name: str, cid: str | None = None):
        if name not in floats:
            floats[name] = source_float(src_tensors, name)
        if cid is None:
            return floats[name]
        _, scheme, g, conv, _ = CONFIGS[cid]
        bits, sym = SCHEMES[scheme]
        key = (name, bits, g, sym, conv)
        if key not in cache:
            cache[key] = rtn_oracle(floats[name], bits, g, sym, conv)
        return cache[key]

    return get


def fp8_weights(src_tensors) -> list[str]:
    return sorted(n for n, t in src_tensors.items() if t.dtype == torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# the main per-output contract
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(CONFIGS))
def test_output_matches_independent_oracle(cid, outputs, src, src_tensors, oracle):
    out, rep = outputs[cid]
    _, scheme, g, conv, ckfmt = CONFIGS[cid]
    bits, sym = SCHEMES[scheme]
    tensors = read_all(out)

    # which modules are quantized: exactly the decoder Linears, i.e. the FP8 weights of the release
    quantized = [n[: -len(".weight")] for n in fp8_weights(src_tensors)]
    kept = [n for n, t in src_tensors.items() if t.dtype != torch.float8_e4m3fn and not n.endswith("_scale_inv")]
    assert rep["plan"]["quantized_modules"] == len(quantized)
    for must_keep in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                      "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.3.eh_proj.weight",
                      "model.layers.3.shared_head.head.weight", "model.layers.1.input_layernorm.weight"):
        assert must_keep in kept
    suffixes = set(SUFFIXES[conv]) | ({"weight_zero_point"} if conv == "ct" and not sym else set())
    expected_names = set(kept) | {f"{m}.{s}" for m in quantized for s in suffixes}
    assert set(tensors) == expected_names

    # kept tensors: byte-identical, same dtype
    for n in kept:
        assert tensors[n].dtype == src_tensors[n].dtype and tensors[n].shape == src_tensors[n].shape, n
        assert raw_bytes(tensors[n]) == raw_bytes(src_tensors[n]), n

    # quantized modules: q, zero, scale and the loader's dequant equal the oracle's exactly
    errors = {}
    for m in quantized:
        w = oracle(m + ".weight")
        o = oracle(m + ".weight", cid)
        got = decode_module(conv, tensors, m, bits, sym, ckfmt)
        assert np.array_equal(got["q"], o["q"]), m
        assert np.array_equal(got["scale"], o["scale"]), m
        if conv == "ct" and sym:
            assert got["zero"] is None
        else:
            assert np.array_equal(got["zero"], o["zero"]), m
        # round-trip error per group within the RTN bound: half a step, plus the scale's storage rounding
        u = 2.0 ** -8 if conv == "ct" else 2.0 ** -11
        step = np.repeat(o["scale"].astype(np.float64), o["g"], axis=1)
        err = np.abs(w.astype(np.float64) - o["deq_exact"])
        assert (err <= step * (0.5 + 2 ** bits * u) * (1 + 1e-9)).all(), m
        errors[m] = float(np.linalg.norm(w.astype(np.float64) - o["deq_exact"]) / np.linalg.norm(w.astype(np.float64)))

    # report: per-module relative RMS error equals ours
    full = json.loads((out / "report.json").read_text())
    assert set(full["module_errors"]) == set(quantized)
    for m, e in errors.items():
        assert full["module_errors"][m] == pytest.approx(e, rel=1e-6, abs=1e-12), m
    qe = rep["quantization_error"]
    assert qe["modules"] == len(quantized)
    assert qe["max"] == pytest.approx(max(errors.values()), rel=1e-6)
    assert qe["mean"] == pytest.approx(sum(errors.values()) / len(errors), rel=1e-6)

    # index: total_size = tensor bytes; weight_map = where each tensor really is
    index = json.loads((out / "model.safetensors.index.json").read_text())
    where = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(out / shard), framework="pt") as f:
            where.update({k: shard for k in f.keys()})
    assert index["weight_map"] == where
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == rep["output"]["total_size"] == rep["plan"]["bytes_written"]["bytes"]

    # docs/known-failures.md item 34: every routed expert of a layer carries the same tensor set (suffix, dtype, shape)
    per_layer: dict[str, dict[str, set]] = {}
    for n, t in tensors.items():
        mm = re.match(r"(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(.+)$", n)
        if mm:
            per_layer.setdefault(mm[1], {}).setdefault(mm[2], set()).add((mm[3], t.dtype, tuple(t.shape)))
    assert per_layer and all(len({frozenset(v) for v in exps.values()}) == 1 for exps in per_layer.values())
    # docs/known-failures.md item 38: weight_zero_point exactly when asymmetric (compressed-tensors)
    if conv == "ct":
        assert all((f"{m}.weight_zero_point" in tensors) == (not sym) for m in quantized)

    # the MTP layer is kept (its decoder Linears quantized, eh_proj and the head kept)
    assert any(n.startswith("model.layers.3.mlp.experts.") for n in tensors)
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1

    # validate's weight source reads the format back: exactly the loader dequant, kept tensors as stored
    from dsconvert.convert.weights import CheckpointWeightSource

    ws = CheckpointWeightSource(out)
    for m in quantized:
        got = ws.get(m + ".weight")
        assert torch.equal(got.float(), torch.from_numpy(oracle(m + ".weight", cid)["deq_loader"])), m
    assert torch.equal(ws.get("lm_head.weight"), src_tensors["lm_head.weight"])


@pytest.mark.parametrize("cid", list(CONFIGS))
def test_gptq_writes_quantize_config_json(cid, outputs):
    """AutoGPTQ-style loaders read ``quantize_config.json``: GPTQ outputs carry it (the same keys as the
    config.json entry, with ``bits``/``group_size``/``sym``/``desc_act`` as AutoGPTQ spells them); others do not."""
    out, _ = outputs[cid]
    _, scheme, g, conv, ckfmt = CONFIGS[cid]
    path = out / "quantize_config.json"
    if conv != "gptq":
        assert not path.exists()
        return
    qc = json.loads(path.read_text())
    bits, sym = SCHEMES[scheme]
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["checkpoint_format"]) == (bits, g, sym, False,
                                                                                                   ckfmt)


@pytest.mark.parametrize("cid", list(CONFIGS))
def test_config_json(cid, outputs, src):
    out, rep = outputs[cid]
    _, scheme, g, conv, ckfmt = CONFIGS[cid]
    bits, sym = SCHEMES[scheme]
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert "weight_block_size" not in json.dumps(cfg) and '"fp8"' not in json.dumps(cfg)
    assert not {"fmt", "activation_scheme", "weight_block_size"} & set(qc)
    assert qc == rep["quantization_config"]
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    for k, v in src_cfg.items():  # nothing else changed (torch_dtype may only say bfloat16)
        if k not in ("quantization_config", "torch_dtype"):
            assert cfg[k] == v, k
    assert cfg.get("torch_dtype", "bfloat16") == "bfloat16"

    if conv == "ct":
        from compressed_tensors.quantization import QuantizationConfig

        # the keys ModelCompressor.update_config writes: model_dump of QuantizationConfig + version/method/...
        lib_keys = set(QuantizationConfig.model_validate(qc).model_dump().keys()) | {
            "version", "quant_method", "sparsity_config", "transform_config"}
        doc_keys = {"quant_method", "format", "quantization_status", "config_groups", "ignore", "kv_cache_scheme",
                    "global_compression_ratio", "version", "sparsity_config", "transform_config"}
        assert doc_keys <= set(qc) and set(qc) == lib_keys
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        assert qc["quantization_status"] == "compressed"
        grp = qc["config_groups"]["group_0"]
        assert grp["targets"] == ["Linear"] and grp["input_activations"] is None
        wa = grp["weights"]
        assert (wa["num_bits"], wa["type"], wa["symmetric"]) == (bits, "int", sym)
        assert (wa["strategy"], wa["group_size"]) == (("channel", None) if g == -1 else ("group", g))
    elif conv == "awq":
        assert qc == {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": None}
    else:
        autogptq = {"bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
                    "model_name_or_path", "model_file_base_name", "quant_method", "checkpoint_format"}
        gptqmodel = {"pack_dtype", "lm_head", "meta", "dynamic"}
        marlin_needs = {"quant_method", "bits", "group_size", "sym", "desc_act"}
        assert marlin_needs <= set(qc) <= autogptq | gptqmodel
        assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == \
            ("gptq", bits, g, sym, False)
        assert qc["checkpoint_format"] == ckfmt


# ---------------------------------------------------------------------------------------------
# the compressed-tensors library reads our whole output; AutoAWQ through the library's converter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", [c for c in CONFIGS if CONFIGS[c][3] == "ct"])
def test_compressed_tensors_library_dequantizes_whole_checkpoint(cid, outputs, src_tensors, oracle):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.utils.match import match_name

    out, _ = outputs[cid]
    deq = CompressedTensorsDequantizer(str(out), dtype=torch.bfloat16)
    tensors = read_all(out)
    names = set(tensors)
    result = deq.validate(dict(tensors))  # raises on missing params or orphan qparams
    quantized = [n[: -len(".weight")] for n in fp8_weights(src_tensors)]
    assert set(result) == {n for n in names if not re.search(r"\.weight_(packed|scale|shape|zero_point)$", n)} | {
        m + ".weight" for m in quantized}
    for m in quantized:
        want = torch.from_numpy(oracle(m + ".weight", cid)["deq_loader"]).to(torch.bfloat16)
        assert result[m + ".weight"].dtype == torch.bfloat16
        assert torch.equal(result[m + ".weight"], want), m
    # the ignore list keeps every unquantized Linear (router, heads, eh_proj) and no quantized module
    ignore = deq.quant_config.ignore
    linears_kept = ["lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "model.layers.3.mlp.gate",
                    "model.layers.3.eh_proj", "model.layers.3.shared_head.head"]
    for m in linears_kept:
        assert any(match_name(m, p) for p in ignore), m
    for m in quantized:
        assert not any(match_name(m, p) for p in ignore), m


@pytest.mark.parametrize("cid", ["awq-W4A16", "awq-W4A16_ASYM"])
def test_awq_through_compressed_tensors_converter(cid, outputs, src_tensors, oracle):
    """compressed-tensors' AutoAWQ importer (its own unpack + reverse order) + its decompressor agree with us."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    out, _ = outputs[cid]
    cfg = json.loads((out / "config.json").read_text())
    conv = AutoAWQConverter.from_autoawq_config(cfg["quantization_config"])
    ct = conv.process(read_all(out))
    qcfg = conv.update_config(None)
    scheme = next(iter(qcfg.config_groups.values()))
    comp = BaseCompressor.get_value_from_registry(qcfg.format)
    for name in fp8_weights(src_tensors):
        m = name[: -len(".weight")]
        sd = {p: ct[f"{m}.{p}"] for p in comp.compression_param_names(scheme)}
        w = comp.decompress(sd, scheme)["weight"]
        assert torch.equal(w.float(), torch.from_numpy(oracle(name, cid)["deq_loader"])), m


# ---------------------------------------------------------------------------------------------
# kv_b_proj (docs/known-failures.md item 37): our reader's dequant, split per head into W_UK / W_UV
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(CONFIGS))
def test_kv_b_proj_round_trip_and_head_split(cid, outputs, src, oracle):
    from dsconvert.convert.weights import CheckpointWeightSource

    out, _ = outputs[cid]
    _, scheme, g, conv, _ = CONFIGS[cid]
    bits, _ = SCHEMES[scheme]
    cfg = json.loads((src / "config.json").read_text())
    h, nope, v, r = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"])
    ws = CheckpointWeightSource(out)
    u = 2.0 ** -8 if conv == "ct" else 2.0 ** -11
    for layer in range(cfg["num_hidden_layers"] + 1):
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        deq = ws.get(name).float().numpy().astype(np.float64)
        w = oracle(name).astype(np.float64)  # the BF16 source weight
        o = oracle(name, cid)
        assert deq.shape == (h * (nope + v), r)
        step = np.repeat(o["scale"].astype(np.float64), o["g"], axis=1)
        # RTN bound, plus the loader's final rounding to the scale dtype
        bound = step * (0.5 + 2 ** bits * u) + np.abs(deq) * u
        assert (np.abs(w - deq) <= bound * (1 + 1e-9)).all(), name
        per_head = deq.reshape(h, nope + v, r)
        w_uk, w_uv = per_head[:, :nope, :], per_head[:, nope:, :]
        src_heads = w.reshape(h, nope + v, r)
        assert w_uk.shape == (h, nope, r) and w_uv.shape == (h, v, r)
        b_heads = bound.reshape(h, nope + v, r)
        assert (np.abs(w_uk - src_heads[:, :nope]) <= b_heads[:, :nope] * (1 + 1e-9)).all()
        assert (np.abs(w_uv - src_heads[:, nope:]) <= b_heads[:, nope:] * (1 + 1e-9)).all()
        # absorbed-MLA use: q_nope . W_UK per head stays close (relative) to the BF16 product
        x = np.random.default_rng(layer).standard_normal((5, nope))
        ref = np.einsum("tn,hnr->thr", x, src_heads[:, :nope])
        got = np.einsum("tn,hnr->thr", x, w_uk)
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < (0.2 if bits == 4 else 0.02)


# ---------------------------------------------------------------------------------------------
# validate: Mean KLD against the FP8 source
# ---------------------------------------------------------------------------------------------
CLI_VALIDATED = ["ct-W4A16", "awq-W4A16_ASYM", "gptq-W4A16"]  # one per format through `dsconvert validate`


@pytest.fixture(scope="module")
def mean_klds(outputs, src) -> dict[str, float]:
    """Mean KLD of every output vs the FP8 source, as `dsconvert validate` computes it (same sequences, same
    forward, same pooling), with the reference logits computed once."""
    from dsconvert.convert.validate import ValidateOptions, _pool, forward_many, sequences
    from dsconvert.convert.weights import CheckpointWeightSource

    ref = CheckpointWeightSource(src)
    seqs = sequences(src, ValidateOptions(), int(ref.config["vocab_size"]))
    ref_logits, _ = forward_many(ref, seqs, torch.float32, return_hidden=False)
    res = {}
    for cid, (out, _) in outputs.items():
        cand_logits, _ = forward_many(CheckpointWeightSource(out), seqs, torch.float32, return_hidden=False)
        res[cid] = float(_pool(ref_logits, cand_logits, seqs)["mean_kld"])
    print("\nMean KLD vs FP8 source: " + ", ".join(f"{c}={v:.4g}" for c, v in res.items()))
    return res


_CLI_KLD: dict[str, float] = {}  # filled by the CLI tests, cross-checked by the all-config test when both ran


@pytest.mark.parametrize("cid", CLI_VALIDATED)
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_validate_cli_reads_each_format(cid, outputs, src):
    out, _ = outputs[cid]
    r = cli("validate", out, "--reference", src, "--json", "-q", "--max-kld", kld_bound(cid), "--min-top1", 0)
    rep = json.loads(r.stdout)
    assert rep["passed"] and rep["nonfinite"]["candidate"]["ok"]
    assert 0 < rep["mean_kld"] <= kld_bound(cid)
    _CLI_KLD[cid] = rep["mean_kld"]


@pytest.mark.slow
@pytest.mark.parametrize("cid", list(CONFIGS))
def test_mean_kld_bound(cid, mean_klds):
    assert 0 < mean_klds[cid] <= kld_bound(cid)
    if cid in _CLI_KLD:  # the in-process computation is the CLI's
        assert mean_klds[cid] == pytest.approx(_CLI_KLD[cid], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# refusals: exit 2, a clear message, nothing written
# ---------------------------------------------------------------------------------------------
REFUSALS = {
    "fused-q_a-alone": (["--group-size", G, "--ignore", "model.layers.1.self_attn.q_a_proj"],
                        ["layer 1", "q_a_proj + kv_a_proj_with_mqa", "one precision"]),
    "one-expert": (["--group-size", G, "--ignore", r"re:.*experts\.3\..*"], ["all routed experts", "one precision"]),
    "gate-without-up": (["--group-size", G, "--ignore", "model.layers.0.mlp.gate_proj"], ["gate_proj + up_proj"]),
    "strict-unmatched": (["--group-size", G, "--ignore", "model.layers.9.self_attn.q_a_proj", "--strict"],
                         ["model.layers.9.self_attn.q_a_proj", "matched no"]),
    "group-not-dividing-N": (["--group-size", 64], ["model.layers.0.self_attn.q_b_proj", "N=96", "--group-size 32"]),
    "unknown-scheme": (["--scheme", "W3A16"], ["W4A16", "W4A16_ASYM", "W8A16"]),
    "unknown-format": (["--format", "exl2"], ["compressed-tensors", "awq", "gptq"]),
    "awq-8bit": (["--format", "awq", "--scheme", "W8A16", "--group-size", G], ["4-bit"]),
    "gptq-v1-asym": (["--format", "gptq", "--scheme", "W4A16_ASYM", "--group-size", G], ["gptq_v2"]),
    "max-memory": (["--group-size", G, "--max-memory", "1K"], ["--max-memory"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_exit_2_before_writing(case, src, tmp_path):
    args, words = REFUSALS[case]
    out = tmp_path / "out"
    r = cli("quantize", src, "-o", out, *args, "--json", check=False)
    assert r.returncode == 2, (r.returncode, r.stderr)
    msg = " ".join(r.stderr.split())
    for w in words:
        assert w in msg, (w, msg)
    assert json.loads(r.stdout)["exit_code"] == 2
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_unmatched_ignore_warns_on_stderr(src, tmp_path, src_tensors):
    out = tmp_path / "out"
    r = cli("quantize", src, "-o", out, "--group-size", G, "--ignore", "model.layers.9.self_attn.q_a_proj",
            "--ignore", r"re:.*kv_b_proj$", "--json", "-q")
    assert "warning" in r.stderr and "model.layers.9.self_attn.q_a_proj" in r.stderr
    assert "kv_b_proj" not in r.stderr  # the matching pattern is not reported
    rep = json.loads(r.stdout)
    assert rep["plan"]["ignore_patterns_unmatched"] == ["model.layers.9.self_attn.q_a_proj"]
    assert any("model.layers.9.self_attn.q_a_proj" in w for w in rep["warnings"])
    # a single --ignore keeps kv_b_proj in BF16 everywhere (docs/known-failures.md item 37)
    tensors = read_all(out)
    for layer in range(4):
        m = f"model.layers.{layer}.self_attn.kv_b_proj"
        assert tensors[m + ".weight"].dtype == torch.bfloat16 and f"{m}.weight_packed" not in tensors
        want = fp8_dequant_oracle(src_tensors[m + ".weight"], src_tensors[m + ".weight_scale_inv"])
        assert np.array_equal(tensors[m + ".weight"].float().numpy(), want)


@pytest.mark.parametrize("cid", ["ct-W4A16", "awq-W4A16_ASYM", "gptq-W4A16"])
def test_ignore_whole_fused_group_keeps_it_bf16(cid, src, src_tensors, tmp_path, oracle):
    out = tmp_path / "out"
    qa, kva = "model.layers.1.self_attn.q_a_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa"
    rep = quantize_cli(src, out, cid, "--ignore", qa, "--ignore", kva)
    assert not rep["plan"]["ignore_patterns_unmatched"]
    tensors = read_all(out)
    for m in (qa, kva):
        # FP8 ignored -> BF16, exactly the fp8-to-bf16 dequant
        assert tensors[m + ".weight"].dtype == torch.bfloat16
        assert np.array_equal(tensors[m + ".weight"].float().numpy(), oracle(m + ".weight"))
        assert not [n for n in tensors if n.startswith(m + ".") and not n.endswith(".weight")]
    # partners in other layers are still quantized
    conv = CONFIGS[cid][3]
    assert all(f"model.layers.{i}.self_attn.q_a_proj.{s}" in tensors for i in (0, 2) for s in SUFFIXES[conv])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if conv == "ct":
        assert qa in qc["ignore"] and kva in qc["ignore"]
        from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

        res = CompressedTensorsDequantizer(str(out)).validate(dict(tensors))
        assert torch.equal(res[qa + ".weight"], tensors[qa + ".weight"])
    elif conv == "awq":
        assert sorted(qc["modules_to_not_convert"]) == sorted([qa, kva])
    else:
        assert any(re.match(p[2:], qa) for p in qc["dynamic"]) and any(re.match(p[2:], kva) for p in qc["dynamic"])
        assert not any(re.match(p[2:], "model.layers.0.self_attn.q_a_proj") for p in qc["dynamic"])
    from dsconvert.convert.weights import CheckpointWeightSource

    ws = CheckpointWeightSource(out)
    assert torch.equal(ws.get(qa + ".weight"), tensors[qa + ".weight"])


# ---------------------------------------------------------------------------------------------
# dry run, resume, BF16 source, MTP
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_dry_run_plan_equals_real_run(src, outputs, src_tensors, tmp_path):
    out_real, real = outputs["ct-W4A16"]
    out = tmp_path / "never"
    r = cli("quantize", src, "-o", out, "--scheme", "W4A16", "--group-size", G, "--dry-run", "--json")
    dry = json.loads(r.stdout)
    assert not out.exists()
    assert dry["dry_run"] is True
    assert dry["plan"]["bytes_written"] == real["plan"]["bytes_written"]
    assert dry["plan"]["output_shards"] == real["plan"]["output_shards"]
    assert dry["plan"]["bytes_written"]["bytes"] == sum(p.stat().st_size - _header_len(p)
                                                        for p in out_real.glob("*.safetensors"))
    # bits per weight, recomputed from the files
    tensors = read_all(out_real)
    q_names = fp8_weights(src_tensors)
    q_params = sum(src_tensors[n].numel() for n in q_names)
    q_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items()
                  if n.rsplit(".", 1)[0] + ".weight" in q_names and not n.endswith(".weight"))
    all_params = sum(t.numel() for n, t in src_tensors.items() if not n.endswith("_scale_inv"))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert dry["plan"]["bits_per_weight_quantized"] == pytest.approx(8 * q_bytes / q_params, abs=1e-4)
    assert dry["plan"]["bits_per_weight_overall"] == pytest.approx(8 * total / all_params, abs=1e-4)
    # W4A16 g32: 4 bits + a bf16 scale per 32 weights (+ weight_shape) = 4.5
    assert 4.5 <= dry["plan"]["bits_per_weight_quantized"] < 4.51
    # human mode says it is a dry run
    h = cli("quantize", src, "--scheme", "W4A16", "--group-size", G, "--dry-run")
    assert "dry run" in h.stdout and "bpw" in h.stdout


def _header_len(p: Path) -> int:
    with open(p, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


KILL_AFTER_SHARDS = r"""
import os, signal, sys
from dsconvert.convert import manifest as M
_save = M.Manifest.save
def save(self, out_dir):
    _save(self, out_dir)
    if len(self.files) >= int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
M.Manifest.save = save
from dsconvert.cli import main
sys.argv = ["dsconvert"] + sys.argv[1:]
main()
"""


def _model_files(d: Path) -> dict[str, bytes]:
    names = [p.name for p in d.glob("*.safetensors")] + ["model.safetensors.index.json", "config.json"]
    return {n: (d / n).read_bytes() for n in sorted(names)}


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_resume_after_sigkill_is_byte_identical(src, tmp_path):
    args = ["--scheme", "W4A16_ASYM", "--group-size", G, "--max-shard-size", "600K", "--json", "-q"]
    clean = tmp_path / "clean"
    cli("quantize", src, "-o", clean, *args)
    n_shards = len(list(clean.glob("*.safetensors")))
    assert n_shards >= 3
    out = tmp_path / "killed"
    r = subprocess.run([PY, "-c", KILL_AFTER_SHARDS, "quantize", str(src), "-o", str(out), *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "KILL_AFTER": "2"})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    assert not (out / "config.json").exists()
    rep = json.loads(cli("quantize", src, "-o", out, *args).stdout)
    assert rep["resumed"] is True and rep["shards_written"] == n_shards - 2
    assert _model_files(out) == _model_files(clean)
    again = json.loads(cli("quantize", src, "-o", out, *args).stdout)
    assert again["already_complete"] is True and again["shards_written"] == 0


@pytest.mark.parametrize("cid", ["ct-W4A16", "gptq_v2-W4A16_ASYM"])
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_bf16_source_gives_identical_bytes(cid, src, outputs, tmp_path_factory):
    base = tmp_path_factory.mktemp("bf16")
    bf16 = base / "src-bf16"
    if not (bf16 / "config.json").exists():
        cli("fp8-to-bf16", src, "-o", bf16, "--json", "-q")
    out = base / cid
    rep = quantize_cli(bf16, out, cid)
    assert rep["source"]["format"] == "float"
    assert _model_files(out) == _model_files(outputs[cid][0])


def test_mtp_drop(src, tmp_path, outputs):
    out = tmp_path / "nomtp"
    rep = quantize_cli(src, out, "ct-W4A16", "--mtp", "drop")
    tensors = read_all(out)
    assert tensors and not [n for n in tensors if n.startswith("model.layers.3.")]
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert rep["plan"]["dropped"] and all(d["name"].startswith("model.layers.3.") for d in rep["plan"]["dropped"])
    kept = read_all(outputs["ct-W4A16"][0])
    assert {n for n in kept if not n.startswith("model.layers.3.")} == set(tensors)
