"""``dsconvert fp8-to-bf16`` end to end (through the CLI, in a subprocess) against independent references.

The oracle below is written from the e4m3fn definition and the rule in docs/checkpoint-layout.md §4:
decode every FP8 byte by formula (sign, 4-bit exponent with bias 7, 3-bit mantissa, subnormals, 0x7F/0xFF NaN),
multiply by the block's scale in numpy float32, and round to BF16 by integer round-to-nearest-even on the float32
bits. It uses neither torch's float8 cast nor dsconvert's kernel. Tensors are read with ``safetensors.safe_open``.

What is proved here:
* every dequantized tensor is bit-identical to the oracle (tiny fixture with partial blocks on both axes, and a
  hand-made checkpoint with the golden [130, 256]/[2, 2] and [200, 300]/[2, 3] cases covering all 256 byte values
  and RNE ties);
* the output directory is complete and correct (section 6 of the reference): pass-through tensors identical,
  the F32 router bias still F32, no scales, index total_size and weight_map exact, config.json fixed, other files
  copied byte-identical, nothing executed, SRC untouched;
* a scale stored in another shard converts exactly as in a single shard (docs/known-failures.md item 1);
* transformers loads the output (only MTP keys unexpected) and its logits equal those of the oracle's weights;
* ``--mtp drop``, ``--max-shard-size``, HF-cache snapshot paths and ``--dtype f32``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..conftest import INDEX, guard_source, read_index, read_tensors, run_cli, shard_files, tree_hashes
from .._reference import bf16_rne_bits, e4m3fn_decode

SCALE = "_scale_inv"


# --- the independent oracle ------------------------------------------------------------------------------------

def oracle_f32(w_bytes: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp32(W) * scale_inv[i // bm, j // bn], in numpy float32 (one multiply per element)."""
    m, n = w_bytes.shape
    bm, bn = block
    assert scale.shape == (-(-m // bm), -(-n // bn)), (scale.shape, w_bytes.shape)
    s = np.repeat(np.repeat(scale.astype(np.float32), bm, axis=0), bn, axis=1)[:m, :n]
    out = e4m3fn_decode(w_bytes) * s
    assert out.dtype == np.float32
    return out


def test_oracle_decoder_facts():
    """The oracle's decoder against hand facts about e4m3fn (bias 7, max 448, no infinities)."""
    v = e4m3fn_decode(np.arange(256, dtype=np.uint8))
    assert v[0x38] == 1.0 and v[0x7E] == 448.0 and v[0xFE] == -448.0
    assert v[0x08] == 2.0 ** -6 and v[0x01] == 2.0 ** -9 and v[0x07] == 7 * 2.0 ** -9  # subnormals
    assert v[0x00] == 0 and not np.signbit(v[0x00]) and v[0x80] == 0 and np.signbit(v[0x80])
    assert np.isnan(v[0x7F]) and np.isnan(v[0xFF]) and np.isnan(v).sum() == 2 and not np.isinf(v).any()
    assert bf16_rne_bits(np.array([1 + 2 ** -8], np.float32))[0] == 0x3F80  # tie -> even
    assert bf16_rne_bits(np.array([1 + 3 * 2 ** -8], np.float32))[0] == 0x3F82  # tie -> even (up)
    assert bf16_rne_bits(np.array([np.nan], np.float32))[0] & 0x7FFF > 0x7F80


def _u8(raw: bytes, shape) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _f32(raw: bytes, shape) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32).reshape(shape)


def _block(src: Path) -> tuple[int, int]:
    bm, bn = json.loads((src / "config.json").read_text())["quantization_config"]["weight_block_size"]
    return bm, bn


def oracle_outputs(src: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For every F8_E4M3 tensor of ``src``: (float32 product, expected bf16 bits)."""
    t = read_tensors(src)
    block = _block(src)
    out = {}
    for name, (dtype, shape, raw, _) in t.items():
        if dtype != "float8_e4m3fn":
            continue
        sdt, sshape, sraw, _ = t[name + SCALE]
        assert sdt == "float32"
        prod = oracle_f32(_u8(raw, shape), _f32(sraw, sshape), block)
        out[name] = (prod, bf16_rne_bits(prod))
    return out


def assert_bits_equal(name: str, got_raw: bytes, expected_bits: np.ndarray) -> None:
    got = np.frombuffer(got_raw, dtype=np.uint16).reshape(expected_bits.shape)
    nan = (expected_bits & 0x7FFF) > 0x7F80
    assert ((got[nan] & 0x7FFF) > 0x7F80).all(), f"{name}: NaN not preserved"
    bad = (got != expected_bits) & ~nan
    if bad.any():
        i = np.argwhere(bad)[0]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements differ from the oracle; first at "
                             f"{tuple(i)}: got {got[tuple(i)]:#06x}, expected {expected_bits[tuple(i)]:#06x}")


# --- the tiny fixture ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_oracle(tiny_src):
    return oracle_outputs(tiny_src)


def test_tiny_fixture_has_partial_blocks(tiny_oracle):
    shapes = {prod.shape for prod, _ in tiny_oracle.values()}
    # kv_a_proj_with_mqa [80, 320] and the dense MLP [320, 320]: partial blocks on both axes (320 = 2.5 x 128)
    assert (80, 320) in shapes and (320, 320) in shapes
    assert any(m % 128 and n % 128 for m, n in shapes)


def test_every_dequantized_tensor_matches_oracle(tiny_out, tiny_oracle):
    out, _ = tiny_out
    got = read_tensors(out)
    assert tiny_oracle
    for name, (prod, bits) in tiny_oracle.items():
        dtype, shape, raw, _ = got[name]
        assert dtype == "bfloat16" and shape == prod.shape, (name, dtype, shape)
        assert_bits_equal(name, raw, bits)


def test_output_directory_is_complete_and_correct(tiny_src, tiny_src_hash, tiny_out):
    out, rep = tiny_out
    src_t, out_t = read_tensors(tiny_src), read_tensors(out)

    # no scales anywhere; every other source tensor present
    assert not [n for n in out_t if n.endswith(SCALE)]
    assert set(out_t) == {n for n in src_t if not n.endswith(SCALE)}
    for name, (dtype, shape, raw, _) in src_t.items():
        if name.endswith(SCALE) or dtype == "float8_e4m3fn":
            continue
        assert out_t[name][:3] == (dtype, shape, raw), f"{name} not copied byte-identical"
    biases = [n for n in src_t if n.endswith("e_score_correction_bias")]
    assert biases and all(out_t[n][0] == "float32" for n in biases)
    # the bias values really need F32 (a BF16 downcast would change them)
    b = torch.frombuffer(bytearray(out_t[biases[0]][2]), dtype=torch.float32)
    assert not torch.equal(b, b.bfloat16().float())

    # index
    idx = read_index(out)
    assert not [n for n in idx["weight_map"] if n.endswith(SCALE)]
    assert idx["weight_map"] == {n: v[3] for n, v in out_t.items()}
    assert idx["metadata"]["total_size"] == sum(len(v[2]) for v in out_t.values())
    assert set(idx["weight_map"].values()) == {f.name for f in shard_files(out)}

    # config
    src_cfg = json.loads((tiny_src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    for k in ("architectures", "auto_map", "num_nextn_predict_layers", "model_type", "num_hidden_layers"):
        assert cfg[k] == src_cfg[k], k
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == \
        {k: v for k, v in src_cfg.items() if k not in ("quantization_config", "torch_dtype")}

    # every other file copied byte-identical
    others = [n for n in tiny_src_hash if not n.endswith(".safetensors") and n not in (INDEX, "config.json")]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_deepseek.py",
            "modeling_deepseek.py", "README.md", "LICENSE"} <= set(others)
    out_h = tree_hashes(out)
    for n in others:
        assert out_h.get(n) == tiny_src_hash[n], f"{n} not copied byte-identical"

    # nothing executed, SRC untouched
    assert not list(tiny_src.rglob("EXECUTED_*")) and not list(out.rglob("EXECUTED_*"))
    assert tree_hashes(tiny_src) == tiny_src_hash
    assert not list(out.glob("*.tmp"))


# --- hand-made golden checkpoint -------------------------------------------------------------------------------

GOLD_A = "model.layers.0.self_attn.kv_b_proj.weight"  # [130, 256] / [2, 2]
GOLD_B = "model.layers.0.mlp.down_proj.weight"  # [200, 300] / [2, 3]


def _golden_tensors() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    a = ((np.arange(130 * 256) * 37 + 11) % 256).astype(np.uint8).reshape(130, 256)  # all 256 byte values
    sa = rng.lognormal(-6, 2, size=(2, 2)).astype(np.float32)
    b = rng.integers(0, 256, size=(200, 300), dtype=np.uint8)
    sb = rng.lognormal(-8, 1, size=(2, 3)).astype(np.float32)
    # RNE ties: 1.0 * (1 + 2^-8) -> 0x3F80 (even, down); 1.0 * (1 + 3*2^-8) -> 0x3F82 (even, up)
    sb[0, 0], sb[0, 1] = 1 + 2 ** -8, 1 + 3 * 2 ** -8
    b[0, 0] = b[0, 128] = 0x38
    # the corner element sits in the partial edge block (1, 2) and uses that block's scale as is
    sb[1, 2] = 0.5
    b[199, 299] = 0x38
    assert len(np.unique(a)) == 256
    t = lambda x: torch.from_numpy(x.copy())  # noqa: E731
    return {GOLD_A: t(a).view(torch.float8_e4m3fn), GOLD_A + SCALE: t(sa),
            GOLD_B: t(b).view(torch.float8_e4m3fn), GOLD_B + SCALE: t(sb),
            "model.norm.weight": torch.ones(320, dtype=torch.bfloat16)}


def write_checkpoint(d: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict) -> Path:
    """A checkpoint in the release layout from explicit tensors (save_file, index with total_size)."""
    d.mkdir(parents=True)
    wm, total = {}, 0
    for fname, ts in shards.items():
        save_file(ts, str(d / fname), metadata={"format": "pt"})
        for n, t in ts.items():
            wm[n] = fname
            total += t.numel() * t.element_size()
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    (d / "config.json").write_text(json.dumps(config, indent=2))
    return d


def _fixture_config(**extra) -> dict:
    from dsconvert.testing.fixtures import FixtureSpec, make_config

    return {**make_config(FixtureSpec()), **extra}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    src = write_checkpoint(tmp_path_factory.mktemp("golden") / "src",
                           {"model-00001-of-000001.safetensors": _golden_tensors()}, _fixture_config())
    guard_source(src)
    out = src.parent / "out"
    r = run_cli("fp8-to-bf16", src, "-o", out, "--json")
    assert r.rc == 0, str(r)
    return src, out


def test_golden_cases_match_oracle(golden):
    src, out = golden
    expected = oracle_outputs(src)
    got = read_tensors(out)
    assert set(expected) == {GOLD_A, GOLD_B}
    for name, (prod, bits) in expected.items():
        assert got[name][0] == "bfloat16" and got[name][1] == prod.shape
        assert_bits_equal(name, got[name][2], bits)
    b = np.frombuffer(got[GOLD_B][2], dtype=np.uint16).reshape(200, 300)
    assert (b[0, 0], b[0, 128], b[199, 299]) == (0x3F80, 0x3F82, 0x3F00)
    a = np.frombuffer(got[GOLD_A][2], dtype=np.uint16).reshape(130, 256)
    assert np.isnan(e4m3fn_decode(_u8(read_tensors(src)[GOLD_A][2], (130, 256)))).any()
    assert ((a & 0x7FFF) > 0x7F80).sum() == (bits_nan := ((expected[GOLD_A][1] & 0x7FFF) > 0x7F80).sum()) and bits_nan
    assert got["model.norm.weight"][2] == read_tensors(src)["model.norm.weight"][2]


# --- scale in another shard ------------------------------------------------------------------------------------

def test_scale_in_other_shard_converts_like_one_shard(tiny_src, tiny_out, tmp_path, tiny_oracle):
    wm = read_index(tiny_src)["weight_map"]
    cross = [n for n in wm if n + SCALE in wm and wm[n] != wm[n + SCALE]]
    assert len(cross) == 1 and "kv_a_proj_with_mqa" in cross[0]
    name = cross[0]
    src_t = read_tensors(tiny_src)

    def as_torch(n):
        dtype, shape, raw, _ = src_t[n]
        return torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape)

    one = write_checkpoint(tmp_path / "one", {"model-00001-of-000001.safetensors":
                                              {name: as_torch(name), name + SCALE: as_torch(name + SCALE)}},
                           json.loads((tiny_src / "config.json").read_text()))
    r = run_cli("fp8-to-bf16", one, "-o", tmp_path / "one_out", "-q")
    assert r.rc == 0, str(r)
    single = read_tensors(tmp_path / "one_out")[name]
    split = read_tensors(tiny_out[0])[name]
    assert single[:3] == split[:3]
    assert_bits_equal(name, split[2], tiny_oracle[name][1])


# --- transformers ----------------------------------------------------------------------------------------------

def _oracle_state_dict(src: Path, oracle: dict, drop_layers_from: int) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (dtype, shape, raw, _) in read_tensors(src).items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if name.endswith(SCALE) or (m and int(m.group(1)) >= drop_layers_from):
            continue
        if name in oracle:
            bits = oracle[name][1]
            sd[name] = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
        else:
            sd[name] = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).reshape(shape).clone()
    return sd


def test_transformers_loads_output_and_logits_equal_oracle(tiny_src, tiny_out, tiny_oracle, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import DeepseekV3ForCausalLM

    out, _ = tiny_out
    src_cfg = json.loads((tiny_src / "config.json").read_text())
    n_layers = src_cfg["num_hidden_layers"]

    model, info = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"], "the MTP layer should be present (kept by default)"
    assert all(k.startswith(f"model.layers.{n_layers}.") for k in info["unexpected_keys"]), info["unexpected_keys"]

    # reference: the same architecture with the oracle's weights (written by this test, config without quantization)
    ref_dir = tmp_path / "oracle_model"
    ref_dir.mkdir()
    save_file(_oracle_state_dict(tiny_src, tiny_oracle, n_layers), str(ref_dir / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {k: v for k, v in src_cfg.items() if k != "quantization_config"}
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    ref, ref_info = DeepseekV3ForCausalLM.from_pretrained(ref_dir, dtype=torch.float32, output_loading_info=True)
    assert not ref_info["missing_keys"] and not ref_info["unexpected_keys"]

    ref_sd, got_sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k

    ids = torch.tensor([[0, 5, 17, 100, 300, 2, 511, 42, 7, 256]])
    with torch.no_grad():
        a = model.eval()(ids).logits
        b = ref.eval()(ids).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


# --- options ---------------------------------------------------------------------------------------------------

def test_mtp_drop(tiny_src, tiny_out, tmp_path):
    out = tmp_path / "drop"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--mtp", "drop", "--json")
    assert r.rc == 0, str(r)
    rep = r.json()
    src_cfg = json.loads((tiny_src / "config.json").read_text())
    prefix = f"model.layers.{src_cfg['num_hidden_layers']}."
    src_mtp = {n for n in read_index(tiny_src)["weight_map"] if n.startswith(prefix)}
    assert src_mtp

    got = read_tensors(out)
    idx = read_index(out)
    assert not [n for n in got if n.startswith(prefix)] and not [n for n in idx["weight_map"] if n.startswith(prefix)]
    assert idx["weight_map"] == {n: v[3] for n, v in got.items()}
    assert idx["metadata"]["total_size"] == sum(len(v[2]) for v in got.values())
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0

    dropped = rep["plan"]["dropped"]
    names = {d["name"] for d in dropped}
    assert {n for n in src_mtp if not n.endswith(SCALE)} <= names <= src_mtp
    assert all(d.get("reason") for d in dropped)
    # every input tensor is accounted for: written (with the scales it consumed) or dropped with a reason
    per_tensor = json.loads((out / "report.json").read_text())["tensors"]
    accounted = {t["name"] for t in per_tensor} | {t["name"] + SCALE for t in per_tensor if t["action"] == "dequant"}
    accounted |= names
    assert accounted == set(read_index(tiny_src)["weight_map"]), \
        sorted(set(read_index(tiny_src)["weight_map"]) - accounted)[:5]
    # everything else is exactly what the default conversion writes
    kept = read_tensors(tiny_out[0])
    assert {n: v[:3] for n, v in got.items()} == {n: v[:3] for n, v in kept.items() if not n.startswith(prefix)}

    transformers = pytest.importorskip("transformers")
    _, info = transformers.DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_max_shard_size(tiny_src, tiny_out, tmp_path):
    limit = 1_000_000
    out = tmp_path / "split"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--max-shard-size", str(limit), "-q")
    assert r.rc == 0, str(r)
    files = shard_files(out)
    assert len(files) > 1
    n = len(files)
    assert [f.name for f in files] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    got = read_tensors(out)
    for f in files:
        in_shard = [v for v in got.values() if v[3] == f.name]
        size = sum(len(v[2]) for v in in_shard)
        assert size <= limit or len(in_shard) == 1, (f.name, size)
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
    ref = read_tensors(tiny_out[0])
    assert {k: v[:3] for k, v in got.items()} == {k: v[:3] for k, v in ref.items()}
    idx = read_index(out)
    assert idx["weight_map"] == {k: v[3] for k, v in got.items()}
    assert idx["metadata"]["total_size"] == sum(len(v[2]) for v in got.values())


def test_hf_cache_snapshot_layout(tiny_src, tiny_out, tmp_path):
    """models--org--name/snapshots/<rev>/ of relative symlinks into blobs/, as huggingface_hub lays it out."""
    repo = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-R1"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    for f in sorted(tiny_src.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(tiny_src)
        import hashlib
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    before = tree_hashes(repo)

    out = tmp_path / "out"
    r = run_cli("fp8-to-bf16", snap, "-o", out, "-q")
    assert r.rc == 0, str(r)
    got, ref = tree_hashes(out), tree_hashes(tiny_out[0])
    got.pop("report.json"), ref.pop("report.json")
    assert got == ref
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert tree_hashes(repo) == before and all(p.is_symlink() for p in snap.rglob("*") if not p.is_dir())


def test_dtype_f32_equals_oracle_before_rounding(tiny_src, tiny_out, tiny_oracle, tmp_path):
    out = tmp_path / "f32"
    r = run_cli("fp8-to-bf16", tiny_src, "-o", out, "--dtype", "f32", "-q")
    assert r.rc == 0, str(r)
    got = read_tensors(out)
    for name, (prod, _) in tiny_oracle.items():
        dtype, shape, raw, _ = got[name]
        assert dtype == "float32" and shape == prod.shape
        g = np.frombuffer(raw, dtype=np.uint32).reshape(shape)
        assert np.array_equal(g, prod.view(np.uint32)), name
    ref = read_tensors(tiny_out[0])
    for name, v in ref.items():
        if name not in tiny_oracle:
            assert got[name][:3] == v[:3], name  # pass-through tensors keep their dtype and bytes
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_deepseek_v32_indexer_is_dequantized_and_nothing_invented(tmp_path):
    """docs/known-failures.md item 12: V3.2's indexer wq_b/wk are FP8 + scale and must be dequantized; k_norm and the
    BF16 weights_proj are kept as they are, and no weights_proj.bias is invented."""
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path / "v32", "tiny", model_type="deepseek_v32")
    out = tmp_path / "out"
    r = run_cli("fp8-to-bf16", str(src), "-o", str(out), "--json", "-q")
    assert r.rc == 0, r
    a, b = read_tensors(src), read_tensors(out)
    idx = sorted(n for n in a if ".indexer." in n and not n.endswith(SCALE))
    assert idx and sorted(n for n in b if ".indexer." in n) == idx
    oracle = oracle_outputs(src)
    for n in idx:
        if n.endswith(("wq_b.weight", "wk.weight")):
            assert a[n][0] == "float8_e4m3fn" and b[n][0] == "bfloat16"
            assert_bits_equal(n, b[n][2], oracle[n][1])
        else:
            assert b[n][:3] == a[n][:3], n  # k_norm (F32) and weights_proj (BF16) byte-identical
    assert not any(n.endswith("weights_proj.bias") for n in b)
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v32"
