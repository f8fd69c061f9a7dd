"""``dsconvert imatrix``: the importance matrix of llama.cpp computed with our reference forward.

Oracle: the same sums taken independently with hooks on transformers' ``DeepseekV3ForCausalLM`` run on the same
token windows (linear inputs from forward pre-hooks, per-expert inputs from the routing transformers computes,
``attn_k_b``/``attn_v_b`` inputs from the un-roped query and transformers' own attention weights); the file is read
back with gguf-py and with ``dsconvert gguf --imatrix``'s reader, and the legacy ``.dat`` with its own parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from dsconvert.convert import gguf_export as ge
from dsconvert.formats import gguf_names as gn
from tests.conftest import run_cli
from tests.model.test_model_forward import _build_v3, _checkpoint_names

N_WIN, T_WIN = 3, 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random transformers DeepSeek-V3 written as an F32 checkpoint, plus calibration windows (token ids)."""
    model, _ = _build_v3(seed=3)
    d = tmp_path_factory.mktemp("imx") / "src"
    d.mkdir()
    sd = _checkpoint_names(model.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(5)
    wins = [torch.randint(0, cfg["vocab_size"], (T_WIN,), generator=g).tolist() for _ in range(N_WIN)]
    (d.parent / "calib.json").write_text(json.dumps(wins))
    return model, d, wins


def _hf_sums(model, wins, cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{gguf name: (sum of x^2 [n_mat, ne0], counts [n_mat])}`` from hooks on the transformers model."""
    acc: dict[str, list] = {}
    nh, dn, dr = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]

    def add(name, n_mat, mat, x, count_per_mat=False):
        x = x.detach().double().reshape(-1, x.shape[-1])
        v = acc.setdefault(name, [np.zeros((n_mat, x.shape[-1])), np.zeros(n_mat if count_per_mat else 1)])
        v[0][mat] += (x * x).sum(0).numpy()
        v[1][mat if count_per_mat else 0] += x.shape[0] if (count_per_mat or mat == 0) else 0

    hooks, latent = [], {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mname.startswith("model.layers.") and "kv_b_proj" not in mname:
            gname = gn.gguf_name(mname + ".weight", cfg)
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=gname: add(n, 1, 0, a[0])))
        if type(mod).__name__ == "DeepseekV3TopkRouter":
            gname = gn.gguf_name(mname + ".weight", cfg)
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=gname: add(n, 1, 0, a[0])))
        if type(mod).__name__ == "DeepseekV3Experts":
            bid = int(mname.split(".")[2])

            def experts(m, a, bid=bid):
                x, idx = a[0], a[1]
                for e in range(m.num_experts):
                    tok = (idx == e).any(-1).nonzero()[:, 0]
                    xs = x[tok]
                    gate, up = torch.nn.functional.linear(xs, m.gate_up_proj[e]).chunk(2, dim=-1)
                    for proj, inp in (("gate", xs), ("up", xs), ("down", m.act_fn(gate) * up)):
                        add(f"blk.{bid}.ffn_{proj}_exps.weight", m.num_experts, e, inp, count_per_mat=True)
            hooks.append(mod.register_forward_pre_hook(experts))
        if mname.endswith("self_attn.q_b_proj"):
            bid = int(mname.split(".")[2])

            def q_nope(m, a, out, bid=bid):
                q = out.view(-1, nh, dn + dr)[:, :, :dn]  # (T, H, dn), before RoPE
                for h in range(nh):
                    add(f"blk.{bid}.attn_k_b.weight", nh, h, q[:, h])
            hooks.append(mod.register_forward_hook(q_nope))
        if mname.endswith("self_attn.kv_a_layernorm"):
            bid = int(mname.split(".")[2])
            hooks.append(mod.register_forward_hook(lambda m, a, out, bid=bid: latent.__setitem__(bid, out)))
        if mname.endswith(".self_attn") and mname.startswith("model.layers."):
            bid = int(mname.split(".")[2])

            def v_b(m, a, out, bid=bid):
                probs = out[1][0]  # (H, T, T): transformers' eager attention weights
                lat = torch.matmul(probs, latent[bid].reshape(-1, latent[bid].shape[-1]))  # (H, T, kv_lora)
                for h in range(nh):
                    add(f"blk.{bid}.attn_v_b.weight", nh, h, lat[h])
            hooks.append(mod.register_forward_hook(v_b))
    with torch.no_grad():
        for w in wins:
            model(input_ids=torch.tensor(w)[None])
    for h in hooks:
        h.remove()
    return {k: (v[0], v[1]) for k, v in acc.items()}


def _read_gguf(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, np.float32) for x in r.tensors}
    return {n[: -len(".in_sum2")]: (v, t[n[: -len(".in_sum2")] + ".counts"].reshape(-1))
            for n, v in t.items() if n.endswith(".in_sum2")}


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_imatrix_equals_transformers_hooks(model_dir, tmp_path):
    model, d, wins = model_dir
    cfg = json.loads((d / "config.json").read_text())
    out = tmp_path / "imatrix.gguf"
    r = run_cli("imatrix", d, "-o", out, "--calib-data", d.parent / "calib.json", "--num-samples", N_WIN,
                "--seq-len", T_WIN, "--json")
    assert r.rc == 0, r.stderr
    rep = r.json()
    assert rep["calibration"]["windows"] == N_WIN and rep["calibration"]["tokens"] == N_WIN * T_WIN
    ours = _read_gguf(out)
    ref = _hf_sums(model, wins, cfg)
    assert set(ours) == set(ref)
    n_layer, n_exp, nh = cfg["num_hidden_layers"], cfg["n_routed_experts"], cfg["num_attention_heads"]
    assert {f"blk.{i}.attn_k_b.weight" for i in range(n_layer)} <= set(ours)
    for name, (v, c) in ref.items():
        ov, oc = ours[name]
        if name.endswith("_exps.weight"):
            assert ov.shape == v.shape == (n_exp, cfg["hidden_size"] if "down" not in name
                                           else cfg["moe_intermediate_size"]), name
            np.testing.assert_array_equal(oc, c, err_msg=name)  # tokens routed to each expert
            assert c.sum() == N_WIN * T_WIN * cfg["num_experts_per_tok"]
        elif "attn_k_b" in name or "attn_v_b" in name:
            v = v.reshape(1, -1)  # n_head matrices, one count: stored flat, as llama-imatrix does
            assert oc.tolist() == [N_WIN * T_WIN]
        else:
            assert oc.tolist() == [N_WIN * T_WIN], name
        np.testing.assert_allclose(ov.reshape(v.shape), v, rtol=2e-5, atol=1e-6, err_msg=name)
    # the gguf command's reader turns it into mean squares per matrix (1 for an expert no token reached)
    loaded = ge.load_imatrix(out)
    name = "blk.1.ffn_down_exps.weight"
    v, c = ref[name]
    want = np.where(c[:, None] > 0, v / np.maximum(c, 1)[:, None], 1.0)
    np.testing.assert_allclose(loaded[name], want, rtol=2e-5)
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == N_WIN
    assert r.fields["imatrix.chunk_size"].contents() == T_WIN
    assert nh > 1


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_legacy_dat_and_gguf_read_back_alike(model_dir, tmp_path):
    _, d, _ = model_dir
    args = ("--calib-data", d.parent / "calib.json", "--num-samples", N_WIN, "--seq-len", T_WIN, "-q")
    assert run_cli("imatrix", d, "-o", tmp_path / "a.gguf", *args).rc == 0
    assert run_cli("imatrix", d, "-o", tmp_path / "a.dat", "--output-format", "dat", *args).rc == 0
    a, b = ge.load_imatrix(tmp_path / "a.gguf"), ge.load_imatrix(tmp_path / "a.dat")
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_allclose(b[n].reshape(a[n].shape), a[n], rtol=1e-5, err_msg=n)
    # a second run refuses to overwrite; --overwrite replaces atomically
    r = run_cli("imatrix", d, "-o", tmp_path / "a.gguf", *args)
    assert r.rc == 2 and "exists" in r.stderr
    assert run_cli("imatrix", d, "-o", tmp_path / "a.gguf", "--overwrite", *args).rc == 0
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_dry_run_and_bad_format(model_dir, tmp_path):
    _, d, _ = model_dir
    r = run_cli("imatrix", d, "-o", tmp_path / "x.gguf", "--dry-run", "--json", "--calib-data",
                d.parent / "calib.json", "--num-samples", 2, "--seq-len", 8)
    assert r.rc == 0 and r.json()["estimated_peak_memory_bytes"] > 0 and not (tmp_path / "x.gguf").exists()
    r = run_cli("imatrix", d, "-o", tmp_path / "x.gguf", "--output-format", "bin")
    assert r.rc == 2 and "gguf" in r.stderr


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_gguf_export_uses_our_imatrix(tmp_path):
    """FP8 fixture -> imatrix -> gguf Q4_K_M --imatrix: accepted, every quantized tensor but token_embd/output
    weighted, and the bytes differ from the unweighted file."""
    from dsconvert.testing.fixtures import build_checkpoint

    src = build_checkpoint(tmp_path / "fx", "tiny")
    im = tmp_path / "im.gguf"
    assert run_cli("imatrix", src, "-o", im, "--num-samples", 2, "--seq-len", 32, "-q").rc == 0
    r = run_cli("gguf", src, "-o", tmp_path / "w.gguf", "--type", "Q4_K_M", "--imatrix", im, "--json", "-q")
    assert r.rc == 0, r.stderr
    info = r.json()["plan"]["imatrix"]
    assert info["used"] and info["tensors_weighted"] > 0
    assert set(info["tensors_without_entry"]) <= {"token_embd.weight", "output.weight"}
    assert run_cli("gguf", src, "-o", tmp_path / "p.gguf", "--type", "Q4_K_M", "-q").rc == 0
    assert (tmp_path / "w.gguf").read_bytes() != (tmp_path / "p.gguf").read_bytes()
