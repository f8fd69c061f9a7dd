"""The real-dimension fixture (``make-fixture --preset real``): layout against the release's published figures,
bytes read back with the ``safetensors`` library, the constructed tokenizer with the ``tokenizers`` library, and
bounded memory while streaming."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from dsconvert.errors import UsageError
from dsconvert.testing.realsize import (RealOptions, _Pools, _Row, _write_shard, plan_real, real_spec,
                                        write_constructed_tokenizer)

# Release shapes (docs/checkpoint-layout.md section 2), written out here rather than derived from the code.
ATTN = {"self_attn.q_a_proj.weight": ((1536, 7168), (12, 56)),
        "self_attn.q_b_proj.weight": ((24576, 1536), (192, 12)),
        "self_attn.kv_a_proj_with_mqa.weight": ((576, 7168), (5, 56)),
        "self_attn.kv_b_proj.weight": ((32768, 512), (256, 4)),
        "self_attn.o_proj.weight": ((7168, 16384), (56, 128))}
DENSE = {"mlp.gate_proj.weight": ((18432, 7168), (144, 56)), "mlp.up_proj.weight": ((18432, 7168), (144, 56)),
         "mlp.down_proj.weight": ((7168, 18432), (56, 144))}
EXPERT = {"gate_proj.weight": ((2048, 7168), (16, 56)), "up_proj.weight": ((2048, 7168), (16, 56)),
          "down_proj.weight": ((7168, 2048), (56, 16))}


def test_full_release_plan_matches_published_counts():
    """61 layers (3 dense) + MTP with 256 experts: the release's tensor count, FP8 count and total_size exactly."""
    shards = plan_real(real_spec(RealOptions(layers=61, dense_layers=3, mtp=True, experts=256)))
    rows = [r for s in shards for r in s]
    assert len(rows) == 91_991
    assert sum(r.dtype == "F8_E4M3" for r in rows) == 45_808
    assert sum(r.name.endswith("_scale_inv") for r in rows) == 45_808
    assert sum(r.nbytes for r in rows) == 688_574_839_360
    assert max(sum(r.nbytes for r in s) for s in shards) <= 4_300_000_000
    assert 150 <= len(shards) <= 170  # the release has 163, some of them short
    where = {r.name: i for i, s in enumerate(shards) for r in s}
    assert where["model.embed_tokens.weight"] == 0
    assert where["model.layers.61.shared_head.head.weight"] == len(shards) - 1
    cross = [n for n in where if n.endswith("_scale_inv") and where[n] != where[n[: -len("_scale_inv")]]]
    assert cross and all(where[n] == where[n[: -len("_scale_inv")]] + 1 for n in cross)


@pytest.mark.parametrize("kw", [dict(experts=12), dict(experts=8), dict(layers=0), dict(layers=2, dense_layers=3)])
def test_invalid_options_refused(kw):
    with pytest.raises(UsageError):
        real_spec(RealOptions(**kw))


def test_shard_writer_read_back_with_safetensors(tmp_path):
    """A shard of real-size attention tensors, norms, router and bias, read back with the safetensors library:
    header dtypes/shapes, save_file's layout order, FP8 bytes with no NaN pattern and a realistic block amax,
    positive finite scales of the right magnitude, and the small tensors' exact values."""
    spec = real_spec(RealOptions(experts=16))
    p = "model.layers.1."
    rows = []
    for n, (shp, grid) in ATTN.items():
        rows += [_Row(p + n, shp, "F8_E4M3", "fp8"), _Row(p + n + "_scale_inv", grid, "F32", "scale")]
    rows += [_Row(p + "input_layernorm.weight", (7168,), "BF16", "norm"),
             _Row(p + "mlp.gate.weight", (16, 7168), "BF16", "router"),
             _Row(p + "mlp.gate.e_score_correction_bias", (16,), "F32", "bias")]
    path = tmp_path / "model-00001-of-000001.safetensors"
    _write_shard(path, rows, spec, _Pools(0), {r.name: r.shape for r in rows}, 1 << 20)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert sorted(keys) == sorted(r.name for r in rows)
        assert f.metadata() == {"format": "pt"}
        for n, (shp, grid) in ATTN.items():
            w = f.get_tensor(p + n)
            s = f.get_tensor(p + n + "_scale_inv")
            assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == shp
            assert s.dtype == torch.float32 and tuple(s.shape) == grid
            b = w.view(torch.uint8)
            assert not bool(((b == 0x7F) | (b == 0xFF)).any())
            assert float(w[:128, :128].float().abs().max()) >= 320  # amax of a block maps to (nearly) 448
            assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
            std = float((w[:256].float() * s.repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)
                         [:, : shp[1]]).std())
            target = 0.5 / math.sqrt(shp[1]) * (0.25 if n.endswith("o_proj.weight") else 1.0)
            assert 0.5 * target < std < 2 * target
        assert f.get_tensor(p + "mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor(p + "input_layernorm.weight").dtype == torch.bfloat16
    # safetensors' own order: dtype alignment descending (F32, BF16, F8_E4M3), then name
    with open(path, "rb") as fh:
        hdr = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    order = sorted((v["data_offsets"][0], k) for k, v in hdr.items() if k != "__metadata__")
    rank = {"F32": 0, "BF16": 1, "F8_E4M3": 2}
    names = [k for _, k in order]
    assert names == sorted(names, key=lambda k: (rank[hdr[k]["dtype"]], k))


def test_constructed_tokenizer_loads_with_tokenizers(tmp_path):
    from tokenizers import Tokenizer

    write_constructed_tokenizer(tmp_path, 129_280)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 129_280
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(129_280))
    assert vocab["<｜begin▁of▁sentence｜>"] == 0 and vocab["<｜end▁of▁sentence｜>"] == 1
    text = "The quick brown fox, 2 + 2 = 4! Ünïcödé 你好 <｜User｜>hi"
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text.encode())  # merges apply: fewer tokens than bytes
    assert vocab["<｜User｜>"] in ids
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"]["content"] == "<｜begin▁of▁sentence｜>"


BUILD = """
import json, sys
from dsconvert.testing.realsize import RealOptions, write_real_checkpoint
write_real_checkpoint(sys.argv[1], RealOptions(layers=2, dense_layers=1, mtp=False, experts=16),
                      shard_bytes=1_000_000_000)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"vmhwm_kib": int(hwm)}))
"""


@pytest.mark.slow
def test_streaming_write_real_dims(tmp_path):
    """1 dense + 1 MoE layer (16 experts), 5.2 GB: every tensor's shape and dtype as the release's, the index
    against the files (read by safetensors), ``inspect`` finds no problem, and the writer's peak RSS stays below
    1 GiB although single tensors (embed, lm_head) are 1.85 GB."""
    out = tmp_path / "real"
    res = subprocess.run([sys.executable, "-c", BUILD, str(out)], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1])["vmhwm_kib"] < 2**20
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen, total = {}, 0
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):06d}.safetensors" for i in range(1, len(shards) + 1)]
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                seen[k] = (sl.get_dtype(), tuple(sl.get_shape()))
                total += math.prod(sl.get_shape()) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[sl.get_dtype()]
                assert index["weight_map"][k] == shard
    assert set(seen) == set(index["weight_map"]) and total == index["metadata"]["total_size"]
    assert seen["model.embed_tokens.weight"] == ("BF16", (129280, 7168))
    assert seen["lm_head.weight"] == ("BF16", (129280, 7168))
    assert seen["model.layers.1.mlp.gate.weight"] == ("BF16", (16, 7168))
    assert seen["model.layers.1.mlp.gate.e_score_correction_bias"] == ("F32", (16,))
    for layer in (0, 1):
        for n, (shp, grid) in ATTN.items():
            assert seen[f"model.layers.{layer}.{n}"] == ("F8_E4M3", shp)
            assert seen[f"model.layers.{layer}.{n}_scale_inv"] == ("F32", grid)
    for n, (shp, grid) in DENSE.items():
        assert seen[f"model.layers.0.{n}"] == ("F8_E4M3", shp)
        assert seen[f"model.layers.0.{n}_scale_inv"] == ("F32", grid)
    for e in [*(f"experts.{i}." for i in range(16)), "shared_experts."]:
        for n, (shp, grid) in EXPERT.items():
            assert seen[f"model.layers.1.mlp.{e}{n}"] == ("F8_E4M3", shp)
            assert seen[f"model.layers.1.mlp.{e}{n}_scale_inv"] == ("F32", grid)
    assert "model.layers.1.mlp.experts.16.up_proj.weight" not in seen
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["first_k_dense_replace"],
            cfg["n_routed_experts"], cfg["num_nextn_predict_layers"], cfg["n_group"], cfg["topk_group"],
            cfg["num_experts_per_tok"]) == (7168, 129280, 2, 1, 16, 0, 8, 4, 8)
    rep = subprocess.run([sys.executable, "-m", "dsconvert.cli", "inspect", str(out), "--json"],
                         capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    rep = json.loads(rep.stdout)
    assert rep["ok"] and rep["problems"] == []


@pytest.mark.parametrize("args", [["--experts", "12"], ["--layers", "1", "--dense-layers", "2"],
                                  ["--preset", "tiny", "--shard-size", "1G"]])
def test_cli_refuses_bad_flags_before_writing(tmp_path, args):
    from typer.testing import CliRunner

    from dsconvert.cli import app

    out = tmp_path / "fx"
    argv = ["make-fixture", str(out)] + ([] if "--preset" in args else ["--preset", "real"]) + args
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, res.output
    assert not out.exists() or not any(out.iterdir())
