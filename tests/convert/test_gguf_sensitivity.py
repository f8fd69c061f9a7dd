"""``--sensitivity forward`` (dsconvert/convert/gguf_sensitivity.py) against a slow, obvious route.

The oracle is transformers' ``DeepseekV3ForCausalLM`` (float32, eager attention) loaded from a float32 copy of the
trained tiny DeepSeek-V3 made here with safetensors and the table-decoding FP8 reference of tests/_reference.py
(the exact product ``fp32(w) * scale``, the values the export quantizes), never dsconvert's readers. One weight of
it is replaced by our quantized-then-dequantized version (the quantizer is tested elsewhere), a hook records the
output of decoder layer 1 on the same calibration windows, and the relative change of that output is compared with
the module's figure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsconvert.convert import gguf_export as ge
from dsconvert.convert import gguf_sensitivity as gs
from dsconvert.convert.calib_data import calibration_ids
from dsconvert.errors import UnsupportedError
from dsconvert.quant import ggml
from tests._reference import dequant_fp8_block_reference

LAYER = 1  # the trained fixture's first MoE layer (first_k_dense_replace = 1)


def _float32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every FP8 weight decoded to float32 by the reference, the MTP layer and the scales dropped,
    and no quantization_config: a plain float32 checkpoint for transformers."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        raw.update(load_file(str(shard)))
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv") or name.startswith(mtp):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = dequant_fp8_block_reference(t, raw[name + "_scale_inv"], out_dtype=torch.float32)
        else:
            out[name] = t.to(torch.float32)
    save_file(out, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def hf(trained_src, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = _float32_copy(trained_src, tmp_path_factory.mktemp("f32") / "ck")
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(d), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _layer_outputs(model, seqs: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(decoder layer LAYER's output per window ``[T, hidden]``, the routed experts' ``top_k_index`` per window)."""
    outs, routes = [], []
    layer = model.model.layers[LAYER]
    h1 = layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0].clone()))
    h2 = layer.mlp.experts.register_forward_pre_hook(lambda m, a: routes.append(a[1].clone()))
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=torch.tensor([s]))
    finally:
        h1.remove()
        h2.remove()
    return outs, routes


def _qdq(w: torch.Tensor, qtype: str) -> torch.Tensor:
    x = w.detach().to(torch.float32).reshape(-1, w.shape[-1]).contiguous()
    raw = ge.encode(x, qtype, torch.device("cpu"))
    return ggml.dequantize(torch.from_numpy(raw), qtype, tuple(x.shape)).reshape(w.shape)


def _rel(model, param: torch.nn.Parameter, new: torch.Tensor, seqs, clean) -> float:
    old = param.data.clone()
    param.data.copy_(new)
    try:
        pert, _ = _layer_outputs(model, seqs)
    finally:
        param.data.copy_(old)
    num = sum(float((p.double() - c.double()).pow(2).sum()) for p, c in zip(pert, clean))
    return num / sum(float(c.double().pow(2).sum()) for c in clean)


# The two routes are float32 forwards in different operation orders (transformers' eager attention and fused
# experts vs our naive MLA and per-expert matmuls): measured here, the figures agree to 4e-6 relative (worst of
# the five below). 1e-3 leaves room for other BLAS builds and is still far tighter than a definitional slip (a
# wrong tensor, head layout, expert scale or normalisation changes the figure by a large factor).
RTOL = 1e-3


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_forward_sensitivity_matches_transformers(trained_src, hf):
    ck = ge.open_checkpoint(trained_src)
    plan = ge.make_plan(ck, ge.GGUFOptions(type="Q8_0"), None).gguf_plan
    p = f"blk.{LAYER}."
    cands = {p + "attn_q_b.weight": ["Q4_0"], p + "attn_k_b.weight": ["Q5_0"], p + "ffn_gate_exps.weight": ["Q2_K"],
             p + "ffn_up_shexp.weight": ["Q3_K"]}
    got, rec = gs.forward_sensitivity(ck, plan, cands, {})
    seqs, calib = calibration_ids(ck, None, gs.DEFAULT_SAMPLES, gs.DEFAULT_SEQ_LEN)
    assert rec["calibration"] == calib and rec["calibration"]["tokens"] == 512
    assert rec["expert_sample"] == {f"blk.{LAYER}": list(range(8))}  # 8 experts, all reached: the whole tensor
    clean, _ = _layer_outputs(hf, seqs)
    layer = hf.model.layers[LAYER]
    attn = layer.self_attn
    want = {p + "attn_q_b.weight": _rel(hf, attn.q_b_proj.weight, _qdq(attn.q_b_proj.weight, "Q4_0"), seqs, clean)}
    # attn_k_b: the kv_b_proj rows of every head's k half, as the file holds them [n_head, kv_lora, nope]
    kv = attn.kv_b_proj.weight.detach()
    cfg = hf.config
    heads = kv.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
    k_b = heads[:, : cfg.qk_nope_head_dim].transpose(1, 2)  # [n_head, kv_lora, nope]
    new = heads.clone()
    new[:, : cfg.qk_nope_head_dim] = _qdq(k_b, "Q5_0").transpose(1, 2)
    want[p + "attn_k_b.weight"] = _rel(hf, attn.kv_b_proj.weight, new.reshape(kv.shape), seqs, clean)
    # every routed expert's gate rows (transformers keeps gate and up fused: [E, 2I, hidden], gate first)
    gu = layer.mlp.experts.gate_up_proj
    inter = gu.shape[1] // 2
    new = gu.detach().clone()
    new[:, :inter] = torch.stack([_qdq(gu[e, :inter], "Q2_K") for e in range(gu.shape[0])])
    want[p + "ffn_gate_exps.weight"] = _rel(hf, gu, new, seqs, clean)
    sh = layer.mlp.shared_experts.up_proj.weight
    want[p + "ffn_up_shexp.weight"] = _rel(hf, sh, _qdq(sh, "Q3_K"), seqs, clean)
    for n, c in cands.items():
        assert got[n][c[0]] == pytest.approx(want[n], rel=RTOL), (n, got[n], want[n])
        assert want[n] > 0


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_sampled_experts_scale_by_assignments(trained_src, hf, monkeypatch):
    """With 2 of the 8 experts sampled: only those are perturbed and ||D_S||^2 is scaled by A / A_S (assignments
    counted from transformers' own routing)."""
    monkeypatch.setattr(gs, "EXPERT_SAMPLE", 2)
    ck = ge.open_checkpoint(trained_src)
    plan = ge.make_plan(ck, ge.GGUFOptions(type="Q8_0"), None).gguf_plan
    name = f"blk.{LAYER}.ffn_down_exps.weight"
    got, rec = gs.forward_sensitivity(ck, plan, {name: ["Q4_0"]}, {})
    sample = rec["expert_sample"][f"blk.{LAYER}"]
    seqs, _ = calibration_ids(ck, None, gs.DEFAULT_SAMPLES, gs.DEFAULT_SEQ_LEN)
    clean, routes = _layer_outputs(hf, seqs)
    idx = torch.cat([r.reshape(-1, r.shape[-1]) for r in routes])  # [tokens, k]
    counts = torch.bincount(idx.flatten(), minlength=8)
    hit = torch.nonzero(counts > 0).flatten().tolist()
    assert sample == [hit[0], hit[len(hit) // 2]]  # spread over the experts that received tokens
    down = hf.model.layers[LAYER].mlp.experts.down_proj
    new = down.detach().clone()
    for e in sample:
        new[e] = _qdq(down[e], "Q4_0")
    want = _rel(hf, down, new, seqs, clean) * idx.numel() / int(counts[sample].sum())
    assert got[name]["Q4_0"] == pytest.approx(want, rel=RTOL)


def test_expert_sample_spreads_over_the_experts_with_tokens():
    counts = torch.tensor([0, 3, 0, 1, 5, 0, 2, 0, 0, 7])
    assert gs.expert_sample(counts, 2) == [1, 4]  # hit[0], hit[5 // 2]
    assert gs.expert_sample(counts, 8) == [1, 3, 4, 6, 9]  # fewer with tokens than k: all of them
    assert gs.expert_sample(torch.zeros(4, dtype=torch.long), 8) == []


def test_forward_sensitivity_refuses_v4(v4_src):
    ck = ge.open_checkpoint(v4_src, check_values=False)
    with pytest.raises(UnsupportedError, match="DeepSeek-V4"):
        gs.forward_sensitivity(ck, ge.make_plan(ck, ge.GGUFOptions(type="Q8_0"), None).gguf_plan, {}, {})
