"""The DeepSeek-V3 layout table (dsconvert/formats/deepseek_v3.py) against transformers' ``DeepseekV3ForCausalLM``:
its ``nn.Linear`` modules per decoder layer are exactly the table's linears (+ the router), for a LoRA-query and a
plain-query config, dense and MoE layers; and every tensor of the release-layout fixture is placed in the right
layer, MTP included."""

from __future__ import annotations

import json

import pytest
import torch

from dsconvert.formats import deepseek_v3 as v3


def _hf_model(cfg: dict):
    transformers = pytest.importorskip("transformers")
    conf = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in ("quantization_config",)})
    with torch.device("meta"):
        return transformers.DeepseekV3ForCausalLM(conf)


def _hf_linears(cfg: dict) -> tuple[dict[int, set[str]], set[str]]:
    """(per layer: its nn.Linear module names, every parameter/buffer name of the model)."""
    model = _hf_model(cfg)
    out: dict[int, set[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            out.setdefault(int(name.split(".")[2]), set()).add(name)
    state = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return out, state




@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_table_linears_are_transformers_linears(tiny_src, q_lora_rank):
    cfg = json.loads((tiny_src / "config.json").read_text())
    cfg["q_lora_rank"] = q_lora_rank
    hf, state = _hf_linears(cfg)
    assert set(hf) == set(range(cfg["num_hidden_layers"]))
    for layer, names in hf.items():
        moe = layer >= cfg["first_k_dense_replace"]
        ours = set(v3.layer_linears(layer, q_lora_rank=q_lora_rank, moe=moe, n_routed_experts=cfg["n_routed_experts"],
                                    n_shared_experts=cfg["n_shared_experts"]))
        ours_no_experts = {n for n in ours if ".mlp.experts." not in n}
        hf_no_experts = {n for n in names if ".mlp.experts." not in n}
        assert hf_no_experts == ours_no_experts, layer
        if moe:  # the router (not an nn.Linear in transformers 5): the table's names are its parameters
            assert {f"model.layers.{layer}.{t}" for t in v3.ROUTER_TENSORS} <= state, layer
        hf_experts = {n for n in names if ".mlp.experts." in n}
        if hf_experts:  # per-expert nn.Linear modules: the same names
            assert hf_experts == ours - ours_no_experts, layer


def test_every_fixture_tensor_is_placed(tiny_src):
    cfg = json.loads((tiny_src / "config.json").read_text())
    idx = json.loads((tiny_src / "model.safetensors.index.json").read_text())["weight_map"]
    n = cfg["num_hidden_layers"]
    quantizable = {k for k in idx if v3.QUANTIZABLE.match(k)}
    expected = set()
    for layer in range(n + cfg.get("num_nextn_predict_layers", 0)):
        moe = layer >= cfg["first_k_dense_replace"]
        expected |= {m + ".weight" for m in v3.layer_linears(
            layer, q_lora_rank=cfg["q_lora_rank"], moe=moe, n_routed_experts=cfg["n_routed_experts"],
            n_shared_experts=cfg["n_shared_experts"])}
    assert quantizable == expected
    for k in idx:
        i = v3.layer_index(k)
        assert (i is None) == (not k.startswith("model.layers.")), k
        assert v3.is_mtp(k, n) == (i is not None and i >= n), k
    assert any(v3.is_mtp(k, n) for k in idx)  # the fixture has an MTP block
    groups = {v3.fused_group(k) for k in quantizable} - {None}
    assert len([g for g in groups if "FusedMoE" in g]) == n + cfg.get("num_nextn_predict_layers", 0) \
        - cfg["first_k_dense_replace"]
