"""``dsconvert gguf`` end to end: read back with gguf-py, FP8 reference, BF16/FP8 identity, splits, resume,
dry run, bad inputs, --imatrix, the GGUF weight source; llama.cpp tier (logits, block identity).

Fixtures: ``tiny`` (the FP8 tiny release: hidden 320, so K-quants fall back to legacy types) and ``kq``
(hidden/ranks 256, so every K-quant is exercised; router bias spread so routing is decisive).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from .._reference import bf16_rne_bits

from dsconvert.cli import app
from dsconvert.convert import fp8_to_bf16 as f2b
from dsconvert.convert import gguf_export as ge
from dsconvert.convert.gguf_source import GGUFWeightSource
from dsconvert.convert.weights import CheckpointWeightSource
from dsconvert.formats import gguf_deepseek2 as g2
from dsconvert.quant import ggml
from dsconvert.testing.fixtures import build_checkpoint

REPO = Path(__file__).resolve().parents[2]
KQ = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=256,
          num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1, num_shards=2)


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------


def export(src: Path, out: Path, **kw) -> dict:
    """``ge.run`` with dsconvert's torch kernels unless ``kernel`` is given: the comparisons with llama.cpp below
    test our quantizers, not ggml against itself (``--kernel ggml`` has its own tests)."""
    return ge.run(src, out, ge.GGUFOptions(**{"kernel": "torch", **kw}), progress=False)


def cli(*args: str):
    res = CliRunner().invoke(app, [str(a) for a in args])
    res.text = " ".join(res.output.split())  # rich wraps long messages at the terminal width
    return res


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def edit_copy(src: Path, dst: Path, *, drop=(), add: dict | None = None, config: dict | None = None,
              replace: dict | None = None) -> Path:
    """Copy checkpoint ``src`` to ``dst`` and drop/add/replace tensors (rewriting shards and index)."""
    shutil.copytree(src, dst)
    idx = _index(dst)
    idx["metadata"].pop("total_size", None)
    for shard in sorted(set(idx["weight_map"].values())):
        names = [n for n, s in idx["weight_map"].items() if s == shard]
        if not any(n in drop or n in (replace or {}) for n in names):
            continue
        t = load_file(dst / shard)
        for n in drop:
            t.pop(n, None)
        for n, v in (replace or {}).items():
            if n in t:
                t[n] = v
        save_file(t, str(dst / shard), metadata={"format": "pt"})
    for n in drop:
        idx["weight_map"].pop(n, None)
    if add:
        save_file(add, str(dst / "model-extra.safetensors"), metadata={"format": "pt"})
        idx["weight_map"].update({n: "model-extra.safetensors" for n in add})
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf_export")


@pytest.fixture(scope="module")
def tiny(work) -> Path:
    return build_checkpoint(work / "tiny", "tiny")


@pytest.fixture(scope="module")
def tiny_bf16(work, tiny) -> Path:
    out = work / "tiny-bf16"
    f2b.run(tiny, out, f2b.Options(), progress=False)
    return out


@pytest.fixture(scope="module")
def kq(work) -> Path:
    """K-quant friendly shapes; e_score_correction_bias spread (positive, decreasing) so routing is decisive."""
    src = build_checkpoint(work / "kq-build", "tiny", **KQ)
    bias = {n: torch.linspace(2.05, 0.05, KQ["n_routed_experts"]) for n in _index(src)["weight_map"]
            if n.endswith("e_score_correction_bias")}
    out = edit_copy(src, work / "kq", replace=bias)
    shutil.rmtree(src)
    return out


@pytest.fixture(scope="module")
def tiny_gguf_bf16(work, tiny) -> tuple[Path, dict]:
    out = work / "out" / "tiny-BF16.gguf"
    return out, export(tiny, out, type="BF16")


@pytest.fixture(scope="module")
def kq_q4km(work, kq) -> tuple[Path, dict]:
    out = work / "out" / "kq-Q4_K_M.gguf"
    return out, export(kq, out, type="Q4_K_M")


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def raw(t) -> np.ndarray:
    return np.asarray(t.data).reshape(-1).view(np.uint8)


def load_all(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(_index(src)["weight_map"].values())):
        out.update(load_file(src / shard))
    return out


def fp8_reference_bits(w: torch.Tensor, s: torch.Tensor, exact: bool = False) -> np.ndarray:
    """Independent dequant: numpy float32 product with the 128x128 scale tile; its float32 bits (uint32) when
    ``exact``, else bf16 RNE by integer ops (uint16)."""
    x = w.to(torch.float32).numpy()
    m, n = x.shape
    sc = np.repeat(np.repeat(s.numpy(), 128, axis=0), 128, axis=1)[:m, :n]
    prod = (x * sc).astype(np.float32)
    return prod.view(np.uint32) if exact else bf16_rne_bits(prod)


# ------------------------------------------------------------------------------------------------
# BF16 / F32 path
# ------------------------------------------------------------------------------------------------


def test_bf16_read_back_keys_names_shapes_types(tiny, tiny_gguf_bf16):
    path, rep = tiny_gguf_bf16
    f = fields(path)
    cfg = json.loads((tiny / "config.json").read_text())
    assert f["general.architecture"] == "deepseek2" and f["general.file_type"] == 32
    assert f["deepseek2.attention.head_count_kv"] == 1  # docs/known-failures.md item 19
    assert f["deepseek2.attention.key_length"] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert f["deepseek2.attention.key_length_mla"] == cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    assert f["deepseek2.attention.value_length_mla"] == cfg["v_head_dim"]
    assert f["deepseek2.expert_gating_func"] == 2 and f["deepseek2.block_count"] == 3
    assert f["tokenizer.ggml.pre"] == "deepseek-v3" and "deepseek2.nextn_predict_layers" not in f
    plan = g2.plan_tensors({n: (tuple(e.shape), e.dtype) for n, (_, e) in ge.open_checkpoint(tiny).tensors.items()
                            if not n.endswith("_scale_inv")}, cfg)
    got = tensors(path)
    assert list(got) == [t.name for t in plan]  # file order = plan order
    for t in plan:
        g = got[t.name]
        assert tuple(int(x) for x in g.shape) == t.ne, t.name
        want = "F32" if t.force_f32 else "BF16"
        assert gguf.GGMLQuantizationType(g.tensor_type).name == want, t.name
    assert rep["plan"]["layout"] == ge.LAYOUT and rep["plan"]["tensors"] == len(plan)
    assert path.stat().st_size == rep["plan"]["total_size"]["bytes"] == rep["output"]["bytes"]


@pytest.mark.parametrize("qtype", ["BF16", "F32"])
def test_fp8_tensors_equal_independent_dequant(tiny, tiny_gguf_bf16, work, qtype):
    """docs/known-failures.md item 17: every FP8-sourced tensor equals, bit for bit, bf16_rne(fp32(w) * scale) in a
    BF16 file and the exact product fp32(w) * scale in an F32 file (what every quantized type is made from, as
    llama.cpp's converter dequantizes), not that product rounded to bf16 first (checked to differ)."""
    if qtype == "BF16":
        path = tiny_gguf_bf16[0]
    else:
        path = work / "out" / "tiny-F32.gguf"
        if not path.exists():
            export(tiny, path, type="F32")
    cfg = json.loads((tiny / "config.json").read_text())
    src = load_all(tiny)
    ck = ge.open_checkpoint(tiny)
    plan = ge.make_plan(ck, ge.GGUFOptions(type=qtype), path).gguf_plan
    got = tensors(path)
    nh, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    n_fp8 = n_rounded = 0
    for t in plan:
        if t.src_dtype != "F8_E4M3":
            continue
        n_fp8 += 1
        parts = [fp8_reference_bits(src[s], src[s + "_scale_inv"], exact=qtype == "F32") for s in t.sources]
        if qtype == "F32":
            n_rounded += sum(int((p != bf16_rne_bits(p.view(np.float32)).astype(np.uint32) << 16).sum())
                             for p in parts)
        if t.kind == "stack_experts":
            want = np.stack(parts)
        elif t.kind == "copy":
            want = parts[0]
        else:
            kv = parts[0].reshape(nh, nope + v, -1)  # (n_head, nope+v, kv_lora)
            want = kv[:, :nope].transpose(0, 2, 1) if t.kind == "kv_b_k" else kv[:, nope:]
        have = raw(got[t.name]).view(np.uint16 if qtype == "BF16" else np.uint32).reshape(t.shape)
        assert np.array_equal(have, np.ascontiguousarray(want)), t.name
    assert n_fp8 >= 20
    assert qtype == "BF16" or n_rounded > 0  # the F32 values are not all representable in bf16


def test_data_layout_equals_gguf_writer(tiny, tiny_gguf_bf16, tmp_path):
    """Our streamed data section is byte-identical to gguf-py's own GGUFWriter with the same tensors."""
    path, _ = tiny_gguf_bf16
    cfg = json.loads((tiny / "config.json").read_text())
    w = gguf.GGUFWriter(str(tmp_path / "ref.gguf"), "deepseek2")
    g2.write_metadata(w, cfg, g2.file_type_id("BF16"))
    g2.write_vocab(w, tiny, cfg)
    for name, t in tensors(path).items():
        w.add_tensor(name, np.array(t.data), raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert (tmp_path / "ref.gguf").read_bytes() == path.read_bytes()


def test_fp8_and_bf16_sources_give_identical_bf16_files(tiny, tiny_bf16, tiny_gguf_bf16, work):
    """docs/known-failures.md item 16: the FP8 release and our BF16 conversion of it give byte-identical BF16
    GGUFs (quantized types differ: from FP8 they are made from the exact product, see above)."""
    b = work / "out" / "tiny-bf16src-BF16.gguf"
    export(tiny_bf16, b, type="BF16")
    assert tiny_gguf_bf16[0].read_bytes() == b.read_bytes()


def test_mtp_dropped_and_reported(tiny, tiny_gguf_bf16):
    path, rep = tiny_gguf_bf16
    ck = ge.open_checkpoint(tiny)
    mtp = [n for n in ck.tensors if ck.is_mtp(n) and not ck.is_scale(n)]
    mtp_bytes = sum(ck.entry(n).nbytes for n in ck.tensors if ck.is_mtp(n))
    d = rep["plan"]["dropped"]
    assert d["tensors"] == len(mtp) > 0 and d["bytes"] == mtp_bytes
    assert d["scales"] == sum(1 for n in ck.tensors if ck.is_mtp(n) and ck.is_scale(n))
    assert len(d["reasons"]) == 1 and "MTP layer 3" in d["reasons"][0]["reason"]
    assert not [n for n in tensors(path) if n.startswith("blk.3.")]
    res = cli("gguf", tiny, "--dry-run")
    assert res.exit_code == 0 and f"dropped {len(mtp)} tensors" in res.text and "MTP" in res.text


def test_gguf_source_fuses_kv_b_bit_exact_and_validate(tiny, tiny_gguf_bf16):
    """kv_b re-fused from attn_k_b/attn_v_b bit-exactly; experts un-stacked; validate on the .gguf gives 0 KLD."""
    path, _ = tiny_gguf_bf16
    ref = CheckpointWeightSource(tiny)
    src = GGUFWeightSource(path)
    cfg = json.loads((tiny / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "vocab_size", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
              "n_routed_experts", "first_k_dense_replace", "scoring_func", "rms_norm_eps", "routed_scaling_factor"):
        assert src.config[k] == cfg[k], k
    assert src.config["rope_scaling"]["mscale_all_dim"] == cfg["rope_scaling"]["mscale_all_dim"]
    n = 0
    for name in ref.ck.tensors:
        if ref.ck.is_scale(name) or ref.ck.is_mtp(name):
            assert not src.has(name) or ref.ck.is_scale(name)
            continue
        assert src.has(name), name
        assert torch.equal(src.get(name), ref.get(name).float()), name
        n += 1
    assert n > 50 and src.has("model.layers.1.self_attn.kv_b_proj.weight")
    res = cli("validate", path, "--reference", tiny, "--token-ids", "0,5,6,7,8,9,10,11", "--json", "-q")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["mean_kld"] == 0 and rep["same_top_p"] == 1


# ------------------------------------------------------------------------------------------------
# quantized types
# ------------------------------------------------------------------------------------------------


def test_q4_k_m_types_and_dequant_read_back(kq, kq_q4km):
    path, rep = kq_q4km
    ck = ge.open_checkpoint(kq)
    plan = ge.make_plan(ck, ge.GGUFOptions(type="Q4_K_M"), path)
    got = tensors(path)
    types = {n: gguf.GGMLQuantizationType(t.tensor_type).name for n, t in got.items()}
    assert types == plan.types
    assert types["output.weight"] == "Q6_K" and types["blk.1.attn_k_b.weight"] == "Q5_0"  # ne0 = 32: fallback
    assert {"Q4_K", "Q6_K", "Q5_0", "F32"} <= set(types.values())
    assert fields(path)["general.file_type"] == 15
    src = GGUFWeightSource(path)
    for name, t in got.items():
        ours = src.read(name).numpy()
        assert np.array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)), name
    # and the blocks are our quantizer applied to the exact float32 product of the FP8 weight and its scale
    w = load_all(kq)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    x = torch.from_numpy(fp8_reference_bits(w[name], w[name + "_scale_inv"], exact=True).view(np.float32))
    per = raw(got["blk.1.ffn_down_exps.weight"]).reshape(4, -1)[2]
    assert np.array_equal(per, ggml.quantize(x, types["blk.1.ffn_down_exps.weight"]).numpy().reshape(-1))
    assert rep["plan"]["types"]["Q4_K"]["tensors"] == sum(1 for v in types.values() if v == "Q4_K")


def test_type_options_and_unsupported_types(kq, work):
    ck = ge.open_checkpoint(kq)
    p = ge.make_plan(ck, ge.GGUFOptions(type="Q4_K", tensor_types=["attn_k_b=Q8_0"], output_tensor_type="Q8_0",
                                        token_embedding_type="Q6_K"), None)
    assert p.pure and p.types["blk.1.attn_k_b.weight"] == "Q8_0" and p.types["output.weight"] == "Q8_0"
    assert p.types["token_embd.weight"] == "Q6_K" and p.types["blk.1.ffn_down_exps.weight"] == "Q4_K"
    res = cli("gguf", kq, "--type", "TQ1_0", "--dry-run")
    assert res.exit_code == 2 and "--type TQ1_0: TQ types" in res.text and "not supported yet" in res.text
    assert "(dsconvert has no TQ1_0 quantizer)" in res.text
    # with IQ3_XXS and IQ3_S registered, the IQ3 mixes and IQ2_S/IQ2_M (IQ3_S on some tensors) are writable
    n = ge.type_names()
    assert {"IQ2_M", "IQ3_XS", "IQ3_M"} <= set(n["mixes"]) and {"IQ3_XXS", "IQ3_S", "IQ2_S"} <= set(n["types"])
    for f in ("IQ3_S", "IQ3_M"):
        res = cli("gguf", kq, "--type", f, "--dry-run")
        assert res.exit_code == 0, res.text
    for f in ("IQ3_XXS", "IQ2_M"):   # past the quantizer check; llama.cpp wants an imatrix for these
        res = cli("gguf", kq, "--type", f, "--dry-run")
        assert res.exit_code == 2 and "need an importance matrix" in res.text and "not supported yet" not in res.text
    res = cli("gguf", kq, "--type", "Q9_X", "--dry-run")
    assert res.exit_code == 2 and "unknown --type" in res.text


def _bpw(t: str) -> float:
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    return 8 * ts / bs


def test_recipe_puts_bits_where_deepseek_needs_them_and_user_rules_win(kq, tmp_path):
    from dsconvert.formats.gguf_recipes import RECIPES

    ck = ge.open_checkpoint(kq)
    p = ge.make_plan(ck, ge.GGUFOptions(recipe="deepseek-Q2_K_XL"), None)
    assert p.ftype == "Q2_K"
    for n, t in p.types.items():
        if n.endswith("norm.weight") or "ffn_gate_inp" in n or "exp_probs_b" in n:
            assert t == "F32", n
        elif "_exps" in n:  # routed experts: the low-bit type, ffn_down one step higher
            assert t == ("Q3_K" if "ffn_down" in n else "Q2_K"), (n, t)
        else:  # attention, shared experts, dense FFN, embedding, output: >= 4 bits (after shape fallbacks)
            assert _bpw(t) >= 4.5, (n, t)
    for n, t in p.types.items():
        if "ffn_down_exps" in n:
            assert _bpw(t) > _bpw(p.types[n.replace("ffn_down", "ffn_gate")])
    # the same rules from a --tensor-type-file (with comments) plan the same; a user rule wins over the recipe
    rules = tmp_path / "rules.txt"
    rules.write_text("# DeepSeek Q2_K_XL\n" + "\n".join(f"{r}   # rule {i}" for i, r in
                                                         enumerate(RECIPES["deepseek-Q2_K_XL"].tensor_types)) + "\n")
    a = cli("gguf", kq, "--recipe", "deepseek-q2_k_xl", "--dry-run", "--json")
    b = cli("gguf", kq, "--type", "Q2_K", "--tensor-type-file", rules, "--dry-run", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    assert ja["plan"]["types"] == jb["plan"]["types"] and ja["plan"]["total_size"] == jb["plan"]["total_size"]
    assert ja["options"]["recipe"]["name"] == "deepseek-Q2_K_XL"
    p2 = ge.make_plan(ck, ge.GGUFOptions(recipe="deepseek-Q2_K_XL", type="Q3_K_M",
                                         tensor_types=["ffn_down_exps=q4_k"]), None)
    assert p2.ftype == "Q3_K_M" and all(t == "Q4_K" for n, t in p2.types.items() if "ffn_down_exps" in n)
    # refusals name what to fix
    rules.write_text("attn_=q8_0\nffn_down_exps q4_k\n")
    res = cli("gguf", kq, "--tensor-type-file", rules, "--dry-run")
    assert res.exit_code == 2 and f"{rules}, line 2: malformed rule 'ffn_down_exps'" in res.text, res.text
    res = cli("gguf", kq, "--recipe", "nope", "--dry-run")
    assert res.exit_code == 2 and "unknown --recipe 'nope'" in res.text and "deepseek-IQ1_S" in res.text


@pytest.mark.llamacpp
def test_recipe_file_reads_back_and_llama_cpp_runs_it(kq, work):
    from dsconvert.model.metrics import compare_logits

    llama_cpp = _llama_cpp()
    path = work / "out" / "kq-recipe-Q2_K_XL.gguf"
    rep = export(kq, path, recipe="deepseek-Q2_K_XL")
    plan = ge.make_plan(ge.open_checkpoint(kq), ge.GGUFOptions(recipe="deepseek-Q2_K_XL"), path)
    types = {n: gguf.GGMLQuantizationType(t.tensor_type).name for n, t in tensors(path).items()}
    assert types == plan.types and {"Q2_K", "Q3_K", "Q6_K", "F32"} <= set(types.values())
    assert fields(path)["general.file_type"] == 10  # LLAMA_FTYPE_MOSTLY_Q2_K
    assert rep["options"]["recipe"]["name"] == "deepseek-Q2_K_XL"
    got = llama_logits(llama_cpp, path)
    b = compare_logits(ref_logits(GGUFWeightSource(path)), got, torch.tensor(TOKENS))
    assert b["mean_kld"] <= KLD_BOUNDS["Q4_K_M"][1], b["mean_kld"]  # llama.cpp's arithmetic on our bytes


# ------------------------------------------------------------------------------------------------
# splits, resume, dry run
# ------------------------------------------------------------------------------------------------


def test_splits_read_back_and_union_equals_single(tiny, tiny_gguf_bf16, work):
    single, _ = tiny_gguf_bf16
    out = work / "split" / "tiny.gguf"
    rep = export(tiny, out, type="BF16", split_max_size=1_500_000)
    files = [Path(f) for f in rep["output"]["files"]]
    n = len(files)
    assert n >= 3 and [f.name for f in files] == [f"tiny-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert not out.exists()
    whole = tensors(single)
    union: dict = {}
    for i, f in enumerate(files):
        kv = fields(f)
        assert kv["split.no"] == i and kv["split.count"] == n and kv["split.tensors.count"] == len(whole)
        assert ("general.architecture" in kv) == (i == 0) and ("tokenizer.ggml.tokens" in kv) == (i == 0)
        ts = tensors(f)
        assert sum(int(t.n_bytes) for t in ts.values()) <= 1_500_000 or len(ts) == 1
        union.update(ts)
        assert f.stat().st_size == rep["plan"]["files"][i]["bytes"]
    assert list(union) == list(whole)
    for name, t in whole.items():
        assert np.array_equal(raw(union[name]), raw(t)), name
        assert union[name].tensor_type == t.tensor_type


_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from dsconvert.convert import gguf_export as ge
orig_write, orig_chunks = ge.write_file, ge.tensor_chunks
state = {"files": 0}
def chunks(*a, **k):
    for i, c in enumerate(orig_chunks(*a, **k)):
        yield c
        if state["files"] == 2 and i >= 0:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-way through file 2
def write_file(*a, **k):
    state["files"] += 1
    return orig_write(*a, **k)
ge.write_file, ge.tensor_chunks = write_file, chunks
ge.run(Path(sys.argv[1]), Path(sys.argv[2]), ge.GGUFOptions(type="Q8_0", split_max_size=400_000), progress=False)
"""


def test_resume_after_sigkill_is_byte_identical(tiny, work):
    ref = work / "resume-ref" / "m.gguf"
    ref_rep = export(tiny, ref, type="Q8_0", split_max_size=400_000)
    out = work / "resume" / "m.gguf"
    out.parent.mkdir()
    p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tiny), str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    man = json.loads(ge.manifest_path(out).read_text())
    assert len(man["files"]) == 1 and not man["complete"]
    assert list(out.parent.glob("*.gguf.tmp"))  # the interrupted second file
    rep = export(tiny, out, type="Q8_0", split_max_size=400_000)
    assert rep["resumed"] and rep["files_reused"] == 1 and rep["files_written"] == len(rep["output"]["files"]) - 1
    assert not list(out.parent.glob("*.tmp"))
    for a, b in zip(ref_rep["output"]["files"], rep["output"]["files"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    again = export(tiny, out, type="Q8_0", split_max_size=400_000)
    assert again["already_complete"] and again["files_written"] == 0
    # a resume with other options (or another source) is refused, exit 2
    res = cli("gguf", tiny, "-o", out, "--type", "Q4_0", "--split-max-size", "400K")
    assert res.exit_code == 2 and "refusing to resume" in res.text
    res = cli("gguf", tiny, "-o", out, "--type", "Q4_0", "--split-max-size", "400K", "--overwrite", "-q")
    assert res.exit_code == 0, res.output


def test_foreign_output_refused(tiny, work):
    out = work / "foreign" / "x.gguf"
    out.parent.mkdir()
    out.write_bytes(b"not ours")
    res = cli("gguf", tiny, "-o", out)
    assert res.exit_code == 2 and "no dsconvert manifest" in res.text
    assert out.read_bytes() == b"not ours"


def test_dry_run_writes_nothing(tiny, tiny_gguf_bf16, work):
    d = work / "dry"
    d.mkdir()
    res = cli("gguf", tiny, "-o", d / "x.gguf", "--type", "BF16", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    assert list(d.iterdir()) == []
    rep = json.loads(res.stdout)
    p = rep["plan"]
    assert p["total_size"]["bytes"] == tiny_gguf_bf16[0].stat().st_size
    assert set(p["types"]) == {"BF16", "F32"} and p["bpw"] > 16 and p["peak_memory_estimate"]["bytes"] > 0
    assert p["files"] == [{**p["files"][0], "name": "x.gguf"}]
    res = cli("gguf", tiny, "--type", "Q4_K_M", "--split-max-size", "1M", "--dry-run")
    assert res.exit_code == 0 and "-of-0000" in res.text and "Q5_0" in res.text


# ------------------------------------------------------------------------------------------------
# bad inputs, imatrix
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_exit_3(tiny, tiny_bf16, work):
    bad = edit_copy(tiny_bf16, work / "bad-name", add={"model.layers.0.self_attn.foo.weight": torch.ones(4, 4,
                                                                                                      dtype=torch.bfloat16)})
    res = cli("gguf", bad, "-o", work / "bad1.gguf")
    assert res.exit_code == 3 and "Can not map tensor 'model.layers.0.self_attn.foo.weight'" in res.text
    noscale = edit_copy(tiny, work / "bad-scale", drop=["model.layers.0.self_attn.o_proj.weight_scale_inv"])
    res = cli("gguf", noscale, "-o", work / "bad2.gguf")
    assert res.exit_code == 3 and "o_proj.weight" in res.text and "scale" in res.text
    v32 = edit_copy(tiny, work / "bad-v32", config={"model_type": "deepseek_v32"})
    res = cli("gguf", v32, "-o", work / "bad3.gguf", "--dry-run")
    assert res.exit_code == 3 and "deepseek_v32" in res.text
    assert not list(work.glob("bad*.gguf*"))


def _legacy_imatrix(path: Path, entries: dict[str, np.ndarray], ncall: int = 4) -> None:
    with open(path, "wb") as f:
        f.write(np.int32(len(entries)).tobytes())
        for name, v in entries.items():
            b = name.encode()
            f.write(np.int32(len(b)).tobytes() + b + np.array([ncall, v.size], np.int32).tobytes())
            f.write((v.astype(np.float32) * ncall).tobytes())


def test_imatrix(tiny, kq, work, tmp_path):
    ck = ge.open_checkpoint(tiny)
    plan = ge.make_plan(ck, ge.GGUFOptions(type="Q8_0"), None)
    ent = {t.name: np.full(t.shape[-1] * (t.shape[0] if len(t.shape) == 3 else 1), 0.5, np.float32)
           for t in plan.gguf_plan if not t.force_f32}
    dat = tmp_path / "imatrix.dat"
    _legacy_imatrix(dat, ent)
    assert np.allclose(ge.load_imatrix(dat)[next(iter(ent))], 0.5)
    # K-quant mixes use the weights: every quantized tensor but token_embd must have an entry of ne0 x n_mat
    rep = cli("gguf", tiny, "--type", "Q4_K_M", "--imatrix", dat, "--dry-run", "--json")
    assert rep.exit_code == 0, rep.text
    short = tmp_path / "short.dat"
    _legacy_imatrix(short, {k: v for k, v in ent.items() if "attn_k_b" not in k})
    res = cli("gguf", tiny, "--type", "Q4_K_M", "--imatrix", short, "--dry-run")
    assert res.exit_code == 3 and "attn_k_b" in res.text and "no entries" in res.text
    wrong = tmp_path / "wrong.dat"
    _legacy_imatrix(wrong, {k: (v[:-32] if "ffn_down_exps" in k else v) for k, v in ent.items()})
    res = cli("gguf", tiny, "--type", "Q4_K_M", "--imatrix", wrong, "--dry-run")
    assert res.exit_code == 3 and "wrong size" in res.text and "ffn_down_exps" in res.text
    # Q8_0 (and F16/BF16/F32) ignore an imatrix in llama.cpp too: accepted, reported as ignored
    rep = export(tiny, work / "out" / "imx-Q8_0.gguf", type="Q8_0", imatrix=dat)
    # every type the file holds ignores the imatrix (the tiny fixture's rows are all multiples of 32: no F16 fallback)
    from gguf import GGUFReader

    held = sorted({t.tensor_type.name for t in GGUFReader(str(work / "out" / "imx-Q8_0.gguf")).tensors})
    assert rep["plan"]["imatrix"]["used"] is False and rep["plan"]["imatrix"]["ignored_by_types"] == held
    # llama-quantize refuses Q2_K_S (and the IQ1/IQ2 types) without an imatrix; so does gguf, before writing
    res = cli("gguf", kq, "-o", work / "q2ks.gguf", "--type", "Q2_K_S")
    assert res.exit_code == 2 and "importance matrix" in res.text and "dsconvert imatrix" in res.text
    assert not (work / "q2ks.gguf").exists()
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\xff\xff\xff\x7f junk")
    res = cli("gguf", tiny, "--type", "Q8_0", "--imatrix", garbage, "--dry-run")
    assert res.exit_code == 3 and "imatrix" in res.text
    # the GGUF imatrix format (llama-imatrix >= 2025-07): in_sum2 / counts per matrix
    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), "imatrix")
    w.add_tensor("blk.1.ffn_down_exps.weight.in_sum2", np.arange(12, dtype=np.float32).reshape(2, 6))
    w.add_tensor("blk.1.ffn_down_exps.weight.counts", np.array([[2.0], [0.0]], np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    e = ge.load_imatrix(tmp_path / "imatrix.gguf")["blk.1.ffn_down_exps.weight"]
    assert np.array_equal(e, np.stack([np.arange(6) / 2, np.ones(6)]).astype(np.float32))


# ------------------------------------------------------------------------------------------------
# llama.cpp tier
# ------------------------------------------------------------------------------------------------

TOKENS = [0] + list(range(5, 60))


def _llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF oracle) is not installed")
    mod = llama_cpp.llama_cpp
    if not getattr(mod, "_dsconvert_no_extra_bufts", False):
        orig = mod.llama_model_default_params

        def params():  # docs/known-failures.md item 25: AMX repacking breaks quantized deepseek2
            p = orig()
            if hasattr(p, "use_extra_bufts"):
                p.use_extra_bufts = False
            return p

        mod.llama_model_default_params = params
        mod._dsconvert_no_extra_bufts = True

        @llama_cpp.llama_log_callback
        def _quiet(level, text, user_data):
            pass

        _llama_cpp.cb = _quiet
        llama_cpp.llama_log_set(_quiet, None)
    return llama_cpp


def llama_logits(llama_cpp, path: Path, ids=TOKENS) -> torch.Tensor:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    try:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        llm.close()


def ref_logits(source) -> torch.Tensor:
    from dsconvert.convert.validate import forward_many

    return forward_many(source, [TOKENS], torch.float32, return_hidden=False)[0][0]


@pytest.fixture(scope="module")
def kq_ref_logits(kq):
    return ref_logits(CheckpointWeightSource(kq))


# Measured on the kq fixture (2 cores, llama-cpp-python 0.3.36), Mean KLD of llama.cpp's logits against
#   (a) our reference forward on the FP8 source, and (b) our reference forward on the same GGUF dequantized:
#   F32 3.7e-5 / 1.3e-7, BF16 2.0e-4 / 2.0e-4, Q8_0 8.7e-3 / 5.7e-3, Q4_K_M 0.36 / 0.020. (F32 (a) is the
#   reference's bf16-rounded FP8 dequant against the F32 file's exact float32 product.)
# (b) isolates llama.cpp's arithmetic: ggml converts the activations to the weight type's vec_dot type before
# each matmul (BF16 -> bf16, Q8_0 -> Q8_0, K-quants -> Q8_K), which the float32 reference does not. (a) - (b)
# is the quantization error itself, which this random-weight fixture amplifies (0.5% Q8_0 weight error ->
# ~5% hidden-state error by layer 2); gates carry ~3x margin.
KLD_BOUNDS = {"F32": (1e-4, 1e-5), "BF16": (1e-3, 1e-3), "Q8_0": (0.03, 0.02), "Q4_K_M": (1.0, 0.06)}


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0", "Q4_K_M"])
def test_llama_cpp_logits(kq, work, kq_ref_logits, kq_q4km, qtype):
    from dsconvert.model.metrics import compare_logits

    llama_cpp = _llama_cpp()
    path = kq_q4km[0] if qtype == "Q4_K_M" else work / "out" / f"kq-{qtype}.gguf"
    if qtype != "Q4_K_M":
        export(kq, path, type=qtype)
    got = llama_logits(llama_cpp, path)
    ids = torch.tensor(TOKENS)
    a = compare_logits(kq_ref_logits, got, ids)
    b = compare_logits(ref_logits(GGUFWeightSource(path)), got, ids)
    bound_a, bound_b = KLD_BOUNDS[qtype]
    assert a["mean_kld"] <= bound_a and b["mean_kld"] <= bound_b, (qtype, a["mean_kld"], b["mean_kld"])
    if qtype in ("F32", "BF16"):  # F32 against (a): random weights turn its 3.7e-5 into 96 % top-1
        assert (b if qtype == "F32" else a)["same_top_p"] >= 0.98


@pytest.mark.llamacpp
def test_llama_cpp_loads_splits_identically(tiny, tiny_gguf_bf16, work):
    llama_cpp = _llama_cpp()
    files = sorted((work / "split").glob("tiny-*-of-*.gguf"))
    if not files:
        files = [Path(f) for f in export(tiny, work / "split" / "tiny.gguf", type="BF16",
                                         split_max_size=1_500_000)["output"]["files"]]
    assert torch.equal(llama_logits(llama_cpp, files[0]), llama_logits(llama_cpp, tiny_gguf_bf16[0]))


def _llama_quantize(llama_cpp, src: Path, dst: Path, ftype: str) -> None:
    import ctypes

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = g2.file_type_id(ftype)
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def block_identity(ours: Path, theirs: Path) -> dict[str, tuple[int, int]]:
    a, b = tensors(ours), tensors(theirs)
    assert list(a) and set(a) == set(b)
    out: dict[str, list[int]] = {}
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type, n
        qt = gguf.GGMLQuantizationType(a[n].tensor_type)
        ts = gguf.GGML_QUANT_SIZES[qt][1]
        same = (raw(a[n]).reshape(-1, ts) == raw(b[n]).reshape(-1, ts)).all(1)
        d = out.setdefault(qt.name, [0, 0])
        d[0] += int(same.sum())
        d[1] += same.size
    return {k: tuple(v) for k, v in out.items()}


def _check_blocks(llama_cpp, kq, work, ftype, ours: Path | None = None):
    f32 = work / "out" / "kq-F32.gguf"
    if not f32.exists():
        export(kq, f32, type="F32")
    theirs = work / "out" / f"kq-llama-{ftype}.gguf"
    _llama_quantize(llama_cpp, f32, theirs, ftype)
    if ours is None:
        ours = work / "out" / f"kq-{ftype}.gguf"
        export(kq, ours, type=ftype)
    shares = block_identity(ours, theirs)
    for t, (same, n) in shares.items():
        goal = 0.999 if t.endswith("_K") else 1.0  # measured: 100% for every type
        assert same / n >= goal, (ftype, t, same, n)
    return shares


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q8_0"])
def test_blocks_identical_to_llama_model_quantize(kq, work, kq_q4km, ftype):
    llama_cpp = _llama_cpp()
    shares = _check_blocks(llama_cpp, kq, work, ftype, kq_q4km[0] if ftype == "Q4_K_M" else None)
    assert ("Q4_K" in shares and "Q6_K" in shares) if ftype == "Q4_K_M" else set(shares) == {"Q8_0", "F32"}


def test_threads_do_not_change_the_bytes(kq, work, monkeypatch):
    """Chunks are quantized in a worker thread and written in order while the next is read: with chunks small
    enough that every tensor spans several of them (and some chunks are passed through unquantized: the F32
    norms), the file equals the one written without the overlap (``device`` not CPU takes the plain path; here
    :class:`_Pipeline` is forced off), for any ``threads``, and torch's thread setting is restored afterwards."""
    before = torch.get_num_threads()

    def write(n: int) -> bytes:
        out = work / "out" / f"kq-threads{n}-Q8_0.gguf"
        ge.run(kq, out, ge.GGUFOptions(type="Q8_0", threads=n, chunk_bytes=3 << 16, kernel="torch"), overwrite=True,
               progress=False)
        assert torch.get_num_threads() == before
        return out.read_bytes()

    overlapped = write(1)
    real = ge._Pipeline
    monkeypatch.setattr(ge, "_Pipeline", lambda threads, overlap=True, **kw: real(threads, overlap=False, **kw))
    assert overlapped == write(2)


def _random_imatrix(kq: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Importance weights like llama-imatrix's (positive, heavy tailed, a few zeros) for every tensor
    llama.cpp quantizes with them: ``ne0 * n_mat`` values per tensor."""
    plan = ge.make_plan(ge.open_checkpoint(kq), ge.GGUFOptions(type="Q8_0"), None)
    g = np.random.default_rng(seed)
    out = {}
    for t in plan.gguf_plan:
        if t.force_f32 or t.name == "token_embd.weight":
            continue
        n = t.shape[-1] * (t.shape[0] if len(t.shape) == 3 else 1)
        v = (g.standard_normal(n) ** 2 * np.exp(g.uniform(-3, 3, n))).astype(np.float32)
        v[g.random(n) < 0.02] = 0
        out[t.name] = v
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K", "Q4_0", "IQ4_XS", "Q2_K_S",
                                   pytest.param("IQ2_XXS", marks=pytest.mark.slow),
                                   pytest.param("IQ2_XS", marks=pytest.mark.slow),
                                   pytest.param("IQ1_S", marks=pytest.mark.slow),
                                   pytest.param("IQ3_XXS", marks=pytest.mark.slow),
                                   pytest.param("IQ2_M", marks=pytest.mark.slow)])
@pytest.mark.slow  # > 2 s each: kept out of `make test-fast`, run by `make test-slow`
def test_imatrix_blocks_identical_to_llama_model_quantize(kq, work, ftype, tmp_path):
    """With an importance matrix, every block equals what ``llama_model_quantize`` writes from our F32 file
    given the same weights (its ``params.imatrix``): tensor types, per-expert and per-head slicing, bytes."""
    import ctypes

    llama_cpp = _llama_cpp()
    ent = _random_imatrix(kq)
    dat = tmp_path / "imatrix.dat"
    _legacy_imatrix(dat, ent, ncall=1)
    loaded = ge.load_imatrix(dat)
    ours = work / "out" / f"kq-imatrix-{ftype}.gguf"
    rep = export(kq, ours, type=ftype, imatrix=dat)
    assert rep["plan"]["imatrix"]["used"] and rep["plan"]["imatrix"]["tensors_weighted"] > 0
    f32 = work / "out" / "kq-F32.gguf"
    if not f32.exists():
        export(kq, f32, type="F32")
    names = list(loaded)
    arrs = [np.ascontiguousarray(loaded[n].reshape(-1), np.float32) for n in names]
    data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    keep = [n.encode() for n in names]
    for i, (n, a) in enumerate(zip(keep, arrs)):
        data[i].name, data[i].data, data[i].size = n, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
    data[len(names)].name = None
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = g2.file_type_id(ftype)
    p.nthread = 2
    p.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    theirs = work / "out" / f"kq-llama-imatrix-{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(p)) == 0
    shares = block_identity(ours, theirs)
    for t, (same, n) in shares.items():
        assert same == n, (ftype, t, same, n)
    # and the weights matter: the same type without them differs (Q2_K_S and the IQ1/IQ2 lattice types cannot be
    # made without them, nor IQ3_XXS and the IQ2_S of an IQ2_M file)
    if ftype in ("Q2_K_S", "IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ3_XXS", "IQ2_M"):
        # the file type's base lattice type (llama_ftype_get_default_type) is among the identical blocks
        base = {"Q2_K_S": "Q2_K", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ1_S": "IQ1_S", "IQ3_XXS": "IQ3_XXS",
                "IQ2_M": "IQ2_S"}
        assert base[ftype] in shares
        if ftype == "IQ2_M":  # IQ3_S on some tensors
            assert "IQ3_S" in shares, shares
        return
    plain = work / "out" / f"kq-{ftype}.gguf"
    if not plain.exists():
        export(kq, plain, type=ftype)
    quant = [t for t in shares if t not in ("F32", "F16", "BF16", "Q8_0")]
    assert quant and any(v[0] < v[1] for k, v in block_identity(ours, plain).items() if k in quant)


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q5_K_M", "Q6_K", "Q4_0", "IQ4_XS", "IQ4_NL", "IQ3_M"])
def test_blocks_identical_to_llama_model_quantize_slow(kq, work, ftype):
    shares = _check_blocks(_llama_cpp(), kq, work, ftype)
    if ftype == "IQ3_M":
        assert "IQ3_S" in shares, shares


def test_logits_reads_a_gguf_like_its_source(tiny, work):
    """`dsconvert logits FILE.gguf` runs the reference forward on the GGUF's weights: a BF16 GGUF of the FP8 source
    gives the same logits as the source (it holds the reference's own bf16 dequant)."""
    import numpy as np

    from dsconvert.convert.validate import run_logits

    path = work / "out" / "logits-BF16.gguf"
    export(tiny, path, type="BF16")
    ids = [0, 5, 6, 7, 8, 9]
    a = work / "out" / "src.npy"
    b = work / "out" / "gguf.npy"
    run_logits(tiny, ids, None, "float32", a)
    run_logits(path, ids, None, "float32", b)
    assert np.array_equal(np.load(a), np.load(b))


# ------------------------------------------------------------------------------------------------
# --kernel: llama.cpp's ggml_quantize_chunk in place of the torch kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype,weighted", [("Q4_K_M", False), pytest.param("Q2_K_S", True, marks=pytest.mark.slow),
                                            pytest.param("IQ2_XXS", True, marks=pytest.mark.slow)])
def test_ggml_kernel_writes_the_torch_kernels_bytes(kq, work, tmp_path, ftype, weighted):
    """``--kernel ggml`` (ggml's quantizer, 2 threads, chunks small enough that tensors span several) writes the
    same file as ``--kernel torch`` (our kernels, checked against llama.cpp above): experts sliced per expert,
    kv_b heads, importance weights and all; the report names the kernel."""
    _llama_cpp()
    kw = {"type": ftype, "chunk_bytes": 3 << 16, "threads": 2}
    if weighted:
        dat = tmp_path / "imatrix.dat"
        _legacy_imatrix(dat, _random_imatrix(kq, seed=3), ncall=1)
        kw["imatrix"] = dat
    a, b = work / "out" / f"kq-kern-ggml-{ftype}.gguf", work / "out" / f"kq-kern-torch-{ftype}.gguf"
    ra = export(kq, a, kernel="ggml", **kw)
    rb = export(kq, b, kernel="torch", **kw)
    assert ra["kernel"]["name"] == "ggml" and ra["kernel"]["library"].endswith(("ggml-base.so", ".dylib", ".dll"))
    assert rb["kernel"] == {"name": "torch"}
    assert a.read_bytes() == b.read_bytes()
    assert any(t.tensor_type not in (0, 1, 30) for t in tensors(a).values())  # quantized tensors, not only F32


def test_kernel_choice_and_refusals(tiny, work, monkeypatch, tmp_path):
    """``--kernel ggml`` without a usable library, or on an accelerator, is refused before anything is written
    (exit 2, naming the library it looked for); ``auto`` then falls back to the torch kernels."""
    from dsconvert.quant.ggml import native

    missing = tmp_path / "no-such-libggml-base.so"
    monkeypatch.setenv(native.ENV_LIB, str(missing))
    out = work / "out" / "kern-refused.gguf"
    res = cli("gguf", tiny, "-o", out, "--type", "Q8_0", "--kernel", "ggml")
    assert res.exit_code == 2 and str(missing) in res.text and native.ENV_LIB in res.text, res.text
    assert not out.exists() and not list(out.parent.glob("kern-refused*"))
    res = cli("gguf", tiny, "-o", out, "--type", "Q8_0", "--kernel", "cuda-ish")
    assert res.exit_code == 2 and "--kernel" in res.text
    rep = export(tiny, out, type="Q8_0", kernel="auto")
    assert rep["kernel"] == {"name": "torch"}
    with pytest.raises(ge.UsageError, match="CPU"):
        ge.resolve_kernel("ggml", torch.device("meta"))
    assert ge.resolve_kernel("auto", torch.device("meta")) is None


@pytest.mark.parametrize("kernel", ["torch", "ggml"])
def test_encode_checks_cancellation_between_pieces(kernel, monkeypatch):
    """A chunk is quantized in pieces of rows with a cancellation check between them (a SIGINT is not held up by
    a whole chunk of a slow type); the pieces give the bytes of one call."""
    from dsconvert.convert import cancel

    native = ge.resolve_kernel("auto", torch.device("cpu")) if kernel == "ggml" else None  # None: no library
    if kernel == "ggml" and native is None:
        pytest.skip("no ggml library (llama-cpp-python not installed)")
    t = ggml.get_type("IQ4_NL")
    whole_rows = 3 * t.chunk_elems * ge.PIECE_CHUNKS // 256 + 5  # reference: the type's own chunking
    monkeypatch.setattr(t, "chunk_elems", 2048)  # pieces of 32 rows of 256 at 1 thread
    rows = 3 * t.chunk_elems * ge.PIECE_CHUNKS // 256 + 5  # 4 pieces
    assert rows < whole_rows
    x = torch.randn(rows, 256)
    whole = ggml.quantize(x, "IQ4_NL").numpy().reshape(-1)
    np.testing.assert_array_equal(ge.encode(x, "IQ4_NL", torch.device("cpu"), native=native), whole)
    cancel.request()
    try:
        with pytest.raises(cancel.Cancelled):
            ge.encode(x, "IQ4_NL", torch.device("cpu"), native=native)
        small = x[:8]  # one piece: no check, it completes
        np.testing.assert_array_equal(ge.encode(small, "IQ4_NL", torch.device("cpu"), native=native),
                                      whole[:8 * t.row_bytes(256)])
    finally:
        cancel.reset()
