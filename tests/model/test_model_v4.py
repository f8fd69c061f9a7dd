"""The DeepSeek-V4 reference forward (dsconvert/model/v4.py) against transformers' DeepseekV4ForCausalLM.

Oracle: transformers 5.24's model built from the fixture's config.json (``_from_config``, no remote code) with
the fixture's exactly decoded weights loaded as a strict state dict; ours reads the FP8/FP4 checkpoint on disk
through CheckpointWeightSource. Lengths cover every layer kind: below the first HCA window, partial CSA
windows, and past the sliding window (16) and one HCA window (128)."""

from __future__ import annotations

import json

import pytest
import torch

from dsconvert.formats import deepseek_v4 as v4


def _hf_model(src):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from dsconvert.testing.deepseek_v4 import decoded_state_dict

    cfg = json.loads((src / "config.json").read_text())
    g = v4.geometry(cfg)
    dec = decoded_state_dict(src)
    sd = {}
    for e in v4.expected_tensors(g):
        if e.hf is not None:
            sd[e.hf] = dec[e.name]
    for i in range(g.layers):
        p = f"layers.{i}.ffn.experts."
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([dec[f"{p}{x}.w1.weight"], dec[f"{p}{x}.w3.weight"]]) for x in range(g.experts)])
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [dec[f"{p}{x}.w2.weight"] for x in range(g.experts)])
    hf_cfg = DeepseekV4Config(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    hf_cfg._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return model


@pytest.fixture(scope="module")
def hf_v4(v4_src):
    return _hf_model(v4_src)


@pytest.mark.parametrize("T", [7, 40, 150])
def test_v4_logits_match_transformers(v4_src, hf_v4, T):
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model.v4 import V4ReferenceModel

    ids = torch.randint(0, 512, (T,), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        o = hf_v4(input_ids=ids[None], use_cache=False, output_hidden_states=True)
    want = o.logits[0].float()
    out = V4ReferenceModel(CheckpointWeightSource(v4_src)).forward(ids, return_hidden=True)
    got = out.logits
    # transformers records the embedding streams, then each layer's output but the last (replaced by the normed
    # final state): our streams after layers 0..L-2 must be its entries 1..L-1
    L = len(out.hidden_states)
    for i in range(L - 1):
        ref = o.hidden_states[i + 1][0]
        assert ref.shape == out.hidden_states[i].shape
        assert (out.hidden_states[i] - ref).abs().max().item() <= 1e-6 * ref.abs().max().item(), i
    rel = (got - want).abs().max().item() / want.abs().max().item()
    print(f"T={T} max|d|={(got - want).abs().max().item():.3g} scale={want.abs().max().item():.3g} rel={rel:.3g}")
    assert rel < 1e-6  # measured 0.0 (bit-exact) on CPU; one Sinkhorn round fewer gives 2.4e-6
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_v4_logits_and_validate_cli(v4_src, hf_v4, tmp_path):
    """``dsconvert logits`` on the FP8/FP4 release checkpoint returns transformers' logits; ``validate`` of its
    lossless BF16 conversion gives KLD 0, and a candidate with one attention output projection scaled by 1.5
    (``layers.1.attn.wo_b``, a CSA layer) is measured as different."""
    import numpy as np
    from safetensors.torch import load_file, save_file

    from tests.convert.test_validate import cli

    ids = [(i * 37 + 5) % 512 for i in range(48)]
    rc, rep = cli("logits", v4_src, "--token-ids", ",".join(map(str, ids)), "-o", tmp_path / "l.npy", "--json")
    assert rc == 0, rep
    with torch.no_grad():
        want = hf_v4(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    got = torch.from_numpy(np.load(tmp_path / "l.npy"))
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()

    bf = tmp_path / "bf"
    rc, rep = cli("fp8-to-bf16", v4_src, "-o", bf, "--json")
    assert rc == 0, rep
    rc, rep = cli("validate", bf, "--reference", v4_src, "--token-ids", ",".join(map(str, ids)), "--json")
    assert rc == 0 and rep["passed"] and rep["mean_kld"] == 0.0 and rep["same_top_p"] == 1.0, rep

    idx = json.loads((bf / "model.safetensors.index.json").read_text())["weight_map"]
    name = "layers.1.attn.wo_b.weight"
    shard = bf / idx[name]
    tensors = load_file(str(shard))
    tensors[name] = (tensors[name].float() * 1.5).to(tensors[name].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc, rep = cli("validate", bf, "--reference", v4_src, "--token-ids", ",".join(map(str, ids)), "--json")
    assert rep["mean_kld"] > 0 and rep["first_diverging_layer"] == 1, rep


@pytest.mark.parametrize("variant,topk", [("flash", 8), ("flash-base", 64)])
def test_v4_indexer_selection_and_fp8_experts(tmp_path, variant, topk):
    """``index_topk`` 8 below the 37 compressed entries of 150 tokens, so the Lightning Indexer's choice decides
    which CSA entries each query sees (the default fixture's 64 keeps them all); and V4-Flash-Base's FP8 experts."""
    pytest.importorskip("transformers.models.deepseek_v4")
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model.v4 import V4ReferenceModel
    from dsconvert.testing.deepseek_v4 import build_v4_checkpoint

    src = build_v4_checkpoint(tmp_path / "s", "tiny", variant=variant, index_topk=topk, tokenizer=False,
                              extra_files=False)
    hf = _hf_model(src)
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(input_ids=ids[None], use_cache=False).logits[0].float()
    got = V4ReferenceModel(CheckpointWeightSource(src)).forward(ids).logits
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_v4_streams_one_layer_and_one_expert(v4_src):
    """Through validate's LayerCachedSource the V4 forward keeps one layer's non-expert tensors and never a routed
    expert; each expert tensor is read at most once per layer (the registry picks V4 by model_type)."""
    from collections import Counter

    from dsconvert.convert.validate import LayerCachedSource
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model.registry import V3, V4, architecture, reference_model
    from dsconvert.model.v4 import V4ReferenceModel

    assert architecture({"model_type": "deepseek_v4"}) is V4 and architecture({"model_type": "deepseek_v3"}) is V3
    inner = CheckpointWeightSource(v4_src)
    reads: Counter = Counter()
    layers_held: list[set] = []

    class Counting:
        config = inner.config

        def has(self, n):
            return inner.has(n)

        def get(self, n):
            reads[n] += 1
            return inner.get(n)

    src = LayerCachedSource(Counting())
    real_get = src.get

    def get(n):
        t = real_get(n)
        layers_held.append({v4.layer_index(k) for k in src._cache})
        assert not any(v4.is_routed_expert(k) for k in src._cache)
        return t

    src.get = get
    m = reference_model(src)
    assert isinstance(m, V4ReferenceModel)
    ids = torch.arange(40) * 7 % 512
    m.forward(ids)
    assert max(len(s) for s in layers_held) == 1
    assert max(c for n, c in reads.items() if v4.is_routed_expert(n)) == 1
    assert max(reads.values()) == 1
