"""deepseek2 GGUF format layer: names, plan, kv_b split, metadata, vocab, type plan.

The llama.cpp checks (``@pytest.mark.llamacpp``) load the tiny file with llama-cpp-python's real
loader and compare our type plan with ``llama_model_quantize``; they skip without llama_cpp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dsconvert.errors import BadInputError, ShapeError, UnsupportedError
from dsconvert.formats import gguf_deepseek2 as g2
from dsconvert.formats.gguf_types import (
    choose_type,
    file_type_id,
    parse_tensor_type_override,
    plan_types,
    use_more_bits,
)

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

N_LAYER = 8  # 8 layers: use_more_bits(i, 8) is true for 0, 3, 6, 7


def tiny_cfg(**kw) -> dict:
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 256,
        "num_hidden_layers": N_LAYER,
        "num_nextn_predict_layers": 1,
        "first_k_dense_replace": 1,
        "intermediate_size": 512,
        "moe_intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "vocab_size": 320,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg.update(kw)
    return cfg


def hf_layout(cfg: dict, *, mtp: bool = True, dtype: str = "BF16") -> dict[str, tuple[tuple[int, ...], str]]:
    """HF names -> (shape, dtype) of a DeepSeek-V3-shaped checkpoint (+ one MTP layer)."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    nh, nope, rope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ql, kl = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    E, mi, ff = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["intermediate_size"]
    sh = cfg["n_shared_experts"] * mi
    t: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((V, H), dtype),
        "model.norm.weight": ((H,), dtype),
        "lm_head.weight": ((V, H), dtype),
    }
    n = cfg["num_hidden_layers"] + (1 if mtp else 0)
    for b in range(n):
        p = f"model.layers.{b}."
        t[p + "input_layernorm.weight"] = ((H,), dtype)
        if ql is None:
            t[p + "self_attn.q_proj.weight"] = ((nh * (nope + rope), H), dtype)
        else:
            t[p + "self_attn.q_a_proj.weight"] = ((ql, H), dtype)
            t[p + "self_attn.q_a_layernorm.weight"] = ((ql,), dtype)
            t[p + "self_attn.q_b_proj.weight"] = ((nh * (nope + rope), ql), dtype)
        t[p + "self_attn.kv_a_proj_with_mqa.weight"] = ((kl + rope, H), dtype)
        t[p + "self_attn.kv_a_layernorm.weight"] = ((kl,), dtype)
        t[p + "self_attn.kv_b_proj.weight"] = ((nh * (nope + v), kl), dtype)
        t[p + "self_attn.o_proj.weight"] = ((H, nh * v), dtype)
        t[p + "post_attention_layernorm.weight"] = ((H,), dtype)
        if b < cfg["first_k_dense_replace"]:
            t[p + "mlp.gate_proj.weight"] = ((ff, H), dtype)
            t[p + "mlp.up_proj.weight"] = ((ff, H), dtype)
            t[p + "mlp.down_proj.weight"] = ((H, ff), dtype)
        else:
            t[p + "mlp.gate.weight"] = ((E, H), dtype)
            if cfg.get("scoring_func") == "sigmoid":
                t[p + "mlp.gate.e_score_correction_bias"] = ((E,), "F32")
            for e in range(E):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = ((mi, H), dtype)
                t[p + f"mlp.experts.{e}.up_proj.weight"] = ((mi, H), dtype)
                t[p + f"mlp.experts.{e}.down_proj.weight"] = ((H, mi), dtype)
            t[p + "mlp.shared_experts.gate_proj.weight"] = ((sh, H), dtype)
            t[p + "mlp.shared_experts.up_proj.weight"] = ((sh, H), dtype)
            t[p + "mlp.shared_experts.down_proj.weight"] = ((H, sh), dtype)
        if b >= cfg["num_hidden_layers"]:  # MTP extras
            t[p + "enorm.weight"] = ((H,), dtype)
            t[p + "hnorm.weight"] = ((H,), dtype)
            t[p + "eh_proj.weight"] = ((H, 2 * H), dtype)
            t[p + "shared_head.norm.weight"] = ((H,), dtype)
            t[p + "shared_head.head.weight"] = ((V, H), dtype)
            t[p + "embed_tokens.weight"] = ((V, H), dtype)
    return t


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def test_names_reference_table():
    cfg = tiny_cfg()
    expect = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "model.layers.3.input_layernorm.weight": "blk.3.attn_norm.weight",
        "model.layers.3.self_attn.q_a_proj.weight": "blk.3.attn_q_a.weight",
        "model.layers.3.self_attn.q_a_layernorm.weight": "blk.3.attn_q_a_norm.weight",
        "model.layers.3.self_attn.q_b_proj.weight": "blk.3.attn_q_b.weight",
        "model.layers.3.self_attn.q_proj.weight": "blk.3.attn_q.weight",
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": "blk.3.attn_kv_a_mqa.weight",
        "model.layers.3.self_attn.kv_a_layernorm.weight": "blk.3.attn_kv_a_norm.weight",
        "model.layers.3.self_attn.kv_b_proj.weight": "blk.3.attn_kv_b.weight",
        "model.layers.3.self_attn.o_proj.weight": "blk.3.attn_output.weight",
        "model.layers.3.post_attention_layernorm.weight": "blk.3.ffn_norm.weight",
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
        "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
        "model.layers.3.mlp.gate.weight": "blk.3.ffn_gate_inp.weight",
        "model.layers.3.mlp.gate.e_score_correction_bias": "blk.3.exp_probs_b.bias",
        "model.layers.3.mlp.experts.2.gate_proj.weight": "blk.3.ffn_gate_exps.weight",
        "model.layers.3.mlp.experts.2.up_proj.weight": "blk.3.ffn_up_exps.weight",
        "model.layers.3.mlp.experts.2.down_proj.weight": "blk.3.ffn_down_exps.weight",
        "model.layers.3.mlp.shared_experts.gate_proj.weight": "blk.3.ffn_gate_shexp.weight",
        "model.layers.3.mlp.shared_experts.up_proj.weight": "blk.3.ffn_up_shexp.weight",
        "model.layers.3.mlp.shared_experts.down_proj.weight": "blk.3.ffn_down_shexp.weight",
    }
    for hf, gg in expect.items():
        assert g2.gguf_name(hf, cfg) == gg, hf
    assert g2.gguf_outputs("model.layers.3.self_attn.kv_b_proj.weight", cfg) == (
        "blk.3.attn_k_b.weight", "blk.3.attn_v_b.weight")


def test_names_drop_and_errors():
    cfg = tiny_cfg()
    mtp = f"model.layers.{N_LAYER}.eh_proj.weight"
    assert g2.gguf_name(mtp, cfg) is None
    assert "MTP" in g2.drop_reason(mtp, cfg)
    assert g2.gguf_name(f"model.layers.{N_LAYER}.self_attn.q_a_proj.weight", cfg) is None
    assert g2.gguf_name("lm_head.weight", tiny_cfg(tie_word_embeddings=True)) is None
    for bad in ("model.layers.0.mlp.down_proj.weight_scale_inv",
                f"model.layers.{N_LAYER}.mlp.down_proj.weight_scale_inv",  # even inside MTP
                "model.layers.0.self_attn.weird.weight", "model.foo", "model.layers.0.mlp.experts.x.up_proj.weight"):
        with pytest.raises(UnsupportedError, match="Can not map tensor"):
            g2.gguf_name(bad, cfg)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def test_plan_shapes_and_kinds():
    cfg = tiny_cfg()
    plan = g2.plan_tensors(hf_layout(cfg), cfg)
    by = plan.by_name()
    H, V, nh, kl, nope, v, ql, E, mi = 256, 320, 4, 64, 32, 32, 96, 4, 256
    # every name known to llama.cpp's deepseek2 tensor list, ggml shapes as in the reference table
    assert by["token_embd.weight"].ne == (H, V)
    assert by["output.weight"].ne == (H, V)
    assert by["output_norm.weight"].force_f32
    assert by["blk.1.attn_q_a.weight"].ne == (H, ql)
    assert by["blk.1.attn_q_b.weight"].ne == (ql, nh * (nope + 16))
    assert by["blk.1.attn_kv_a_mqa.weight"].ne == (H, kl + 16)
    k_b, v_b = by["blk.1.attn_k_b.weight"], by["blk.1.attn_v_b.weight"]
    assert k_b.ne == (nope, kl, nh) and k_b.kind == "kv_b_k"
    assert v_b.ne == (kl, v, nh) and v_b.kind == "kv_b_v"
    assert k_b.sources == v_b.sources == ("model.layers.1.self_attn.kv_b_proj.weight",)
    assert by["blk.1.attn_output.weight"].ne == (nh * v, H)
    ge = by["blk.1.ffn_gate_exps.weight"]
    assert ge.ne == (H, mi, E) and ge.kind == "stack_experts"
    assert ge.sources == tuple(f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(E))
    assert by["blk.1.ffn_down_exps.weight"].ne == (mi, H, E)
    assert by["blk.1.ffn_gate_inp.weight"].ne == (H, E) and by["blk.1.ffn_gate_inp.weight"].force_f32
    assert by["blk.1.exp_probs_b.bias"].ne == (E,) and by["blk.1.exp_probs_b.bias"].force_f32
    assert by["blk.0.ffn_down.weight"].ne == (512, H)
    assert not any(p.force_f32 for p in plan if p.name.endswith(("_exps.weight", "attn_k_b.weight", "output.weight")))
    # forced F32 set = norms, ffn_gate_inp, exp_probs_b, nothing else
    forced = {p.name.split(".", 2)[-1] if p.bid is not None else p.name for p in plan if p.force_f32}
    assert forced == {"attn_norm.weight", "attn_q_a_norm.weight", "attn_kv_a_norm.weight", "ffn_norm.weight",
                      "ffn_gate_inp.weight", "exp_probs_b.bias", "output_norm.weight"}
    # no kv_b, no MTP layer in the output; counts: 3 global + per layer
    assert not any("attn_kv_b" in p.name or p.name.startswith(f"blk.{N_LAYER}.") for p in plan)
    n_dense = 1
    per_dense, per_moe = 10 + 3, 10 + 2 + 3 + 3
    assert len(plan) == 3 + n_dense * per_dense + (N_LAYER - n_dense) * per_moe
    # file order: token_embd, blk.0 .. blk.7, output_norm, output
    assert plan[0].name == "token_embd.weight" and [p.name for p in plan[-2:]] == ["output_norm.weight", "output.weight"]
    bids = [p.bid for p in plan if p.bid is not None]
    assert bids == sorted(bids)
    # every plan name is one of gguf-py's deepseek2 tensors (TENSOR_NAMES templates)
    known = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]
             for b in range(N_LAYER)}
    assert all(p.name.rsplit(".", 1)[0] in known for p in plan)
    # dropped: every MTP tensor, with bytes
    layout = hf_layout(cfg)
    mtp = [n for n in layout if n.startswith(f"model.layers.{N_LAYER}.")]
    assert sorted(d.hf_name for d in plan.dropped) == sorted(mtp)
    assert plan.dropped_nbytes == sum(math.prod(layout[n][0]) * (4 if layout[n][1] == "F32" else 2) for n in mtp)
    assert all("MTP" in d.reason for d in plan.dropped)


def test_plan_v2_lite_q_proj_and_no_bias():
    cfg = tiny_cfg(q_lora_rank=None, scoring_func="softmax", model_type="deepseek_v2",
                   architectures=["DeepseekV2ForCausalLM"])
    plan = g2.plan_tensors(hf_layout(cfg, mtp=False), cfg).by_name()
    assert plan["blk.1.attn_q.weight"].ne == (256, 4 * 48)
    assert "blk.1.attn_q_a.weight" not in plan and "blk.1.exp_probs_b.bias" not in plan


def test_plan_missing_expert_and_scale_inv():
    cfg = tiny_cfg()
    layout = hf_layout(cfg)
    del layout["model.layers.2.mlp.experts.1.up_proj.weight"]
    del layout["model.layers.2.mlp.experts.3.up_proj.weight"]
    with pytest.raises(BadInputError, match=r"Unprocessed experts: layer 2 .*up_proj.*missing expert ids 1, 3"):
        g2.plan_tensors(layout, cfg)
    layout = hf_layout(cfg)
    layout["model.layers.2.mlp.experts.4.up_proj.weight"] = ((256, 256), "BF16")
    with pytest.raises(BadInputError, match="Unprocessed experts"):
        g2.plan_tensors(layout, cfg)
    layout = hf_layout(cfg)
    layout["model.layers.0.self_attn.q_a_proj.weight_scale_inv"] = ((1, 2), "F32")
    with pytest.raises(UnsupportedError, match="Can not map tensor"):
        g2.plan_tensors(layout, cfg)
    layout = hf_layout(cfg)
    layout["model.layers.0.self_attn.kv_b_proj.weight"] = ((4 * 60, 64), "BF16")
    with pytest.raises(BadInputError, match="config.json"):  # the checkpoint disagrees with itself: exit 3
        g2.plan_tensors(layout, cfg)


# --------------------------------------------------------------------------------------------
# kv_b transforms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_split_fuse_kv_b_bit_exact(dtype):
    n_head, nope, v, kv_lora = 4, 32, 24, 64
    g = torch.Generator().manual_seed(0)
    kv_b = torch.randn(n_head * (nope + v), kv_lora, generator=g).to(dtype)
    k_b, v_b = g2.split_kv_b(kv_b, n_head, nope, v)
    assert k_b.shape == (n_head, kv_lora, nope) and v_b.shape == (n_head, v, kv_lora)
    # llama.cpp's definition, written out: view (h, nope+v, kv), split at nope, transpose k_b
    ref = kv_b.view(torch.uint8 if dtype == torch.float8_e4m3fn else dtype).view(n_head, nope + v, kv_lora)
    assert torch.equal(k_b.view(ref.dtype), ref[:, :nope, :].transpose(1, 2))
    assert torch.equal(v_b.view(ref.dtype), ref[:, nope:, :])
    head1_row5 = kv_b.view(ref.dtype)[1 * (nope + v) + 5]  # row nope-index 5 of head 1
    assert torch.equal(k_b.view(ref.dtype)[1, :, 5], head1_row5)
    fused = g2.fuse_kv_b(k_b, v_b)
    assert fused.dtype == dtype and torch.equal(fused.view(torch.uint8), kv_b.view(torch.uint8))
    with pytest.raises(ShapeError):
        g2.split_kv_b(kv_b, n_head + 1, nope, v)


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


def _fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: (f.contents(), f.types) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_metadata_read_back(tmp_path):
    cfg = tiny_cfg()
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    g2.write_metadata(w, cfg, file_type_id("BF16"), {"general.name": "tiny-v3"})
    w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
    f = _fields(path)
    vt = gguf.GGUFValueType
    expect = {
        "general.architecture": ("deepseek2", vt.STRING),
        "general.name": ("tiny-v3", vt.STRING),
        "general.file_type": (32, vt.UINT32),
        "general.quantization_version": (2, vt.UINT32),
        "deepseek2.block_count": (N_LAYER, vt.UINT32),
        "deepseek2.context_length": (4096, vt.UINT32),
        "deepseek2.embedding_length": (256, vt.UINT32),
        "deepseek2.feed_forward_length": (512, vt.UINT32),
        "deepseek2.attention.head_count": (4, vt.UINT32),
        "deepseek2.attention.head_count_kv": (1, vt.UINT32),
        "deepseek2.attention.key_length": (64 + 16, vt.UINT32),
        "deepseek2.attention.value_length": (64, vt.UINT32),
        "deepseek2.attention.key_length_mla": (32 + 16, vt.UINT32),
        "deepseek2.attention.value_length_mla": (32, vt.UINT32),
        "deepseek2.attention.q_lora_rank": (96, vt.UINT32),
        "deepseek2.attention.kv_lora_rank": (64, vt.UINT32),
        "deepseek2.rope.dimension_count": (16, vt.UINT32),
        "deepseek2.rope.scaling.type": ("yarn", vt.STRING),
        "deepseek2.rope.scaling.original_context_length": (128, vt.UINT32),
        "deepseek2.leading_dense_block_count": (1, vt.UINT32),
        "deepseek2.vocab_size": (320, vt.UINT32),
        "deepseek2.expert_count": (4, vt.UINT32),
        "deepseek2.expert_used_count": (2, vt.UINT32),
        "deepseek2.expert_shared_count": (1, vt.UINT32),
        "deepseek2.expert_feed_forward_length": (256, vt.UINT32),
        "deepseek2.expert_group_count": (2, vt.UINT32),
        "deepseek2.expert_group_used_count": (1, vt.UINT32),
        "deepseek2.expert_gating_func": (2, vt.UINT32),
        "deepseek2.expert_weights_norm": (True, vt.BOOL),
    }
    for k, (val, typ) in expect.items():
        assert k in f, k
        assert f[k][0] == val and f[k][1] == [typ], (k, f[k])
    floats = {
        "deepseek2.attention.layer_norm_rms_epsilon": 1e-6,
        "deepseek2.rope.freq_base": 10000.0,
        "deepseek2.rope.scaling.factor": 40.0,
        "deepseek2.rope.scaling.yarn_beta_fast": 32.0,
        "deepseek2.rope.scaling.yarn_beta_slow": 1.0,
        "deepseek2.rope.scaling.yarn_log_multiplier": 0.1,
        "deepseek2.expert_weights_scale": 2.5,
    }
    for k, val in floats.items():
        assert f[k][1] == [vt.FLOAT32], k
        assert f[k][0] == pytest.approx(val, rel=1e-6), k
    assert not any("nextn" in k for k in f)
    # metadata_dict says exactly what was written
    md = g2.metadata_dict(cfg, 32, {"general.name": "tiny-v3"})
    assert set(md) == set(f)
    for k, val in md.items():
        assert f[k][0] == pytest.approx(val, rel=1e-6) if isinstance(val, float) else f[k][0] == val, k


def test_metadata_variants():
    md = g2.metadata_dict(tiny_cfg(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=None,
                                   rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                 "mscale_all_dim": 0.707}), 0)
    assert md["deepseek2.expert_gating_func"] == 1
    assert "deepseek2.expert_weights_norm" not in md and "deepseek2.expert_weights_scale" not in md
    assert md["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    md = g2.metadata_dict(tiny_cfg(q_lora_rank=None, rope_scaling=None), 0)
    assert "deepseek2.attention.q_lora_rank" not in md and "deepseek2.rope.scaling.type" not in md
    # transformers-5 style rope_parameters
    md = g2.metadata_dict(tiny_cfg(rope_scaling=None, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5e4,
        "mscale_all_dim": 1.0}), 0)
    assert md["deepseek2.rope.scaling.factor"] == 4.0 and md["deepseek2.rope.freq_base"] == 5e4
    with pytest.raises(UnsupportedError):
        g2.metadata_dict(tiny_cfg(model_type="deepseek_v32"), 0)
    with pytest.raises(UnsupportedError):
        g2.metadata_dict(tiny_cfg(scoring_func="tanh"), 0)
    w = gguf.GGUFWriter(None, "llama")
    with pytest.raises(UnsupportedError):
        g2.write_metadata(w, tiny_cfg(), 0)


# --------------------------------------------------------------------------------------------
# vocab
# --------------------------------------------------------------------------------------------

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}")
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "DeepSeek-V3 uses multi-head latent attention and 256 routed experts.",
    "Hello world! 12345 67890, numbers and words; llama.cpp loads deepseek2 files.",
    "我想在apple工作 ----- ====== !!!!! ?????",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer.json (ids 0/1 = BOS/EOS) + tokenizer_config.json + config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    # non-special added tokens: one that looks special (-> CONTROL), one that doesn't (-> USER_DEFINED)
    tok.add_tokens([AddedToken("<｜User｜>", special=False, normalized=False),
                    AddedToken("<｜Assistant｜>", special=False, normalized=False),
                    AddedToken("<think>", special=False, normalized=False)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"content": BOS, "__type": "AddedToken"}, "eos_token": EOS, "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "LlamaTokenizerFast",
    }))
    (d / "config.json").write_text(json.dumps(tiny_cfg()))
    return d


def test_vocab_read_back(tok_dir, tmp_path):
    from tokenizers import Tokenizer

    cfg = tiny_cfg()
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    n_real = tok.get_vocab_size(with_added_tokens=True)
    assert n_real < cfg["vocab_size"]
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    v = g2.write_vocab(w, tok_dir / "tokenizer.json", cfg)  # a tokenizer.json path works too
    w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
    r = gguf.GGUFReader(path)
    f = {k: r.fields[k].contents() for k in r.fields if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "deepseek-v3"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg["vocab_size"]
    vocab = tok.get_vocab(with_added_tokens=True)
    for t, i in vocab.items():
        assert tokens[i] == t
    assert tokens[n_real:] == [f"[PAD{i}]" for i in range(n_real, cfg["vocab_size"])]
    assert types[n_real:] == [5] * (cfg["vocab_size"] - n_real)
    assert types[:3] == [3, 3, 3]  # BOS, EOS, PAD: special added tokens -> CONTROL
    assert types[vocab["<｜User｜>"]] == 3  # not flagged special but looks special -> CONTROL
    assert types[vocab["<think>"]] == 4  # USER_DEFINED
    assert set(types[3:n_real - 3]) == {1}
    merges = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert f["tokenizer.ggml.bos_token_id"] == 0
    assert f["tokenizer.ggml.eos_token_id"] == 1
    assert f["tokenizer.ggml.padding_token_id"] == 2
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert v.summary()["token_types"] == {"CONTROL": 5, "USER_DEFINED": 1, "NORMAL": n_real - 6,
                                          "UNUSED": cfg["vocab_size"] - n_real}


def test_vocab_errors(tok_dir, tmp_path):
    with pytest.raises(BadInputError, match=">= config vocab_size"):
        g2.read_vocab(tok_dir, tiny_cfg(vocab_size=100))
    with pytest.raises(BadInputError, match="no tokenizer.json"):
        g2.read_vocab(tmp_path, tiny_cfg())
    assert g2.read_vocab(tok_dir, tiny_cfg(), pre="deepseek-llm").pre == "deepseek-llm"


# --------------------------------------------------------------------------------------------
# a full tiny F32 GGUF, checked by llama.cpp itself
# --------------------------------------------------------------------------------------------


LLAMA_LOG: list[str] = []


def _llama_cpp():
    """llama_cpp with its log routed into LLAMA_LOG (the default callback trips on split UTF-8)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF oracle) is not installed")
    if not hasattr(_llama_cpp, "cb"):
        @llama_cpp.llama_log_callback
        def _collect(level, text, user_data):
            LLAMA_LOG.append(text.decode("utf-8", "replace"))
            del LLAMA_LOG[:-200]

        _llama_cpp.cb = _collect  # keep the ctypes callback alive
        llama_cpp.llama_log_set(_collect, None)
    return llama_cpp


def random_checkpoint(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, _) in hf_layout(cfg).items():
        if name.endswith(("norm.weight", "layernorm.weight")):
            out[name] = torch.ones(shape)
        elif name.endswith("e_score_correction_bias"):
            out[name] = torch.linspace(0.5, 1.0, shape[0])  # positive, decisive routing
        else:
            out[name] = torch.randn(shape, generator=g) * 0.02
    return out


def write_tiny_gguf(path: Path, cfg: dict, tok_dir: Path) -> g2.GGUFPlan:
    weights = random_checkpoint(cfg)
    plan = g2.plan_tensors({n: (tuple(t.shape), "F32") for n, t in weights.items()}, cfg)
    w = gguf.GGUFWriter(str(path), "deepseek2")
    g2.write_metadata(w, cfg, file_type_id("F32"), {"general.name": "dsconvert tiny V3"})
    g2.write_vocab(w, tok_dir, cfg)
    for p in plan:
        t = g2.build_tensor(p, [weights[s] for s in p.sources], cfg)
        w.add_tensor(p.name, t.to(torch.float32).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return plan


@pytest.fixture(scope="module")
def tiny_gguf(tok_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    plan = write_tiny_gguf(path, tiny_cfg(), tok_dir)
    return path, plan


def test_tiny_gguf_read_back(tiny_gguf):
    path, plan = tiny_gguf
    r = gguf.GGUFReader(path)
    got = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in r.tensors}
    assert set(got) == {p.name for p in plan}
    for p in plan:
        assert got[p.name] == (p.ne, gguf.GGMLQuantizationType.F32), p.name


@pytest.mark.llamacpp
def test_tiny_gguf_loads_in_llama_cpp(tiny_gguf):
    llama_cpp = _llama_cpp()
    path, _ = tiny_gguf
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.n_vocab() == tiny_cfg()["vocab_size"]
        ids = llm.tokenize(b"The quick brown fox", add_bos=True, special=False)
        assert ids[0] == 0  # add_bos_token honoured, BOS id 0
        assert llm.detokenize(ids[1:]) == b"The quick brown fox"
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        assert logits.shape == (len(ids), tiny_cfg()["vocab_size"]) and np.isfinite(logits).all()
        assert llm.metadata["deepseek2.attention.key_length_mla"] == "48"
    finally:
        llm.close()


# --------------------------------------------------------------------------------------------
# type plan vs llama_model_quantize
# --------------------------------------------------------------------------------------------


def test_use_more_bits_v3():
    layers = [i for i in range(61) if use_more_bits(i, 61)]
    assert len(layers) == 30
    assert layers[:7] == list(range(7)) and layers[-8:] == list(range(53, 61))
    assert [i for i in layers if 7 <= i < 53] == list(range(9, 52, 3))
    assert [i for i in range(N_LAYER) if use_more_bits(i, N_LAYER)] == [0, 3, 6, 7]


def test_file_type_ids():
    assert {n: file_type_id(n) for n in ("F32", "BF16", "Q8_0", "Q4_K_M", "Q6_K", "Q2_K", "IQ1_S")} == {
        "F32": 0, "BF16": 32, "Q8_0": 7, "Q4_K_M": 15, "Q6_K": 18, "Q2_K": 10, "IQ1_S": 24}
    assert file_type_id("q4_k_m") == 15
    with pytest.raises(Exception, match="unknown GGUF file type"):
        file_type_id("Q4_K_X")


def test_choose_type_v3_shapes():
    """Real V3 shapes (reference §6): output Q6_K, attn_k_b Q5_0, ffn_down_exps Q6_K on 30 layers."""
    kw = dict(n_layer=61, n_expert=256, n_gqa=128)
    assert choose_type("output.weight", (129280, 7168), "Q4_K_M", **kw) == "Q6_K"
    assert choose_type("token_embd.weight", (129280, 7168), "Q4_K_M", **kw) == "Q4_K"
    assert choose_type("blk.5.attn_k_b.weight", (128, 512, 128), "Q4_K_M", **kw) == "Q5_0"
    assert choose_type("blk.5.attn_k_b.weight", (128, 512, 128), "Q2_K", **kw) == "Q4_0"
    assert choose_type("blk.5.attn_v_b.weight", (128, 128, 512), "Q4_K_M", **kw) == "Q4_K"
    assert choose_type("blk.6.ffn_down_exps.weight", (256, 7168, 2048), "Q4_K_M", **kw) == "Q6_K"
    assert choose_type("blk.7.ffn_down_exps.weight", (256, 7168, 2048), "Q4_K_M", **kw) == "Q4_K"
    assert choose_type("blk.7.ffn_down_exps.weight", (256, 7168, 2048), "Q2_K", **kw) == "Q3_K"
    assert choose_type("blk.7.ffn_gate_exps.weight", (256, 2048, 7168), "Q2_K", **kw) == "Q2_K"
    assert choose_type("blk.7.attn_output.weight", (7168, 16384), "Q2_K", **kw) == "Q3_K"
    assert choose_type("blk.7.ffn_gate_inp.weight", (256, 7168), "Q4_K_M", **kw) == "F32"
    assert choose_type("blk.7.attn_kv_a_norm.weight", (512,), "Q4_K_M", **kw) == "F32"
    assert choose_type("blk.7.exp_probs_b.bias", (256,), "Q4_K_M", **kw) == "F32"
    assert choose_type("blk.7.attn_q_b.weight", (24576, 1536), "BF16", **kw) == "BF16"
    assert choose_type("blk.7.attn_q_b.weight", (24576, 1536), "Q8_0", **kw) == "Q8_0"
    assert choose_type("blk.7.attn_q_b.weight", (24576, 1536), "Q4_K_M", overrides=[("attn_q_b", "Q8_0")], **kw) == "Q8_0"
    assert choose_type("blk.6.ffn_down_exps.weight", (256, 7168, 2048), "Q4_K_M", pure=True, **kw) == "Q4_K"
    assert choose_type("output.weight", (129280, 7168), "Q4_K_M", output_type="q8_0", **kw) == "Q8_0"
    assert choose_type("token_embd.weight", (129280, 7168), "Q4_K_M", embd_type="Q6_K", **kw) == "Q6_K"
    with pytest.raises(ShapeError, match="no tensor type fallback"):
        choose_type("blk.0.ffn_down.weight", (7168, 200), "Q8_0", **kw)
    assert choose_type("blk.0.ffn_down.weight", (7168, 200), "Q8_0", fallback_f16=True, **kw) == "F16"
    assert parse_tensor_type_override("ATTN_K_B=q8_0") == ("attn_k_b", "Q8_0")
    # full V3 Q4_K_M plan: ffn_down family on 30 of 61 layers
    cfg = tiny_cfg(num_hidden_layers=61, first_k_dense_replace=3, hidden_size=7168, vocab_size=129280,
                   n_routed_experts=256, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, intermediate_size=18432,
                   moe_intermediate_size=2048)
    plan = g2.plan_tensors(hf_layout(cfg, mtp=True), cfg)
    assert len(plan) == 1086
    types = plan_types(plan, "Q4_K_M", cfg)
    q6 = sorted(n for n, t in types.items() if t == "Q6_K")
    assert "output.weight" in q6 and len([n for n in q6 if "ffn_down" in n]) == 3 + 58 * 2 - 2 * (61 - 30)
    assert {t for n, t in types.items() if "attn_k_b" in n} == {"Q5_0"}


LLAMA_FTYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q2_K", "Q3_K_M", "IQ4_XS", "IQ4_NL"]


def _quantize(llama_cpp, src: Path, dst: Path, ftype: str, *, overrides=(), output_type=None, embd_type=None,
              pure=False, imatrix: dict[str, np.ndarray] | None = None, allow_requantize=False) -> dict[str, str]:
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type_id(ftype)
    params.nthread = 2
    params.pure = pure
    params.allow_requantize = allow_requantize
    if output_type:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[output_type])
    if embd_type:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[embd_type])
    keep = None
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pat, typ) in enumerate(overrides):
            arr[i].pattern = pat.encode()
            arr[i].type = int(gguf.GGMLQuantizationType[typ])
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep = arr  # noqa: F841  (keep the array alive during the call)
    if imatrix:
        names = [n.encode() for n in imatrix]
        arrs = [np.ascontiguousarray(v, np.float32) for v in imatrix.values()]
        im = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for i, (n, a) in enumerate(zip(names, arrs)):
            im[i].name, im[i].data, im[i].size = n, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
        im[len(names)].name = None
        params.imatrix = ctypes.cast(im, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_im = (im, names, arrs)  # noqa: F841
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype}) failed:\n" + "".join(LLAMA_LOG[-20:])
    r = gguf.GGUFReader(dst)
    assert r.fields["general.file_type"].contents() == file_type_id(ftype)
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in r.tensors}


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", LLAMA_FTYPES)
def test_type_plan_matches_llama_quantize(tiny_gguf, tmp_path, ftype):
    llama_cpp = _llama_cpp()
    src, plan = tiny_gguf
    got = _quantize(llama_cpp, src, tmp_path / f"{ftype}.gguf", ftype)
    ours = plan_types(plan, ftype, tiny_cfg())
    diff = {n: (ours[n], got[n]) for n in got if ours[n] != got[n]}
    assert not diff, f"{ftype}: (ours, llama.cpp) differ for {len(diff)} tensors: {diff}"
    # docs/known-failures.md item 24: norms / ffn_gate_inp / exp_probs_b stay F32; attn_k_b falls back
    assert {t for n, t in got.items() if "norm" in n or "gate_inp" in n or "exp_probs_b" in n} == {"F32"}
    if ftype == "Q4_K_M":
        assert got["blk.1.attn_k_b.weight"] == "Q5_0" and got["output.weight"] == "Q6_K"
        down = {i: got[f"blk.{i}.ffn_down.weight" if i == 0 else f"blk.{i}.ffn_down_exps.weight"] for i in range(N_LAYER)}
        assert {i for i, t in down.items() if t == "Q6_K"} == {0, 3, 6, 7}


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_0", "Q4_K_M", "Q2_K_S", "IQ4_XS"])
def test_type_plan_with_imatrix_matches_llama_quantize(tiny_gguf, tmp_path, ftype):
    """An importance matrix changes llama.cpp's choices (Q4_0/Q5_0: the first n_layer/8 ffn_down become
    Q4_1/Q5_1); ``plan_types(has_imatrix=True)`` follows them."""
    llama_cpp = _llama_cpp()
    src, plan = tiny_gguf
    im = {p.name: np.ones(p.ne[0] * (p.ne[2] if len(p.ne) > 2 else 1), np.float32) for p in plan
          if len(p.ne) >= 2}
    got = _quantize(llama_cpp, src, tmp_path / f"{ftype}-im.gguf", ftype, imatrix=im)
    ours = plan_types(plan, ftype, tiny_cfg(), has_imatrix=True)
    assert ours == got
    if ftype in ("Q4_0", "Q5_0"):
        assert ours != plan_types(plan, ftype, tiny_cfg())


@pytest.mark.llamacpp
def test_type_plan_options_match_llama_quantize(tiny_gguf, tmp_path):
    llama_cpp = _llama_cpp()
    src, plan = tiny_gguf
    cfg = tiny_cfg()
    ovr = [("attn_k_b", "Q8_0"), (r"blk\.[0-3]\.ffn_down", "Q5_K"), ("ffn_up_exps", "Q4_K"), ("attn_output", "Q6_K")]
    got = _quantize(llama_cpp, src, tmp_path / "ovr.gguf", "Q4_K_M", overrides=ovr, output_type="Q8_0",
                    embd_type="Q6_K")
    ours = plan_types(plan, "Q4_K_M", cfg, overrides=ovr, output_type="Q8_0", embd_type="Q6_K")
    assert ours == got
    assert got["blk.1.attn_k_b.weight"] == "Q8_0" and got["blk.1.attn_output.weight"] == "Q8_0"  # Q6_K -> fallback
    got = _quantize(llama_cpp, src, tmp_path / "pure.gguf", "Q4_K_M", pure=True)
    assert plan_types(plan, "Q4_K_M", cfg, pure=True) == got
    assert got["output.weight"] == "Q4_K" and got["blk.3.ffn_down_exps.weight"] == "Q4_K"


def v2_lite_cfg() -> dict:
    """V2-Lite-shaped: plain q_proj (attn_q), softmax routing, no exp_probs_b, 8 experts (llama.cpp's
    8-expert quant rules). 27 layers: llama.cpp only accepts a missing q_lora_rank for n_layer 27."""
    return tiny_cfg(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], num_hidden_layers=27,
                    moe_intermediate_size=32,
                    q_lora_rank=None, n_routed_experts=8, scoring_func="softmax", topk_method="greedy",
                    n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                    num_nextn_predict_layers=0,
                    rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})


@pytest.fixture(scope="module")
def tiny_v2_gguf(tok_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-v2-f32.gguf"
    plan = write_tiny_gguf(path, v2_lite_cfg(), tok_dir)
    return path, plan


@pytest.mark.llamacpp
def test_tiny_v2_lite_gguf_loads_in_llama_cpp(tiny_v2_gguf):
    llama_cpp = _llama_cpp()
    path, plan = tiny_v2_gguf
    assert "blk.0.attn_q.weight" in plan.by_name()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == "deepseek-llm"
        ids = llm.tokenize(b"Hello world", add_bos=True, special=False)
        llm.eval(ids)
        assert np.isfinite(np.array(llm.scores[: len(ids)])).all()
    finally:
        llm.close()


@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q2_K", "Q3_K_M", "Q5_K_M"])
def test_type_plan_8_experts_matches_llama_quantize(tiny_v2_gguf, tmp_path, ftype):
    llama_cpp = _llama_cpp()
    src, plan = tiny_v2_gguf
    got = _quantize(llama_cpp, src, tmp_path / f"{ftype}.gguf", ftype)
    ours = plan_types(plan, ftype, v2_lite_cfg())
    diff = {n: (ours[n], got[n]) for n in got if ours[n] != got[n]}
    assert not diff, f"{ftype}: (ours, llama.cpp) differ for {len(diff)} tensors: {diff}"
    if ftype == "Q4_K_M":  # 8-expert rule: attn_output Q5_K, then ne0=128 -> Q5_1
        assert got["blk.3.attn_output.weight"] == "Q5_1" and got["blk.3.attn_q.weight"] == "Q4_K"


def test_plan_nbytes_v3_q8_0():
    """Planned Q8_0 size of full V3 (no MTP) ~ 713 GB (reference §6: 664.29 GiB)."""
    cfg = tiny_cfg(num_hidden_layers=61, first_k_dense_replace=3, hidden_size=7168, vocab_size=129280,
                   n_routed_experts=256, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, intermediate_size=18432,
                   moe_intermediate_size=2048)
    plan = g2.plan_tensors(hf_layout(cfg, mtp=True), cfg)
    gib = plan.nbytes(plan_types(plan, "Q8_0", cfg)) / 2**30
    assert 663.5 < gib < 664.5, gib
    assert plan.n_elements == pytest.approx(671.0e9, rel=0.01)


def test_vocab_never_imports_transformers(tok_dir):
    """docs/known-failures.md item 22: the vocab path must not go through transformers/AutoTokenizer."""
    import subprocess
    import sys

    code = ("import sys, json; from dsconvert.formats.gguf_vocab import read_vocab; "
            f"read_vocab({str(tok_dir)!r}, json.load(open({str(tok_dir / 'config.json')!r}))); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
