"""Calibration on DeepSeek-V4 (dsconvert/convert/calibrate_v4.py) on the tiny ``v4_src`` release fixture.

Oracle for the captured inputs: forward hooks on transformers' ``DeepseekV4ForCausalLM`` (built from the same
config with the fixture's exactly decoded weights, tests/test_model_v4.py ``_hf_model``): pre-hooks on every
quantizable ``nn.Linear`` (and the grouped ``o_a_proj``), and for the routed experts the rows transformers' own
router sends to each expert with ``w2``'s input recomputed from transformers' ``_apply_gate``.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsconvert.formats import deepseek_v4 as v4
from tests.test_model_v4 import _hf_model


@pytest.fixture(scope="module")
def hf_v4(v4_src):
    return _hf_model(v4_src)


def _hf_names(src) -> dict[str, str]:
    """transformers module name -> release module name, for the quantizable dense linears."""
    from dsconvert.convert.calibrate_v4 import is_quantizable

    g = v4.geometry(json.loads((src / "config.json").read_text()))
    out = {}
    for e in v4.expected_tensors(g):
        if e.hf is None or not e.name.endswith(".weight") or e.layer >= g.layers:
            continue
        mod = e.name[: -len(".weight")]
        if is_quantizable(mod):
            hf = e.hf if e.hf.startswith("model.") else f"model.layers.{e.layer}.{e.hf}"
            out[hf[: -len(".weight")]] = mod
    return out


def hf_inputs(model, src, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{release module: (n, K) float32}`` inputs of every quantizable linear in transformers' forward of
    one sequence ``ids`` (routed experts: their routed tokens in ascending order)."""
    names = _hf_names(src)
    got: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def put(name, x):
        got.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float().clone())

    for mname, mod in model.named_modules():
        if mname in names:
            rel = names[mname]
            if rel.endswith("attn.wo_a"):  # (B, S, groups, K_g) -> (n, groups * K_g)
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, a, r=rel: put(r, a[0].reshape(-1, a[0].shape[-2] * a[0].shape[-1]))))
            else:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, r=rel: put(r, a[0])))
        if type(mod).__name__ == "DeepseekV4Experts":
            layer = int(mname.split(".")[2])

            def experts(m, a, layer=layer):
                x, idx = a[0], a[1]
                for e in range(m.num_experts):
                    tok = (idx == e).any(-1).nonzero()[:, 0]
                    if tok.numel() == 0:
                        continue
                    xs = x[tok]
                    p = f"layers.{layer}.ffn.experts.{e}."
                    put(p + "w1", xs)
                    put(p + "w3", xs)
                    put(p + "w2", m._apply_gate(torch.nn.functional.linear(xs, m.gate_up_proj[e])))
            hooks.append(mod.register_forward_pre_hook(experts))
    try:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def our_inputs(src, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    from dsconvert.convert.calibrate_v4 import capture_hook
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model.v4 import V4ReferenceModel

    got: dict[str, list[torch.Tensor]] = {}
    hook = capture_hook(lambda n, x: got.setdefault(n, []).append(x.clone()))
    V4ReferenceModel(CheckpointWeightSource(src)).forward(ids, on_linear=hook)
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.mark.parametrize("T", [40, 150])
def test_capture_matches_transformers_hooks(v4_src, hf_v4, T):
    """Every quantizable linear's input, layer by layer, routed experts only on their routed tokens."""
    ids = torch.randint(0, 512, (T,), generator=torch.Generator().manual_seed(T))
    ref, ours = hf_inputs(hf_v4, v4_src, ids), our_inputs(v4_src, ids)
    assert set(ours) == set(ref)
    g = v4.geometry(json.loads((v4_src / "config.json").read_text()))
    kinds = {n.split(".", 2)[2].split(".")[0] + "." + n.rsplit(".", 1)[1] for n in ours}
    assert {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.wq_b", "ffn.w1", "ffn.w2",
            "ffn.w3"} <= kinds and any("indexer.wq_b" in n for n in ours)
    assert not any("compressor" in n or n.endswith(("ffn.gate", "weights_proj")) for n in ours)
    for layer in range(g.layers):
        routed = sum(ours[n].shape[0] for n in ours if n.startswith(f"layers.{layer}.ffn.experts.")
                     and n.endswith(".w1"))
        assert routed == T * g.experts_per_tok
    for n, x in ref.items():
        assert ours[n].shape == x.shape, n
        scale = x.abs().max().item()
        assert (ours[n] - x).abs().max().item() <= 1e-6 * scale, n
