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
from tests.convert.test_gguf_export import _llama_cpp
from tests.model.test_model_v4 import _hf_model


@pytest.fixture(scope="module")
def hf_v4(v4_src):
    return _hf_model(v4_src)


def _hf_names(src, every: bool = False) -> dict[str, str]:
    """transformers module name -> release module name: the quantizable dense linears (``every``: all 2-D
    layer weights, the kept compressor / indexer projections and the router included)."""
    from dsconvert.convert.calibrate_v4 import is_quantizable

    g = v4.geometry(json.loads((src / "config.json").read_text()))
    out = {}
    for e in v4.expected_tensors(g):
        if e.hf is None or not e.name.endswith(".weight") or not 0 <= e.layer < g.layers or len(e.shape) != 2:
            continue
        mod = e.name[: -len(".weight")]
        if every or is_quantizable(mod):
            hf = e.hf if e.hf.startswith("model.") else f"model.layers.{e.layer}.{e.hf}"
            out[hf[: -len(".weight")]] = mod
    return out


def hf_inputs(model, src, ids: torch.Tensor, every: bool = False) -> dict[str, torch.Tensor]:
    """``{release module: (n, K) float32}`` inputs of every quantizable linear (``every``: every linear) in
    transformers' forward of one sequence ``ids`` (routed experts: their routed tokens in ascending order)."""
    names = _hf_names(src, every)
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
    # two float32 forwards whose matmul and reduction orders differ with the CPU's kernels (ATen picks them
    # per CPU): the deepest captured inputs differed by 1.09e-6 of their largest value on an AMD EPYC, where
    # the Intel machine that wrote this test stayed within 1e-6; an input captured from the wrong place is
    # off by O(1)
    for n, x in ref.items():
        assert ours[n].shape == x.shape, n
        scale = x.abs().max().item()
        assert (ours[n] - x).abs().max().item() <= 1e-5 * scale, n


def test_imatrix_v4_equals_transformers_hooks(v4_src, hf_v4, tmp_path):
    """``dsconvert imatrix`` on the V4 release: llama.cpp's GGUF imatrix under the deepseek4 names, the sums of
    squared inputs and counts of transformers' forward on the same windows (experts: per expert, routed tokens)."""
    import gguf
    import numpy as np

    from dsconvert.convert import gguf_export as ge
    from dsconvert.formats import gguf_deepseek4 as g4
    from tests.conftest import run_cli

    cfg = json.loads((v4_src / "config.json").read_text())
    g = v4.geometry(cfg)
    gen = torch.Generator().manual_seed(11)
    wins = [torch.randint(0, 512, (T,), generator=gen) for T in (40, 150)]
    (tmp_path / "calib.json").write_text(json.dumps([w.tolist() for w in wins]))
    out = tmp_path / "im.gguf"
    r = run_cli("imatrix", v4_src, "-o", out, "--calib-data", tmp_path / "calib.json", "--num-samples", 2,
                "--seq-len", 150, "--json")
    assert r.rc == 0, r.stderr
    assert r.json()["calibration"]["tokens"] == 190
    ref: dict[str, list] = {}
    for w in wins:
        for mod, x in hf_inputs(hf_v4, v4_src, w, every=True).items():
            parts = mod.split(".")
            if ".ffn.experts." in mod:
                name, n_mat, mat = f"blk.{parts[1]}.{g4.EXPERT_NAMES[parts[5]]}", g.experts, int(parts[4])
            else:
                name, n_mat, mat = g4.gguf_name(mod + ".weight"), 1, 0
            if mod.endswith("attn.wo_a"):  # one K_g-vector for the 2-D file tensor: every group's rows
                x = x.reshape(-1, x.shape[1] // g.o_groups)
            v = ref.setdefault(name, [np.zeros((n_mat, x.shape[1])), np.zeros(n_mat)])
            v[0][mat] += (x.double() ** 2).sum(0).numpy()
            v[1][mat] += x.shape[0]
    for w in wins:  # the mHC matrices' input: transformers' input_norm output (flattened, normed streams)
        got, hooks = {}, []
        for i, layer in enumerate(hf_v4.model.layers):
            for hc, k in ((layer.attn_hc, "hc_attn_fn"), (layer.ffn_hc, "hc_ffn_fn")):
                hooks.append(hc.input_norm.register_forward_hook(
                    lambda m, a, o, n=f"blk.{i}.{k}.weight": got.__setitem__(n, o[0].double())))
        with torch.no_grad():
            hf_v4(input_ids=w[None], use_cache=False)
        for h in hooks:
            h.remove()
        for n, x in got.items():
            v = ref.setdefault(n, [np.zeros((1, x.shape[1])), np.zeros(1)])
            v[0][0] += (x ** 2).sum(0).numpy()
            v[1][0] += x.shape[0]
    rd = gguf.GGUFReader(str(out))
    t = {x.name: np.asarray(x.data, np.float32) for x in rd.tensors}
    ours = {n[: -len(".in_sum2")]: (v, t[n[: -len(".in_sum2")] + ".counts"].reshape(-1))
            for n, v in t.items() if n.endswith(".in_sum2")}
    assert set(ours) == set(ref)
    assert {f"blk.{i}.{k}" for i in range(g.layers) for k in ("attn_output_a.weight", "ffn_gate_inp.weight",
                                                              "ffn_down_exps.weight")} <= set(ours)
    assert "blk.1.indexer.attn_q_b.weight" in ours and "blk.2.attn_compressor_kv.weight" in ours
    for name, (v, c) in ref.items():
        ov, oc = ours[name]
        np.testing.assert_array_equal(oc, c, err_msg=name)
        np.testing.assert_allclose(ov.reshape(v.shape), v, rtol=2e-5, atol=1e-6, err_msg=name)
    assert ours["blk.0.ffn_gate_exps.weight"][1].sum() == 190 * g.experts_per_tok
    assert ours["blk.0.attn_output_a.weight"][0].shape == (1, g.heads * g.head_dim // g.o_groups)
    assert ours["blk.0.attn_output_a.weight"][1].tolist() == [190 * g.o_groups]
    assert rd.fields["general.type"].contents() == "imatrix"
    loaded = ge.load_imatrix(out)  # the gguf command's reader takes it
    assert loaded["blk.3.ffn_up_exps.weight"].shape == (g.experts, g.hidden)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_imatrix_v4_process_output_and_dry_run(v4_src, tmp_path):
    """``--process-output`` adds ``output.weight`` (the head's input: every token, one count); ``--dry-run``
    estimates and writes nothing."""
    import gguf

    from tests.conftest import run_cli

    (tmp_path / "c.json").write_text(json.dumps([list(range(30)), list(range(5, 25))]))
    args = ("--calib-data", tmp_path / "c.json", "--num-samples", 2, "--seq-len", 30)
    r = run_cli("imatrix", v4_src, "-o", tmp_path / "d.gguf", "--dry-run", "--json", *args)
    assert r.rc == 0 and r.json()["estimated_peak_memory_bytes"] > 0 and not (tmp_path / "d.gguf").exists()
    r = run_cli("imatrix", v4_src, "-o", tmp_path / "o.gguf", "--process-output", "-q", *args)
    assert r.rc == 0, r.stderr
    t = {x.name: x.data for x in gguf.GGUFReader(str(tmp_path / "o.gguf")).tensors}
    assert t["output.weight.counts"].reshape(-1).tolist() == [50.0]
    assert t["output.weight.in_sum2"].size == 256 and (t["output.weight.in_sum2"] > 0).all()


# --- GPTQ ------------------------------------------------------------------------------------------------------

CALIB = [list(range(3, 67)), [(7 * i + 1) % 512 for i in range(64)], [(11 * i + 5) % 512 for i in range(48)]]


def _policy(bits=4):
    from dsconvert.convert.policy import LayerPolicy
    from dsconvert.quant.rtn import QuantSpec

    pol = LayerPolicy(QuantSpec(bits, 128, True))
    return lambda mod, shape: pol(mod + ".weight", shape)


@pytest.fixture(scope="module")
def engine_layers(v4_src):
    """Layers 0 and 1 of the V4 GPTQ engine on CALIB (W4, group 128, compressed-tensors storage)."""
    from dsconvert.convert.calibrate_v4 import V4CalibrationEngine
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.quant.rtn import COMPRESSED_TENSORS

    eng = V4CalibrationEngine(CheckpointWeightSource(v4_src), _policy(), "gptq", COMPRESSED_TENSORS, CALIB,
                              expert_group=3)
    return eng, [eng.run_layer(0), eng.run_layer(1)]


def _hf_hessian_gptq(model, src, layer: int, dec) -> dict[str, torch.Tensor]:
    """GPTQ of layer ``layer``'s linears from Hessians of transformers' inputs on CALIB (wo_a per group): the
    independent data path the engine's results must reproduce."""
    from dsconvert.quant.gptq import HessianAccumulator, gptq_quantize
    from dsconvert.quant.rtn import COMPRESSED_TENSORS, QuantSpec, dequantize

    g = v4.geometry(json.loads((src / "config.json").read_text()))
    rows: dict[str, list[torch.Tensor]] = {}
    for s in CALIB:
        for m, x in hf_inputs(model, src, torch.tensor(s)).items():
            if m.startswith(f"layers.{layer}."):
                rows.setdefault(m, []).append(x)
    spec, out = QuantSpec(4, 128, True), {}
    for m, xs in rows.items():
        x, w = torch.cat(xs), dec[m + ".weight"].float()
        if m.endswith("attn.wo_a"):
            kg, r = x.shape[1] // g.o_groups, w.shape[0] // g.o_groups
            blocks = []
            for j in range(g.o_groups):
                acc = HessianAccumulator(kg)
                acc.add(x[:, j * kg:(j + 1) * kg])
                blocks.append(dequantize(gptq_quantize(w[j * r:(j + 1) * r], acc.H, spec, COMPRESSED_TENSORS)))
            out[m] = torch.cat(blocks)
            continue
        acc = HessianAccumulator(x.shape[1])
        acc.add(x)
        out[m] = dequantize(gptq_quantize(w, acc.H, spec, COMPRESSED_TENSORS))
    return out


def _load_layer(model, src, layer: int, weights: dict[str, torch.Tensor]) -> None:
    """Put release-named ``weights`` of ``layer`` into the transformers model."""
    g = v4.geometry(json.loads((src / "config.json").read_text()))
    sd = model.state_dict()
    hf = {e.name[: -len(".weight")]: (e.hf if e.hf.startswith("model.") else f"model.layers.{e.layer}.{e.hf}")
          for e in v4.expected_tensors(g) if e.hf is not None and e.layer == layer}
    p = f"model.layers.{layer}.mlp.experts."
    for m, w in weights.items():
        if ".ffn.experts." in m:
            e, k = int(m.split(".")[4]), m.rsplit(".", 1)[1]
            if k == "w2":
                sd[p + "down_proj"][e] = w
            else:
                half = sd[p + "gate_up_proj"].shape[1] // 2
                sd[p + "gate_up_proj"][e, (0 if k == "w1" else half):(half if k == "w1" else 2 * half)] = w
        else:
            sd[hf[m]].copy_(w)
    model.load_state_dict(sd)


def test_gptq_engine_equals_gptq_on_transformers_inputs(v4_src, engine_layers):
    """Layer 0 from the float inputs, layer 1 from the inputs of the model whose layer 0 is the engine's GPTQ
    result (layer-sequential): each linear equals GPTQ on Hessians of transformers' hooked inputs (routed
    experts: their routed tokens only)."""
    from dsconvert.quant.rtn import dequantize
    from dsconvert.testing.deepseek_v4 import decoded_state_dict

    _, (r0, r1) = engine_layers
    dec = decoded_state_dict(v4_src)
    model = _hf_model(v4_src)
    for layer, res in ((0, r0), (1, r1)):
        want = _hf_hessian_gptq(model, v4_src, layer, dec)
        assert set(want) == set(res.quantized), set(want) ^ set(res.quantized)
        # a rare level flip from the Hessians' summation order; measured: layer 0 mean 2e-4 / worst 0.4%,
        # layer 1 mean 5e-4 / worst 0.7% (from the float layer 0 instead: mean 30%, worst 52%)
        flips = [float((dequantize(res.quantized[m]) != w).float().mean()) for m, w in want.items()]
        assert sum(flips) / len(flips) < 2e-3 and max(flips) < 0.02, (layer, max(flips))
        assert all(e["policy"] == "routed" for e in res.stats["experts"].values())
        _load_layer(model, v4_src, layer, {m: dequantize(q) for m, q in res.quantized.items()})


# --- quantize --gptq on the CLI --------------------------------------------------------------------------------

GPTQ_ARGS = ("--num-samples", 16, "--seq-len", 128)  # the bundled calibration text


@pytest.fixture(scope="module")
def cli_outs(v4_src, tmp_path_factory):
    from tests.conftest import run_many

    d = tmp_path_factory.mktemp("v4gptq")
    jobs = {"gptq": ("quantize", v4_src, "-o", d / "gptq", "--scheme", "W4A16", "--gptq", *GPTQ_ARGS, "--json", "-q"),
            "rtn": ("quantize", v4_src, "-o", d / "rtn", "--scheme", "W4A16", "--json", "-q")}
    res = run_many(jobs, parallel=2)
    for r in res.values():
        assert r.rc == 0, r
    return {k: d / k for k in jobs} | {"reports": {k: json.loads(res[k].stdout) for k in jobs}}


def _library_weights(out) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as the ``compressed_tensors`` library decompresses it (float32)."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    from tests.convert.test_quantize import read_all

    tensors = read_all(out)
    res = CompressedTensorsDequantizer(str(out), dtype=torch.bfloat16).validate(dict(tensors))
    mods = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_packed")}
    return {m: res[m + ".weight"].float() for m in mods}


def test_gptq_output_loads_with_compressed_tensors(cli_outs):
    """The library decompresses every GPTQ module to levels x group scales (numpy unpacker), the same modules
    as RTN quantizes, with levels that differ from RTN's (error feedback moved them)."""
    import numpy as np

    from tests.convert.test_quantize import read_all, unpack_ct

    out = cli_outs["gptq"]
    lib, raw = _library_weights(out), read_all(out)
    rtn = _library_weights(cli_outs["rtn"])
    assert set(lib) == set(rtn) and any(".ffn.experts." in m for m in lib) and any("wo_a" in m for m in lib)
    moved = 0
    for m, w in lib.items():
        k = int(raw[m + ".weight_shape"][1])
        q = unpack_ct(raw[m + ".weight_packed"], 4, k, dim=1)
        s = np.repeat(raw[m + ".weight_scale"].float().numpy(), 128, axis=1)
        want = torch.from_numpy((q * s).astype(np.float32)).to(torch.bfloat16).float()
        assert torch.equal(w, want), m
        if m.startswith("mtp."):  # the MTP block is not in the forward: RTN, as the RTN run
            assert torch.equal(w, rtn[m]), m
        else:
            moved += not torch.equal(w, rtn[m])
    assert moved == sum(not m.startswith("mtp.") for m in lib) > 100
    rep = cli_outs["reports"]["gptq"]
    cal = rep["calibration"]
    assert cal["method"] == "gptq" and cal["layers_calibrated"] == 4 and cal["mtp_modules_rtn"] > 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"] == json.loads((cli_outs["rtn"] / "config.json").read_text())[
        "quantization_config"]["config_groups"]


def _heldout(src, n: int = 4, T: int = 128) -> list[torch.Tensor]:
    """Windows of the bundled *validation* text (the calibration used the calibration text)."""
    from importlib.resources import files

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(
        files("dsconvert.data").joinpath("validation.txt").read_text()).ids
    assert len(ids) >= n * T
    return [torch.tensor(ids[i * T:(i + 1) * T]) for i in range(n)]


def test_gptq_heldout_linear_error_below_rtn(v4_src, cli_outs):
    """On held-out tokens (float-model inputs, captured as proven above), GPTQ's relative output error
    ``||XWᵀ - XŴᵀ||² / ||XWᵀ||²`` of each linear is below RTN's for nearly every linear and on average."""
    from dsconvert.testing.deepseek_v4 import decoded_state_dict

    dec = decoded_state_dict(v4_src)
    gq, rq = _library_weights(cli_outs["gptq"]), _library_weights(cli_outs["rtn"])
    xs: dict[str, list[torch.Tensor]] = {}
    for ids in _heldout(v4_src):
        for m, x in our_inputs(v4_src, ids).items():
            xs.setdefault(m, []).append(x)
    ratios = {}
    for m in gq:
        if m.startswith("mtp."):
            continue  # not calibrated (RTN in both)
        x = torch.cat(xs[m]).double()

        def apply(w, m=m, x=x):  # wo_a is block diagonal: group j's rows read input columns of group j
            if not m.endswith("attn.wo_a"):
                return x @ w.double().T
            G = x.shape[1] // w.shape[1]
            return torch.einsum("ngk,grk->ngr", x.view(x.shape[0], G, -1), w.double().view(G, -1, w.shape[1]))

        ref = apply(dec[m + ".weight"])
        err = {k: float((ref - apply(w[m])).pow(2).sum() / ref.pow(2).sum()) for k, w in
               (("gptq", gq), ("rtn", rq))}
        ratios[m] = err["gptq"] / err["rtn"]
    better = sum(r < 1 for r in ratios.values()) / len(ratios)
    mean = sum(ratios.values()) / len(ratios)
    print(f"held-out GPTQ/RTN error ratio: mean {mean:.3f}, better on {better:.0%} of {len(ratios)} linears, "
          f"worst {max(ratios, key=ratios.get)} {max(ratios.values()):.3f}")
    assert mean < 0.8 and better >= 0.9, (mean, better)


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_gptq_kld_below_rtn(v4_src, cli_outs):
    """Mean KLD against the release through the V4 reference forward (``validate``, bundled validation text;
    random tiny weights, so the default thresholds do not apply): GPTQ below RTN."""
    from tests.conftest import run_many

    res = run_many({k: ("validate", cli_outs[k], "--reference", v4_src, "--json", "-q") for k in ("gptq", "rtn")},
                   parallel=2)
    kld = {}
    for k, r in res.items():
        assert r.rc in (0, 4), r
        kld[k] = json.loads(r.stdout)["mean_kld"]
    print(f"mean KLD vs release: GPTQ {kld['gptq']:.4f}, RTN {kld['rtn']:.4f}")
    assert 0 < kld["gptq"] < kld["rtn"], kld


@pytest.mark.parametrize("expert_policy", ["all-tokens", "rtn"])
@pytest.mark.slow  # > 2 s: kept out of `make test-fast`, run by `make test-slow`
def test_starved_experts_fallback(v4_src, expert_policy):
    """Experts under ``min_expert_tokens``: ``all-tokens`` calibrates them on every token of the layer (GPTQ on
    the Hessian of the whole MoE input, as transformers' router input), ``rtn`` quantizes them by plain RTN;
    none is zeroed. ``topk`` and other methods are refused on V4."""
    from dsconvert.convert.calibrate_v4 import V4CalibrationEngine
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.errors import UsageError
    from dsconvert.quant.gptq import HessianAccumulator, gptq_quantize
    from dsconvert.quant.rtn import COMPRESSED_TENSORS, QuantSpec, dequantize, quantize
    from dsconvert.testing.deepseek_v4 import decoded_state_dict

    src = CheckpointWeightSource(v4_src)
    eng = V4CalibrationEngine(src, _policy(), "gptq", COMPRESSED_TENSORS, CALIB[:1], min_expert_tokens=10**6,
                              expert_policy=expert_policy)
    res = eng.run_layer(0)
    T = len(CALIB[0])
    assert {e["policy"] for e in res.stats["experts"].values()} == {expert_policy}
    dec = decoded_state_dict(v4_src)
    spec = QuantSpec(4, 128, True)
    m = "layers.0.ffn.experts.3.w1"
    w = dec[m + ".weight"].float()
    if expert_policy == "rtn":
        want = dequantize(quantize(w, spec, COMPRESSED_TENSORS))
    else:
        model = _hf_model(v4_src)
        x = {}
        h = model.model.layers[0].mlp.gate.register_forward_pre_hook(lambda mod, a: x.update(x=a[0][0]))
        with torch.no_grad():
            model(input_ids=torch.tensor(CALIB[0])[None], use_cache=False)
        h.remove()
        acc = HessianAccumulator(w.shape[1])
        acc.add(x["x"].float())
        want = dequantize(gptq_quantize(w, acc.H, spec, COMPRESSED_TENSORS))
        assert res.stats["linears"][m]["tokens"] == T
    got = dequantize(res.quantized[m])
    assert float((got != want).float().mean()) < 0.01
    assert all(float(dequantize(res.quantized[n]).abs().sum()) > 0 for n in res.quantized)
    for kw in ({"expert_policy": "topk"}, {"method": "smoothquant"}):
        args = {"method": "gptq", **kw}
        with pytest.raises(UsageError):
            V4CalibrationEngine(src, _policy(), args.pop("method"), COMPRESSED_TENSORS, CALIB[:1], **args)
    with pytest.raises(UsageError):
        eng.run_layer(2)  # out of order


@pytest.mark.llamacpp
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_imatrix_v4_taken_by_llama_model_quantize(v4_src, tmp_path):
    """llama.cpp's quantizer (``llama_model_quantize`` with ``params.imatrix``) takes our V4 imatrix for our
    ``deepseek4`` GGUF: every 2-D ``blk.*`` matrix it multiplies has an entry of the size it checks, and the
    weights change the Q4_K_M bytes. The per-group ``attn_output_a`` layout (``o_groups * K_g`` values) is refused
    by it, which is why the entry is one ``K_g`` vector."""
    import ctypes

    import gguf
    import numpy as np

    from dsconvert.convert import gguf_export as ge
    from tests.conftest import run_cli

    llama_cpp = _llama_cpp()  # skips without llama-cpp-python; silences its logger
    f, im = tmp_path / "v4.gguf", tmp_path / "im.gguf"
    assert run_cli("gguf", v4_src, "-o", f, "--type", "BF16", "-q").rc == 0
    assert run_cli("imatrix", v4_src, "-o", im, "--num-samples", 4, "--seq-len", 64, "-q").rc == 0
    loaded = ge.load_imatrix(im)
    mats = {t.name for t in gguf.GGUFReader(str(f)).tensors if t.name.startswith("blk.") and len(t.shape) >= 2
            and t.tensor_type != gguf.GGMLQuantizationType.I32 and not t.name.endswith("_ape.weight")}
    assert set(loaded) == mats

    def quantize(entries, out):
        names = list(entries)
        arrs = [np.ascontiguousarray(entries[n].reshape(-1), np.float32) for n in names]
        data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        keep = [n.encode() for n in names]
        for i, (n, a) in enumerate(zip(keep, arrs)):
            data[i].name, data[i].data, data[i].size = n, a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
        data[len(names)].name = None
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.allow_requantize = 15, 2, True  # Q4_K_M; the MXFP4 experts are requantized
        if names:
            p.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        return llama_cpp.llama_model_quantize(str(f).encode(), str(out).encode(), ctypes.byref(p))

    assert quantize(loaded, tmp_path / "w.gguf") == 0
    assert quantize({}, tmp_path / "plain.gguf") == 0
    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(tmp_path / "w.gguf")).tensors}
    b = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(tmp_path / "plain.gguf")).tensors}
    assert a["blk.0.attn_q_a.weight"] != b["blk.0.attn_q_a.weight"]
    assert a["blk.2.attn_output_a.weight"] != b["blk.2.attn_output_a.weight"]
    groups = json.loads((v4_src / "config.json").read_text())["o_groups"]
    per_group = dict(loaded, **{"blk.0.attn_output_a.weight": np.tile(loaded["blk.0.attn_output_a.weight"], groups)})
    assert quantize(per_group, tmp_path / "x.gguf") != 0


@pytest.mark.llamacpp
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_imatrix_v4_equals_llama_cpp_collection(v4_src, tmp_path):
    """Oracle: llama.cpp's own collection (llama-imatrix's eval callback, dsconvert/testing/llama_imatrix.py) on
    our ``deepseek4`` GGUF, widened to F32 by ``llama_model_quantize`` so its graph computes in float32: the same
    tensor names, counts (per expert: the same routing) and sums of squares, to float32 arithmetic. The one
    layout difference: llama-imatrix keeps ``attn_output_a`` per group, ours is the sum over the groups (the
    size llama-quantize checks; see the test above)."""
    import ctypes

    import gguf
    import numpy as np

    from dsconvert.testing.llama_imatrix import llama_imatrix
    from tests.conftest import run_cli

    llama_cpp = _llama_cpp()  # skips without llama-cpp-python; silences its logger
    bf16, f32, im = tmp_path / "v4.gguf", tmp_path / "v4-f32.gguf", tmp_path / "im.gguf"
    assert run_cli("gguf", v4_src, "-o", bf16, "--type", "BF16", "-q").rc == 0
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = 0, 2, True  # LLAMA_FTYPE_ALL_F32 (MXFP4 experts decoded exactly)
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(f32).encode(), ctypes.byref(p)) == 0
    gen = torch.Generator().manual_seed(3)
    wins = [torch.randint(0, 512, (T,), generator=gen).tolist() for T in (40, 150)]
    (tmp_path / "w.json").write_text(json.dumps(wins))
    assert run_cli("imatrix", v4_src, "-o", im, "--calib-data", tmp_path / "w.json", "--num-samples", 2,
                   "--seq-len", 150, "-q").rc == 0
    ref = llama_imatrix(f32, wins)
    t = {x.name: np.asarray(x.data, np.float64) for x in gguf.GGUFReader(str(im)).tensors}
    assert {n[: -len(".in_sum2")] for n in t if n.endswith(".in_sum2")} == set(ref)
    groups = json.loads((v4_src / "config.json").read_text())["o_groups"]
    worst = 0.0
    for n, (v, c) in ref.items():
        if n.endswith("attn_output_a.weight"):
            assert v.shape[0] == groups
            v, c = v.sum(0, keepdims=True), c * groups
        np.testing.assert_array_equal(t[n + ".counts"].reshape(-1), c, err_msg=n)
        rel = float(np.abs(t[n + ".in_sum2"].reshape(v.shape) - v).max() / np.abs(v).max())
        worst = max(worst, rel)
        assert rel < 2e-3, (n, rel)  # measured worst 3.4e-4 (llama.cpp's float32 graph vs ours)
    print(f"imatrix vs llama.cpp's collection: {len(ref)} tensors, worst max-relative difference {worst:.2e}")


@pytest.mark.slow
def test_gptq_resume_after_kill_is_byte_identical(v4_src, tmp_path):
    """A V4 --gptq run killed between shards (layers split over several shards) resumes and writes the bytes of
    an uninterrupted run. (Before the fix in calibrated.resume, a layer split over a finished and an unfinished
    shard counted as done: 'calibration of layer 1 requested after layer 1'.)"""
    import signal
    import time

    from tests.conftest import popen_cli, run_cli

    args = ("--scheme", "W4A16", "--gptq", "--num-samples", 4, "--seq-len", 64, "--max-shard-size", "400KB", "-q")
    clean = tmp_path / "clean"
    assert run_cli("quantize", v4_src, "-o", clean, *args).rc == 0
    n_shards = len(list(clean.glob("model-*.safetensors")))
    out = tmp_path / "killed"
    p = popen_cli("quantize", str(v4_src), "-o", str(out), *map(str, args))
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None and len(list(out.glob("model-*.safetensors"))) < 8:
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list(out.glob("model-*.safetensors"))) < n_shards
    r = run_cli("quantize", v4_src, "-o", out, *args, "--json")
    assert r.rc == 0, r
    rep = json.loads(r.stdout)
    assert rep["resumed"]  # finished shards reused; calibration restarts where the saved state matches, else at 0
    for f in sorted(clean.glob("model-*.safetensors")) + [clean / n for n in ("config.json",
                                                                           "model.safetensors.index.json")]:
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_resume_never_skips_a_layer_split_over_shards(v4_src, tmp_path):
    """Resume: a saved state is used only when every shard of the layers before it is finished; a layer whose
    tensors continue in an unfinished shard is calibrated again (from layer 0 when the state is ahead)."""
    from types import SimpleNamespace as NS

    from safetensors.torch import save_file

    from dsconvert.convert.calibrated import STATE_NAME, CalibratedRun
    from dsconvert.convert.quantize import Options, bind_format, resolve_format, resolve_scheme
    from dsconvert.formats.checkpoint import open_checkpoint

    ck = open_checkpoint(v4_src)
    opts = Options(scheme="W4A16", method="gptq", num_samples=2, seq_len=16)
    _, desc = resolve_scheme(opts)
    run = CalibratedRun(ck, bind_format(ck, resolve_format(opts), desc, opts), desc.spec, opts,
                        torch.device("cpu"))
    hidden = {f"hidden.{i}": h.float().contiguous() for i, h in enumerate(run.engine.hidden_states)}
    shards = [NS(name=f"s{i}", tensors=[NS(name=n) for n in names]) for i, names in enumerate(
        [["embed.weight"], ["layers.0.attn.wq_a.weight_packed"], ["layers.0.ffn.experts.0.w1.weight_packed",
                                                                   "layers.1.attn.wq_a.weight_packed"],
         ["layers.1.ffn.experts.0.w1.weight_packed"], ["layers.2.attn.wq_a.weight_packed"]])]
    for done, state_next, want in (({"s0", "s1", "s2"}, 2, 0),  # layer 1 continues in s3: not done
                                   ({"s0", "s1", "s2"}, 1, 1),  # the state after layer 0: used
                                   ({"s0", "s1", "s2", "s3"}, 2, 2)):
        save_file(hidden, str(tmp_path / STATE_NAME), metadata={"next_layer": str(state_next)})
        run.engine.next_layer = 0
        run.resume(tmp_path, done, shards)
        assert run.engine.next_layer == want, (done, state_next)


@pytest.mark.slow  # > 2 s: kept out of `make test-fast`, run by `make test-slow`
def test_gptq_flash_base_fp8_experts(v4_base_src):
    """V4-Flash-Base (FP8 experts, F32 power-of-two scales): the experts are dequantized exactly first; layer 0
    equals GPTQ on transformers' inputs with the exactly decoded weights."""
    from dsconvert.convert.calibrate_v4 import V4CalibrationEngine
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.quant.rtn import COMPRESSED_TENSORS, dequantize
    from dsconvert.testing.deepseek_v4 import decoded_state_dict

    eng = V4CalibrationEngine(CheckpointWeightSource(v4_base_src), _policy(), "gptq", COMPRESSED_TENSORS, CALIB)
    res = eng.run_layer(0)
    want = _hf_hessian_gptq(_hf_model(v4_base_src), v4_base_src, 0, decoded_state_dict(v4_base_src))
    assert set(want) == set(res.quantized) and any(".ffn.experts." in m for m in want)
    flips = [float((dequantize(res.quantized[m]) != w).float().mean()) for m, w in want.items()]
    assert sum(flips) / len(flips) < 2e-3 and max(flips) < 0.02, max(flips)


# --- AWQ -------------------------------------------------------------------------------------------------------


class _Over:
    """A weight source serving ``over`` instead of ``inner``'s tensors."""

    def __init__(self, inner, over):
        self.inner, self.over, self.config = inner, over, inner.config

    def has(self, n):
        return n in self.over or self.inner.has(n)

    def get(self, n):
        return self.over[n] if n in self.over else self.inner.get(n)


def test_awq_folds_keep_the_float_layer_and_beat_rtn(v4_src):
    """AWQ on layers 0 (sliding, hash MoE) and 1 (CSA, indexer): the float model with the folded weights and the
    replaced norms / kept linears computes the same layer output as the release (folds exact in float32);
    the folds reach every reader of a folded norm (compressors, indexer, router); the quantized linears' output
    error on the calibration rows is below RTN's on average."""
    from dsconvert.convert.calibrate_v4 import V4CalibrationEngine
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model.v4 import V4ReferenceModel
    from dsconvert.quant.rtn import COMPRESSED_TENSORS

    src = CheckpointWeightSource(v4_src)
    eng = V4CalibrationEngine(src, _policy(), "awq", COMPRESSED_TENSORS, CALIB, keep_folded=True)
    ids, pos = [torch.tensor(c) for c in CALIB], [torch.arange(len(c)) for c in CALIB]
    for layer in (0, 1):
        h = [x.clone() for x in eng.hidden_states]
        res = eng.run_layer(layer)
        p = f"layers.{layer}."
        want = {p + n + ".weight" for n in ("attn_norm", "attn.q_norm", "ffn_norm", "ffn.gate")}
        if layer == 1:
            want |= {p + "attn." + n + ".weight" for n in ("compressor.wkv", "compressor.wgate",
                                                           "indexer.weights_proj", "indexer.compressor.wkv",
                                                           "indexer.compressor.wgate")}
        assert set(res.replaced) == want
        assert set(res.folded) == {m + ".weight" for m in res.quantized}
        ref = V4ReferenceModel(src).layer_forward_many(layer, h, pos, token_ids=ids)
        got = V4ReferenceModel(_Over(src, {**res.replaced, **res.folded})).layer_forward_many(layer, h, pos,
                                                                                              token_ids=ids)
        for r, g in zip(ref, got):
            assert float((r - g).abs().max() / r.abs().max()) < 1e-5  # measured 5e-7
        st = res.stats["linears"]
        awq = sum(v["rel_output_mse"] for v in st.values()) / len(st)
        rtn = sum(v["rtn_rel_output_mse"] for v in st.values()) / len(st)
        assert awq < 0.9 * rtn, (layer, awq, rtn)  # measured layer 0: 0.0080 vs 0.0119
        assert set(res.stats["smoothing"]) == {p + "attn_norm", p + "attn.q_norm", p + "attn.wo_a", p + "ffn_norm"}


@pytest.mark.slow
def test_awq_cli_output_loads_and_kld_below_rtn(v4_src, cli_outs, tmp_path):
    """``quantize --awq`` W4A16 on the V4 release: the compressed_tensors library decompresses every module;
    the folded norms are written; Mean KLD against the release below RTN's (measured 0.0622 vs 0.0798; at W8A16
    AWQ is 0.00265 vs RTN 0.00225: the folded BF16 norms' rounding is as large as the 8-bit error)."""
    from tests.conftest import read_tensors, run_cli, run_many

    out = tmp_path / "awq"
    r = run_cli("quantize", v4_src, "-o", out, "--scheme", "W4A16", "--awq", *GPTQ_ARGS, "--json", "-q")
    assert r.rc == 0, r
    assert r.json()["calibration"]["method"] == "awq"
    assert set(_library_weights(out)) == set(_library_weights(cli_outs["rtn"]))
    a, b = read_tensors(out), read_tensors(cli_outs["rtn"])
    assert a["layers.2.ffn_norm.weight"][2] != b["layers.2.ffn_norm.weight"][2]
    assert a["layers.2.ffn.gate.weight"][2] != b["layers.2.ffn.gate.weight"][2]
    res = run_many({k: ("validate", d, "--reference", v4_src, "--json", "-q") for k, d in
                    (("awq", out), ("rtn", cli_outs["rtn"]))}, parallel=2)
    kld = [json.loads(res[k].stdout)["mean_kld"] for k in ("awq", "rtn")]
    print(f"mean KLD vs release: AWQ {kld[0]:.4f}, RTN {kld[1]:.4f}")
    assert 0 < kld[0] < kld[1], kld


def _in_memory_smooth(self, prev, kind, x, members, extra):
    """The pre-streaming ``V4AwqStage.smooth``: every member's float32 weight at once, handed to the quant layer's
    whole-module search (:func:`dsconvert.quant.awq.awq_search_scale`); the fold is the engine's."""
    from dsconvert.convert.calib_v4_capture import is_routed_expert
    from dsconvert.quant.awq import awq_search_scale

    eng, cap = self.eng, self.cap
    quant = [(m, xm) for m, xm in members if cap.spec(m, cap.weight_shape(m)) is not None]
    if not quant or x.shape[0] == 0:
        return
    spec = cap.spec(quant[0][0], cap.weight_shape(quant[0][0]))
    ws = [self.w(m) if not is_routed_expert(m) else cap.weight(m) for m, _ in quant]
    s, ratio, errors = awq_search_scale(x, ws, lambda cand: torch.cat(
        [(xm @ c.T).flatten() for (_, xm), c in zip(quant, cand)]), spec, eng.convention, n_grid=eng.n_grid)
    self.fold(prev, kind, members, extra, s, ratio, errors)


@pytest.mark.slow  # > 2 s: kept out of `make test-fast`, run by `make test-slow`
def test_awq_streamed_smoothing_equals_in_memory_search(v4_src, monkeypatch):
    """The streamed smoothing search (one expert weight at a time) writes the same bytes as the search over every
    weight held at once (``awq_search_scale``): layers 0 and 1, every quantized linear and folded tensor, and the
    same grid losses up to float32 summation order. (Whole tiny model before/after the change: sha256 3bae7410…
    both.)"""
    from dsconvert.convert import calibrate_v4 as c4
    from dsconvert.convert.calib_v4_awq import V4AwqStage
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.quant.rtn import COMPRESSED_TENSORS

    def run():
        eng = c4.V4CalibrationEngine(CheckpointWeightSource(v4_src), _policy(), "awq", COMPRESSED_TENSORS, CALIB,
                                     expert_group=3)
        return [eng.run_layer(i) for i in (0, 1)]

    new = run()
    monkeypatch.setattr(V4AwqStage, "smooth", _in_memory_smooth)
    old = run()
    for a, b in zip(new, old):
        assert set(a.quantized) == set(b.quantized) and set(a.replaced) == set(b.replaced)
        assert len(a.stats["smoothing"]) == 4
        for m in a.quantized:
            qa, qb = a.quantized[m], b.quantized[m]
            assert torch.equal(qa.q, qb.q) and torch.equal(qa.scale, qb.scale), m
        for k in a.replaced:
            assert torch.equal(a.replaced[k], b.replaced[k]), k
        for prev, st in a.stats["smoothing"].items():
            ref = b.stats["smoothing"][prev]
            assert st["best_ratio"] == ref["best_ratio"]
            assert st["mse_grid"] == pytest.approx(ref["mse_grid"], rel=1e-5)


class _Stop(Exception):
    pass


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


@pytest.mark.slow
def test_awq_moe_smoothing_memory_flat_in_experts_at_real_dimensions(tmp_path, monkeypatch):
    """The ``ffn_norm`` search on one V4-Flash-dimension layer (experts 2048 x 4096): the resident high-water
    mark it adds (``VmHWM`` reset through ``/proc/self/clear_refs`` before it) is the same for 8 and 32 experts
    within 64 MiB and below 8 float32 expert weights (measured 232 / 237 MiB); holding every expert's ``w1``/``w3``
    in float32, as before, adds 32 MiB per linear (2.1 GiB at 32 experts). ~25 s CPU (4 min wall under load)."""
    from dsconvert.convert import calibrate_v4 as c4
    from dsconvert.convert.calib_v4_awq import V4AwqStage
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.quant.rtn import COMPRESSED_TENSORS
    from dsconvert.testing.realsize_v4 import RealV4Options, write_real_v4_checkpoint

    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset VmHWM")
    orig, grown = V4AwqStage.smooth, {}

    def measured(self, prev, kind, x, members, extra):
        if not prev.endswith("ffn_norm"):
            return orig(self, prev, kind, x, members, extra)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _hwm()
        orig(self, prev, kind, x, members, extra)
        grown[self.eng.cfg.geo.experts] = (_hwm() - base, len(members))
        raise _Stop

    monkeypatch.setattr(V4AwqStage, "smooth", measured)
    ids = [[(7 * i + 3) % 300 for i in range(48)]]
    for e in (8, 32):
        src = write_real_v4_checkpoint(tmp_path / f"e{e}", RealV4Options(layers=1, hash_layers=0, experts=e,
                                                                          vocab=300))
        eng = c4.V4CalibrationEngine(CheckpointWeightSource(src), _policy(), "awq", COMPRESSED_TENSORS, ids,
                                     n_grid=2, expert_group=1)
        with pytest.raises(_Stop):
            eng.run_layer(0)
    g = eng.cfg.geo
    assert grown[32][1] == 2 * 32 + 2 and grown[8][1] == 2 * 8 + 2
    weight = 4 * g.inter * g.hidden  # one float32 expert linear, 32 MiB
    assert abs(grown[32][0] - grown[8][0]) < 64 * 2**20, grown  # measured 232 vs 237 MiB
    assert grown[32][0] < 8 * weight, grown  # the weight and its candidate's temporaries; all at once: 66 weights
