"""The pure-torch reference forward against transformers' DeepseekV3 / DeepseekV2 on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from dsconvert.errors import UnsupportedError
from dsconvert.model import DictWeightSource, ModelConfig, ReferenceModel, route, softmax_scale
from dsconvert.model.metrics import compare_logits, layer_errors
from dsconvert.model.rope import rope_attention_factor, rope_inv_freq

transformers = pytest.importorskip("transformers")

T_SEQ = 16
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def _tiny_kwargs(**over) -> dict:
    kw = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=4096 * 40,  # = factor * original, so any recomputed factor is 40 too
        rope_parameters=dict(YARN),
        attn_implementation="eager",
    )
    kw.update(over)
    return kw


def _randomize(model: torch.nn.Module, seed: int, bias_shift: float = 0.0) -> None:
    """Weights at a scale where activations stay O(1), routing is decisive and the bias is nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                std = (4.0 if name.endswith("gate.weight") else 3.0 if "lm_head" in name else 1.0) / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g) + bias_shift)


def _checkpoint_names(state_dict: dict) -> dict:
    """transformers 5 fuses experts into 3-D tensors; split them back into the on-disk names."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H): gate rows then up rows
            pre = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{pre}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):  # (E, H, I)
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def _build_v3(seed: int = 0, bias_shift: float = 0.0, **over):
    cfg = transformers.DeepseekV3Config(**_tiny_kwargs(**over))
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    _randomize(model, seed, bias_shift)
    src = DictWeightSource(cfg.to_dict(), _checkpoint_names(model.state_dict()))
    return model, src


def _hf_logits(model, ids: torch.Tensor):
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True)
    return out.logits[0].float(), [h[0] for h in out.hidden_states]


def _ids(seed: int = 1, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (T_SEQ,), generator=torch.Generator().manual_seed(seed))


class CountingSource:
    """Wraps a source and records every ``get``."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.gets: list[str] = []

    def has(self, name):
        return self.inner.has(name)

    def get(self, name):
        self.gets.append(name)
        return self.inner.get(name)


@pytest.fixture(scope="module")
def v3():
    model, src = _build_v3(seed=0)
    ids = _ids()
    ref, hf_hidden = _hf_logits(model, ids)
    return model, src, ids, ref, hf_hidden


# -- config ----------------------------------------------------------------------------------------


def test_softmax_scale_v3_value():
    cfg = ModelConfig.from_hf(
        dict(
            model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, vocab_size=129280,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
            kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
            max_position_embeddings=163840,
            rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        )
    )
    expected = 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    assert softmax_scale(cfg) == pytest.approx(expected, rel=1e-12)
    assert softmax_scale(cfg) == pytest.approx(0.13523, abs=5e-6)
    assert rope_attention_factor(cfg) == 1.0
    assert (cfg.topk_method, cfg.scoring_func) == ("noaux_tc", "sigmoid")


def test_tiny_config_sets_both_mscales_and_matches_hf(v3):
    """Synthetic configs must set mscale and mscale_all_dim (else cos/sin get 0.1 ln f + 1)."""
    model, src, *_ = v3
    rp = model.config.rope_parameters
    assert rp["mscale"] and rp["mscale_all_dim"]
    cfg = ModelConfig.from_hf(src.config)
    assert cfg.rope_scaling.factor == 40.0
    attn = model.model.layers[0].self_attn
    assert softmax_scale(cfg) == pytest.approx(attn.scaling, rel=1e-12)
    rot = model.model.rotary_emb
    assert rope_attention_factor(cfg) == pytest.approx(rot.attention_scaling)
    torch.testing.assert_close(rope_inv_freq(cfg), rot.inv_freq, rtol=1e-6, atol=0)
    # without mscale the cos/sin factor is 0.1 ln 40 + 1, as in transformers
    no_ms = dict(src.config, rope_parameters={k: v for k, v in YARN.items() if k != "mscale"})
    assert rope_attention_factor(ModelConfig.from_hf(no_ms)) == pytest.approx(0.1 * math.log(40) + 1)


def test_unsupported_model_type():
    with pytest.raises(UnsupportedError):
        ModelConfig.from_hf({"model_type": "llama"})


# -- V3 against transformers -----------------------------------------------------------------------


def test_v3_matches_transformers(v3):
    model, src, ids, ref, hf_hidden = v3
    out = ReferenceModel(src).forward(ids, return_hidden=True)
    assert out.logits.shape == (T_SEQ, 100) and out.logits.dtype == torch.float32
    m = compare_logits(ref, out.logits, ids)
    assert m["mean_kld"] <= 1e-6, m
    assert torch.equal(ref.argmax(-1), out.logits.argmax(-1))
    torch.testing.assert_close(out.logits, ref, rtol=1e-4, atol=1e-4)
    # hf hidden_states[i+1] is the output of layer i (the last one is after the final norm)
    errs = layer_errors(hf_hidden[1:-1], out.hidden_states[:-1])
    assert len(out.hidden_states) == 3
    assert max(e["rel_error"] for e in errs) < 1e-5, errs
    # the distributions are not trivially flat: the test would catch real errors
    assert ref.softmax(-1).max(-1).values.mean() > 0.2


def test_v3_routing_is_decisive_and_biased(v3):
    """Self-check of the fixture: bias nonzero, and changing it changes routing."""
    model, src, ids, *_ = v3
    cfg = ModelConfig.from_hf(src.config)
    bias = src.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.abs().min() > 0
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    logits = x @ src.get("model.layers.1.mlp.gate.weight").T
    _, i_b = route(cfg, logits, bias)
    _, i_nb = route(cfg, logits, None)
    assert not torch.equal(i_b.sort(-1).values, i_nb.sort(-1).values)


def test_v3_bf16_close(v3):
    _, src, ids, ref, _ = v3
    out = ReferenceModel(src, dtype=torch.bfloat16).forward(ids)
    m = compare_logits(ref, out.logits, ids)
    assert m["mean_kld"] < 2e-2, m


# -- -inf group masking ------------------------------------------------------------------------------


def _slow_route(cfg: ModelConfig, logits: torch.Tensor, bias: torch.Tensor | None):
    """Per-token, pure-Python routing from the definition (sets of expert ids and weights)."""
    out = []
    E, G = cfg.n_routed_experts, cfg.n_group
    per = E // G
    for row in logits.tolist():
        if cfg.scoring_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            mx = max(row)
            ex = [math.exp(v - mx) for v in row]
            s = [v / sum(ex) for v in ex]
        c = [s[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        if cfg.topk_method == "greedy":
            allowed = list(range(E))
        else:
            gs = []
            for g in range(G):
                vals = sorted(c[g * per:(g + 1) * per], reverse=True)
                gs.append(sum(vals[:2]) if cfg.topk_method == "noaux_tc" else vals[0])
            groups = sorted(range(G), key=lambda g: -gs[g])[: cfg.topk_group]
            allowed = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = sorted(allowed, key=lambda e: -c[e])[: cfg.num_experts_per_tok]
        w = [s[e] for e in chosen]
        if cfg.model_type == "deepseek_v2":
            if cfg.norm_topk_prob and len(w) > 1:
                w = [v / (sum(w) + 1e-20) for v in w]
            else:
                w = [v * cfg.routed_scaling_factor for v in w]
        else:
            if cfg.norm_topk_prob:
                w = [v / (sum(w) + 1e-20) for v in w]
            w = [v * cfg.routed_scaling_factor for v in w]
        out.append(dict(zip(chosen, w)))
    return out


def _as_dicts(weights, indices):
    return [dict(zip(i.tolist(), w.tolist())) for w, i in zip(weights, indices)]


def _assert_same_routing(a, b):
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for e in ra:
            assert ra[e] == pytest.approx(rb[e], rel=1e-5)


def test_negative_biased_scores_use_inf_masking():
    """With every biased score < 0, masking non-selected groups with 0.0 would pick them; -inf must not."""
    model, src = _build_v3(seed=5, bias_shift=-3.0)
    cfg = ModelConfig.from_hf(src.config)
    bias = src.get("model.layers.1.mlp.gate.e_score_correction_bias")
    assert (bias < -1.0).all()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    logits = x @ src.get("model.layers.1.mlp.gate.weight").T
    w, idx = route(cfg, logits, bias)
    ours = _as_dicts(w, idx)
    _assert_same_routing(ours, _slow_route(cfg, logits, bias))
    # all chosen experts lie in the topk_group best groups
    per = cfg.n_routed_experts // cfg.n_group
    for r in ours:
        assert len({e // per for e in r}) <= cfg.topk_group
    # transformers 5.24 also masks with -inf
    router = model.model.layers[1].mlp.gate
    with torch.no_grad():
        _, hw, hi = router(x)
    _assert_same_routing(ours, _as_dicts(hw, hi))
    # and the full model still matches
    ids = _ids(seed=6)
    ref, _ = _hf_logits(model, ids)
    m = compare_logits(ref, ReferenceModel(src).forward(ids).logits, ids)
    assert m["mean_kld"] <= 1e-6 and m["same_top_p"] == 1.0, m


# -- streaming and hooks ---------------------------------------------------------------------------


def test_only_routed_experts_with_tokens_are_fetched(v3):
    _, src, ids, *_ = v3
    counting = CountingSource(src)
    m = ReferenceModel(counting)
    cfg = m.cfg
    seen_layers = []
    hidden_pos = torch.arange(3)
    h = m.embed(ids[:3])
    for i in range(cfg.num_hidden_layers):
        before = len(counting.gets)
        h = m.layer_forward(i, h, hidden_pos)
        got = counting.gets[before:]
        assert all(n.startswith(f"model.layers.{i}.") for n in got), got
        experts = {int(n.split(".")[5]) for n in got if ".mlp.experts." in n}
        if cfg.is_moe_layer(i):
            assert len(experts) <= 3 * cfg.num_experts_per_tok < cfg.n_routed_experts
            assert len(got) == len(set(got)), "a tensor was fetched twice in one layer"
            seen_layers.append(i)
        else:
            assert not experts
    assert seen_layers == [1, 2]
    assert not any("layers.3." in n for n in counting.gets)


def test_experts_fetched_match_routing(v3):
    """The set of fetched experts equals the set chosen by the router (nothing more, nothing less)."""
    _, src, ids, *_ = v3
    counting = CountingSource(src)
    m = ReferenceModel(counting)
    pos = torch.arange(T_SEQ)
    h = m.embed(ids)
    h = m.layer_forward(0, h, pos)
    captured = {}
    n0 = len(counting.gets)
    m.layer_forward(1, h, pos, on_linear=lambda name, x: captured.setdefault(name, x))
    fetched = {int(n.split(".")[5]) for n in counting.gets[n0:] if ".mlp.experts." in n}
    x = captured["model.layers.1.mlp.gate"]
    logits = x.float() @ src.get("model.layers.1.mlp.gate.weight").T
    _, idx = route(m.cfg, logits, src.get("model.layers.1.mlp.gate.e_score_correction_bias"))
    assert fetched == set(idx.flatten().tolist())


def test_on_linear_shapes(v3):
    _, src, ids, *_ = v3
    calls: list[tuple[str, tuple]] = []
    out = ReferenceModel(src).forward(ids, on_linear=lambda n, x: calls.append((n, tuple(x.shape))))
    names = dict(calls)
    T = T_SEQ
    assert names["model.layers.0.self_attn.q_a_proj"] == (T, 64)
    assert names["model.layers.0.self_attn.q_b_proj"] == (T, 32)
    assert names["model.layers.0.self_attn.kv_a_proj_with_mqa"] == (T, 64)
    assert names["model.layers.0.self_attn.kv_b_proj"] == (T, 16)
    assert names["model.layers.0.self_attn.o_proj"] == (T, 32)
    assert names["model.layers.0.mlp.down_proj"] == (T, 96)
    assert names["model.layers.1.mlp.gate"] == (T, 64)
    assert names["model.layers.1.mlp.shared_experts.down_proj"] == (T, 32)
    assert names["lm_head"] == (T, 64)
    expert_rows = 0
    for n, shp in calls:
        if n.startswith("model.layers.2.mlp.experts.") and n.endswith("gate_proj"):
            assert shp[1] == 64 and shp[0] >= 1
            expert_rows += shp[0]
        if ".experts." in n and n.endswith("down_proj"):
            assert shp[1] == 32
    assert expert_rows == T * 2  # every token reaches top-k = 2 experts
    assert all(src.has(n + ".weight") for n in names)
    assert out.hidden_states is None


def test_progress_and_layerwise_equals_forward(v3):
    _, src, ids, *_ = v3
    m = ReferenceModel(src)
    seen = []
    full = m.forward(ids, progress=lambda i, n: seen.append((i, n))).logits
    assert seen == [(0, 3), (1, 3), (2, 3)]
    pos = torch.arange(T_SEQ)
    h = m.embed(ids)
    for i in range(3):
        h = m.layer_forward(i, h, pos)
    assert torch.equal(m.head(h), full)
    with pytest.raises(IndexError):
        m.layer_forward(3, h, pos)  # the MTP layer is not part of the forward


def test_v32_refuses_long_sequences(v3):
    _, src, ids, *_ = v3
    cfg = dict(src.config, model_type="deepseek_v32", index_topk=8)
    m = ReferenceModel(DictWeightSource(cfg, {n: src.get(n) for n in src.names()}))
    m.forward(ids[:8])
    with pytest.raises(UnsupportedError):
        m.forward(ids)


# -- V2 ---------------------------------------------------------------------------------------------


def _build_v2(seed: int, q_lora_rank, topk_method: str):
    kw = _tiny_kwargs(q_lora_rank=q_lora_rank, topk_method=topk_method, norm_topk_prob=False,
                      routed_scaling_factor=1.5)
    kw["rope_parameters"] = dict(YARN, mscale=0.707, mscale_all_dim=0.707)
    if topk_method == "greedy":
        kw.update(n_group=1, topk_group=1)
    cfg = transformers.DeepseekV2Config(**kw)
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(cfg).eval()
    _randomize(model, seed)
    src = DictWeightSource(cfg.to_dict(), _checkpoint_names(model.state_dict()))
    return model, src


@pytest.mark.parametrize(
    "q_lora_rank,topk_method", [(None, "greedy"), (32, "group_limited_greedy")], ids=["v2lite-greedy", "v2-glg"]
)
def test_v2_matches_transformers(q_lora_rank, topk_method):
    model, src = _build_v2(seed=11, q_lora_rank=q_lora_rank, topk_method=topk_method)
    cfg = ModelConfig.from_hf(src.config)
    assert (cfg.scoring_func, cfg.topk_method, cfg.q_lora_rank) == ("softmax", topk_method, q_lora_rank)
    assert softmax_scale(cfg) == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-12)
    ids = _ids(seed=12)
    ref, _ = _hf_logits(model, ids)
    out = ReferenceModel(src).forward(ids)
    m = compare_logits(ref, out.logits, ids)
    assert m["mean_kld"] <= 1e-6 and m["same_top_p"] == 1.0, m
    # the routing itself agrees with a slow per-token loop
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(13))
    logits = x @ src.get("model.layers.1.mlp.gate.weight").T
    _assert_same_routing(_as_dicts(*route(cfg, logits)), _slow_route(cfg, logits, None))


def test_v2_norm_topk_prob_semantics():
    """V2 (DeepSeek MoEGate): normalise *instead of* scaling; V3: normalise *then* scale."""
    base = ModelConfig.from_hf(dict(_v2_dict(), norm_topk_prob=True, routed_scaling_factor=16.0))
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    w, _ = route(base, logits)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    v3 = ModelConfig.from_hf(dict(_v2_dict(), model_type="deepseek_v3", norm_topk_prob=True,
                                  routed_scaling_factor=16.0, scoring_func="softmax", topk_method="greedy"))
    w3, _ = route(v3, logits)
    torch.testing.assert_close(w3.sum(-1), torch.full((5,), 16.0))


def _v2_dict():
    kw = _tiny_kwargs(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1)
    kw.pop("attn_implementation")
    kw["model_type"] = "deepseek_v2"
    return kw


def test_head_chunking_and_tied_embeddings(v3, monkeypatch):
    import dsconvert.model.forward as fwd

    _, src, ids, *_ = v3
    m = ReferenceModel(src)
    h = torch.randn(T_SEQ, 64, generator=torch.Generator().manual_seed(9))
    full = m.head(h)
    monkeypatch.setattr(fwd, "HEAD_CHUNK_ROWS", 7)  # 100 rows -> 15 chunks, last one short
    torch.testing.assert_close(m.head(h), full, rtol=1e-6, atol=1e-6)
    tensors = {n: src.get(n) for n in src.names() if n != "lm_head.weight"}
    tensors["model.embed_tokens.weight"] = src.get("lm_head.weight")
    tied = ReferenceModel(DictWeightSource(dict(src.config, tie_word_embeddings=True), tensors))
    torch.testing.assert_close(tied.head(h), full, rtol=1e-6, atol=1e-6)
