"""``dsconvert logits`` / ``dsconvert validate`` / ``fp8-to-bf16 --validate`` end to end, on the tiny fixture.

What is independent of the code under test here:

* candidates are written with ``safetensors`` directly (one tensor scaled, two experts swapped, a NaN);
* logits are checked against transformers' ``DeepseekV3ForCausalLM`` loaded from the BF16 conversion, and the
  metrics (KLD, top-1, RMS Δp, PPL) are recomputed in numpy from transformers' logits of both checkpoints;
* ``--text`` / ``--prompts`` token ids are recomputed with ``tokenizers.Tokenizer.from_file``.

Most commands run in-process through Typer's ``CliRunner`` (no torch import per call); the exit statuses 0 and 4
are also checked on real subprocesses.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dsconvert.cli import app
from dsconvert.convert import validate as val
from dsconvert.convert.weights import CheckpointWeightSource
from dsconvert.testing.fixtures import build_checkpoint
from dsconvert.testing.release_files import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parents[2]
N_LAYERS = 3  # tiny preset: layer 0 dense, layers 1-2 MoE (8 experts, 2 per token), layer 3 = MTP
VOCAB = 512
IDS = [0, 17, 5, 300, 42, 7, 99, 511, 250, 3, 64, 128, 77, 400, 12, 1]
METRIC_KEYS = ("mean_kld", "max_kld", "p999_kld", "same_top_p", "rms_dp", "ppl_reference", "ppl_candidate",
               "layers", "passed")


# -- helpers ---------------------------------------------------------------------------------------------------


def _strict_json(text: str) -> dict:
    """Parse as RFC 8259 JSON: bare NaN / Infinity tokens are an error."""
    def refuse(tok):
        raise ValueError(f"non-JSON constant {tok} in --json output")
    return json.loads(text, parse_constant=refuse)


def cli(*args: str) -> tuple[int, dict | str]:
    """Run the CLI in-process; returns (exit code, parsed JSON if --json was given else stdout)."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, (_strict_json(r.stdout) if "--json" in args else r.stdout)


def subprocess_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsconvert.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def ids_arg(ids) -> str:
    return ",".join(map(str, ids))


def read_tensor(ckpt: Path, name: str) -> torch.Tensor:
    wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(ckpt / wm[name]), "pt") as f:
        return f.get_tensor(name)


def edited_copy(src: Path, dst: Path, edits: dict) -> Path:
    """Copy checkpoint ``src`` to ``dst`` and rewrite the tensors in ``edits`` (name -> new tensor, or a function of
    the old one) with safetensors, shard by shard, keeping each shard's metadata. The index is unchanged and its
    ``total_size`` is re-checked against the rewritten shards (edits keep shape and dtype)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    for shard in sorted({wm[n] for n in edits}):
        path = str(dst / shard)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        for name, edit in edits.items():
            if wm[name] != shard:
                continue
            old = tensors[name]
            new = edit(old) if callable(edit) else edit
            assert new.shape == old.shape and new.dtype == old.dtype, name
            assert not torch.equal(new, old), f"edit of {name} changed nothing"
            tensors[name] = new.contiguous()
        save_file(tensors, path, metadata=meta)
    total = sum(t.numel() * t.element_size() for s in set(wm.values()) for t in load_file(str(dst / s)).values())
    assert total == index["metadata"]["total_size"]
    return dst


def scaled(name: str, factor: float = 1.5) -> dict:
    return {name: lambda t: (t.float() * factor).to(t.dtype)}


def hf_model(ckpt: Path):
    """transformers' DeepseekV3ForCausalLM in float32 from a BF16 checkpoint (never the remote code)."""
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((ckpt / "config.json").read_text())
    cls = transformers.DeepseekV2ForCausalLM if cfg["model_type"] == "deepseek_v2" else \
        transformers.DeepseekV3ForCausalLM
    model, info = cls.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    assert all(k.startswith(mtp) for k in info["unexpected_keys"]), info["unexpected_keys"]  # only the MTP layer
    return model.eval()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0].double().numpy()


def np_metrics(ref: list[np.ndarray], cand: list[np.ndarray], seqs: list[list[int]]) -> dict:
    """llama-perplexity's metrics in numpy over positions 0..T-2 of every sequence (position i predicts i+1)."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr = np.concatenate([log_softmax(r[:-1]) for r in ref])
    lc = np.concatenate([log_softmax(c[:-1]) for c in cand])
    nxt = np.concatenate([s[1:] for s in seqs])
    kld = (np.exp(lr) * (lr - lc)).sum(-1)
    rows = np.arange(len(nxt))
    dp = np.exp(lc[rows, nxt]) - np.exp(lr[rows, nxt])
    return {"mean_kld": kld.mean(), "max_kld": kld.max(), "p999_kld": np.percentile(kld, 99.9),
            "same_top_p": (lr.argmax(-1) == lc.argmax(-1)).mean(), "rms_dp": np.sqrt((dp ** 2).mean()),
            "ppl_reference": np.exp(-lr[rows, nxt].mean()), "ppl_candidate": np.exp(-lc[rows, nxt].mean())}


def tokenize_independently(ckpt: Path, text: str) -> list[int]:
    """tokenizer.json through the tokenizers library, BOS first (the fixture's tokenizer_config has add_bos_token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["add_bos_token"] is True
    return [tok.token_to_id(SPECIAL_TOKENS[0])] + tok.encode(text, add_special_tokens=False).ids


def assert_localized(rep: dict, layer: int) -> None:
    rel = [r["rel_error"] for r in rep["layers"]]
    assert [r["layer"] for r in rep["layers"]] == list(range(N_LAYERS))
    assert rel[:layer] == [0.0] * layer, rel  # bit-identical before the fault
    assert rel[layer] > 0, rel
    assert rep["first_diverging_layer"] == layer
    assert rep["largest_error_jump_layer"] == layer


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """The tiny FP8 fixture, its BF16 conversion by ``fp8-to-bf16 --validate --json`` (a real process), and the
    conversion's JSON report."""
    root = tmp_path_factory.mktemp("validate")
    fp8 = build_checkpoint(root / "fp8", "tiny")
    bf16 = root / "bf16"
    r = subprocess_cli("fp8-to-bf16", fp8, "-o", bf16, "--validate", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    return {"root": root, "fp8": fp8, "bf16": bf16, "f2b": _strict_json(r.stdout)}


@pytest.fixture(scope="module")
def hf_ref(ck):
    return hf_model(ck["bf16"])


@pytest.fixture(scope="module")
def down0(ck):
    """Candidate: the BF16 conversion with layer 0's (dense) mlp.down_proj.weight x 1.5."""
    return edited_copy(ck["bf16"], ck["root"] / "cand-down0", scaled("model.layers.0.mlp.down_proj.weight"))


# -- fp8-to-bf16 --validate --------------------------------------------------------------------------------------


def test_fp8_to_bf16_validate_block(ck):
    """The FP8 source vs its own BF16 conversion: a `validation` block, Mean KLD <= 1e-6 (exactly 0), exit 0."""
    v = ck["f2b"]["validation"]
    for k in METRIC_KEYS:
        assert k in v, k
    assert v["passed"] is True
    assert v["mean_kld"] <= 1e-6 and v["max_kld"] <= 1e-6 and v["p999_kld"] <= 1e-6
    assert v["same_top_p"] == 1.0 and v["rms_dp"] == 0.0
    assert v["ppl_reference"] == v["ppl_candidate"] and v["ln_ppl_ratio"] == 0.0
    # defaults: up to 16 x 128 tokens of the bundled text (all of it for this tokenizer)
    from dsconvert.convert.validate import BUNDLED_TEXT

    n = min(len(tokenize_independently(ck["fp8"], BUNDLED_TEXT.read_text(encoding="utf-8"))), 16 * 128)
    assert v["tokens"] == n and v["sequences"] == -(-n // 128)
    assert [r["rel_error"] for r in v["layers"]] == [0.0] * N_LAYERS
    assert v["first_diverging_layer"] is None and v["largest_error_jump_layer"] is None
    assert v["candidate"] == str(ck["bf16"]) and v["reference"] == str(ck["fp8"])


def test_fp8_to_bf16_validate_human(ck, tmp_path):
    """Human mode prints the verdict line with llama-perplexity's metric names."""
    code, text = cli("fp8-to-bf16", ck["fp8"], "-o", tmp_path / "out", "--validate", "-q")
    assert code == 0
    assert "validate: PASSED" in text and "Mean KLD 0" in text


# -- logits ----------------------------------------------------------------------------------------------------


def test_logits_npy_matches_transformers(ck, hf_ref, tmp_path):
    """`logits -o x.npy`: float32 [tokens, vocab], equal to transformers' logits of the BF16 conversion (fp32)
    within 1e-4 relative; the FP8 source gives bit-identical logits (dequantized on the fly by the same rule)."""
    out_bf16, out_fp8 = tmp_path / "bf16.npy", tmp_path / "sub" / "fp8.npy"
    code, rep = cli("logits", ck["bf16"], "--token-ids", ids_arg(IDS), "-o", out_bf16, "--json")
    assert code == 0
    assert rep["shape"] == [len(IDS), VOCAB] and rep["token_ids"] == IDS and rep["output"] == str(out_bf16)
    a = np.load(out_bf16)
    assert a.shape == (len(IDS), VOCAB) and a.dtype == np.float32
    assert rep["top1"] == a.argmax(-1).tolist()

    hf = hf_logits(hf_ref, IDS)
    assert np.abs(a - hf).max() <= 1e-4 * np.abs(hf).max()
    np.testing.assert_allclose(a, hf, rtol=1e-4, atol=1e-4 * np.abs(hf).max())
    assert (a.argmax(-1) == hf.argmax(-1)).all()
    assert hf.std() > 0.5  # not trivially flat: the comparison has something to catch

    code, _ = cli("logits", ck["fp8"], "--token-ids", ids_arg(IDS), "-o", out_fp8, "--json")
    assert code == 0
    assert np.array_equal(np.load(out_fp8), a)


def test_logits_bfloat16_compute(ck, tmp_path):
    """--dtype bfloat16 still writes float32 [tokens, vocab]; close to, but not identical with, float32 compute."""
    cli("logits", ck["bf16"], "--token-ids", ids_arg(IDS), "-o", tmp_path / "f32.npy")
    code, rep = cli("logits", ck["bf16"], "--token-ids", ids_arg(IDS), "--dtype", "bfloat16", "-o",
                    tmp_path / "b16.npy", "--json")
    assert code == 0 and rep["dtype"] == "bfloat16"
    f32, b16 = np.load(tmp_path / "f32.npy"), np.load(tmp_path / "b16.npy")
    assert b16.dtype == np.float32 and b16.shape == f32.shape
    rel = np.linalg.norm(b16 - f32) / np.linalg.norm(f32)
    assert 0 < rel < 0.05, rel


def test_logits_text_uses_checkpoint_tokenizer(ck, tmp_path):
    """--text is tokenized with the checkpoint's tokenizer.json (+ BOS), and gives the same logits as those ids."""
    text = "The quick brown fox validates a DeepSeek checkpoint."
    want = tokenize_independently(ck["fp8"], text)
    assert len(want) > 3
    code, rep = cli("logits", ck["fp8"], "--text", text, "-o", tmp_path / "t.npy", "--json")
    assert code == 0
    assert rep["token_ids"] == want and rep["shape"] == [len(want), VOCAB]
    cli("logits", ck["fp8"], "--token-ids", ids_arg(want), "-o", tmp_path / "i.npy")
    assert np.array_equal(np.load(tmp_path / "t.npy"), np.load(tmp_path / "i.npy"))


@pytest.mark.parametrize("args,code", [
    (["--token-ids", "1,2,512"], 2),  # outside 0..vocab-1
    (["--token-ids", "1,-1"], 2),
    (["--token-ids", "1,x"], 2),  # malformed: a usage error, not an internal error
    (["--token-ids", "1,2", "--text", "hi"], 2),  # exactly one of the two
    ([], 2),
    (["--token-ids", "1,2", "--dtype", "float16"], 2),
])
def test_logits_usage_errors(ck, args, code):
    got, rep = cli("logits", ck["bf16"], *args, "--json")
    assert got == code and rep["exit_code"] == code and rep["error"] == "UsageError", rep


def test_logits_missing_checkpoint_is_bad_input(ck):
    got, rep = cli("logits", ck["root"] / "nope", "--token-ids", "1,2", "--json")
    assert got == 3 and rep["exit_code"] == 3


# -- validate: a correct conversion ------------------------------------------------------------------------------


def test_validate_conversion_json_keys_and_values(ck, hf_ref):
    code, rep = cli("validate", ck["bf16"], "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    assert code == 0
    for k in METRIC_KEYS + ("ln_ppl_ratio", "largest_error_jump_layer", "first_diverging_layer", "nonfinite",
                            "thresholds", "peak_rss"):
        assert k in rep, k
    assert rep["passed"] is True and rep["mean_kld"] <= 1e-6 and rep["same_top_p"] == 1.0
    assert rep["tokens"] == len(IDS) and rep["n_positions"] == len(IDS) - 1
    assert rep["thresholds"] == {"max_kld": 0.01, "min_top1": 0.97}
    assert isinstance(rep["peak_rss"], int) and rep["peak_rss"] > 0
    assert rep["nonfinite"]["candidate"]["ok"] and rep["nonfinite"]["reference"]["ok"]
    # PPL of the reference, recomputed from transformers' logits of the same weights
    hf = hf_logits(hf_ref, IDS)
    m = np_metrics([hf], [hf], [IDS])
    assert rep["ppl_reference"] == pytest.approx(m["ppl_reference"], rel=1e-4)


def test_validate_reference_against_itself_bf16_compute(ck):
    code, rep = cli("validate", ck["fp8"], "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--dtype",
                    "bfloat16", "--json")
    assert code == 0 and rep["mean_kld"] == 0.0 and rep["options"]["dtype"] == "bfloat16"


# -- validate: faulty candidates -------------------------------------------------------------------------------


def test_scaled_dense_tensor_fails_and_names_layer(ck, down0, tmp_path):
    """Layer 0's dense mlp.down_proj x 1.5: exit 4 from a real process, the human output and the JSON report
    name layer 0."""
    report = tmp_path / "r.json"
    r = subprocess_cli("validate", down0, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--report", report,
                       "-q")
    assert r.returncode == 4, r.stderr[-2000:]
    assert "validate: FAILED" in r.stdout
    assert "first diverging layer 0" in r.stdout and "largest jump at layer 0" in r.stdout
    for name in ("Mean KLD", "Maximum KLD", "99.9% KLD", "Same top p", "RMS Δp", "PPL", "ln(PPL ratio)"):
        assert name in r.stdout, name
    rep = _strict_json(report.read_text())
    assert rep["passed"] is False and rep["mean_kld"] > 0.01
    assert_localized(rep, 0)


def test_scaled_tensor_metrics_match_numpy_on_transformers_logits(ck, down0, hf_ref):
    """Every metric of the failing candidate, recomputed in numpy from transformers' logits of the reference
    (BF16 conversion) and of the candidate; over two sequences cut from a --prompts file, so the pooling of
    positions across sequences is checked too."""
    prompts = ck["root"] / "prompts.txt"
    prompts.write_text("Mixture-of-experts layers route each token to a few experts. " * 8, encoding="utf-8")
    seq_len = 24
    ids = tokenize_independently(ck["fp8"], prompts.read_text(encoding="utf-8"))
    seqs = [ids[:seq_len], ids[seq_len: 2 * seq_len]]
    assert len(seqs[1]) == seq_len
    code, rep = cli("validate", down0, "--reference", ck["fp8"], "--prompts", prompts, "--seq-len", seq_len,
                    "--num-samples", 2, "--json")
    assert code == 4
    assert rep["sequences"] == 2 and rep["tokens"] == 2 * seq_len and rep["n_positions"] == 2 * (seq_len - 1)
    hf_cand = hf_model(down0)
    want = np_metrics([hf_logits(hf_ref, s) for s in seqs], [hf_logits(hf_cand, s) for s in seqs], seqs)
    for k, v in want.items():
        assert rep[k] == pytest.approx(v, rel=2e-3, abs=1e-7), (k, rep[k], v)
    assert rep["ln_ppl_ratio"] == pytest.approx(np.log(want["ppl_candidate"] / want["ppl_reference"]), abs=1e-5)
    assert want["mean_kld"] > 0.01  # the fault is visible in the independent logits too


@pytest.mark.parametrize("name,layer", [
    ("model.layers.1.self_attn.kv_b_proj.weight", 1),
    ("model.layers.2.self_attn.o_proj.weight", 2),
])
def test_scaled_attention_tensor_of_later_layer(ck, name, layer):
    cand = edited_copy(ck["bf16"], ck["root"] / f"cand-{layer}", scaled(name))
    code, rep = cli("validate", cand, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    assert code == 4 and rep["passed"] is False
    assert_localized(rep, layer)


def test_damped_fault_first_diverging_layer(ck):
    """Layer 0's q_a_proj x 1.5 is mostly undone by q_a_layernorm: layer 0's error is tiny and the routing change
    in MoE layer 1 makes a larger jump. The first diverging layer is still 0."""
    cand = edited_copy(ck["bf16"], ck["root"] / "cand-qa0", scaled("model.layers.0.self_attn.q_a_proj.weight"))
    code, rep = cli("validate", cand, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    assert rep["mean_kld"] > 0
    assert rep["layers"][0]["rel_error"] > 0
    assert rep["first_diverging_layer"] == 0


def test_swapped_experts_caught(ck):
    """Experts 0 and 1 of MoE layer 1 swapped (all three weights): the router sends tokens to the wrong weights.
    Exit 4 with the default thresholds, layer 1 named, layer 0 identical."""
    p = "model.layers.1.mlp.experts.{}.{}.weight"
    edits = {}
    for w in ("gate_proj", "up_proj", "down_proj"):
        a, b = read_tensor(ck["bf16"], p.format(0, w)), read_tensor(ck["bf16"], p.format(1, w))
        edits[p.format(0, w)], edits[p.format(1, w)] = b, a
    cand = edited_copy(ck["bf16"], ck["root"] / "cand-swap", edits)
    code, rep = cli("validate", cand, "--reference", ck["fp8"], "--json")
    assert rep["mean_kld"] > 0
    assert_localized(rep, 1)
    assert code == 4 and rep["passed"] is False


def test_thresholds_flags(ck, down0):
    """--max-kld / --min-top1: loose enough turns the failing candidate into a pass; either one alone still fails
    it; strict enough fails the exact conversion."""
    base = ("validate", down0, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    code, rep = cli(*base)
    assert code == 4
    kld, top = rep["mean_kld"], rep["same_top_p"]
    assert top < 0.97
    code, rep = cli(*base, "--max-kld", kld * 2, "--min-top1", top / 2)
    assert code == 0 and rep["passed"] is True
    assert rep["thresholds"] == {"max_kld": kld * 2, "min_top1": top / 2}
    assert cli(*base, "--max-kld", kld * 2)[0] == 4
    assert cli(*base, "--min-top1", top / 2)[0] == 4
    assert cli(*base, "--max-kld", kld / 2, "--min-top1", top / 2)[0] == 4
    # a bound no conversion can meet is a usage error now (issue: range-checked thresholds), not a failed run;
    # the exact bounds of a perfect conversion still pass
    code, rep = cli("validate", ck["bf16"], "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--min-top1",
                    "1.01", "--json")
    assert code == 2 and "--min-top1" in rep["message"]
    code, rep = cli("validate", ck["bf16"], "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--min-top1",
                    "1", "--max-kld", "0", "--json")
    assert code == 0 and rep["passed"] is True and rep["mean_kld"] == 0.0


def test_nan_in_final_norm_flagged(ck):
    """NaN in model.norm.weight: every logit NaN, exit 4, a nonfinite entry and advice; the --json output stays
    strict JSON (non-finite metrics are null); hidden states (before the final norm) are untouched."""
    def poison(t):
        t = t.clone()
        t[3] = float("nan")
        return t

    cand = edited_copy(ck["bf16"], ck["root"] / "cand-nan-norm", {"model.norm.weight": poison})
    code, rep = cli("validate", cand, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    assert code == 4 and rep["passed"] is False
    bad = rep["nonfinite"]["candidate"]
    assert bad["ok"] is False and bad["n_nan"] == len(IDS) * VOCAB and bad["bad_positions"] == list(range(len(IDS)))
    assert rep["nonfinite"]["reference"]["ok"] is True
    assert "bfloat16" in rep["advice"]
    assert rep["mean_kld"] is None  # NaN, written as null
    assert [r["rel_error"] for r in rep["layers"]] == [0.0] * N_LAYERS
    code, text = cli("validate", cand, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS))
    assert code == 4 and "advice:" in text


def test_nan_in_layer_localized(ck):
    """One NaN weight in layer 1's o_proj: NaN hidden states from layer 1 on; the report names layer 1."""
    def poison(t):
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    cand = edited_copy(ck["bf16"], ck["root"] / "cand-nan-l1", {"model.layers.1.self_attn.o_proj.weight": poison})
    code, rep = cli("validate", cand, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    assert code == 4 and rep["nonfinite"]["candidate"]["ok"] is False
    assert rep["layers"][0]["rel_error"] == 0.0 and rep["layers"][1]["rel_error"] is None  # NaN -> null
    assert rep["first_diverging_layer"] == 1 and rep["largest_error_jump_layer"] == 1
    code, text = cli("validate", cand, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS))
    assert code == 4 and "max nan at layer 1" in text and "largest jump at layer 1" in text


# -- validate: bad input -----------------------------------------------------------------------------------------


def test_candidate_with_other_vocab_is_bad_input(ck):
    other = build_checkpoint(ck["root"] / "vocab640", "tiny", vocab_size=640, fp8=False, extra_files=False)
    code, rep = cli("validate", other, "--reference", ck["fp8"], "--token-ids", "1,2,3", "--json")
    assert code == 3 and rep["exit_code"] == 3 and "vocab_size" in rep["message"]


@pytest.mark.parametrize("which", ["candidate", "reference"])
def test_missing_checkpoint_dir_is_bad_input(ck, which):
    missing = ck["root"] / "does-not-exist"
    cand, ref = (missing, ck["fp8"]) if which == "candidate" else (ck["bf16"], missing)
    code, rep = cli("validate", cand, "--reference", ref, "--token-ids", "1,2,3", "--json")
    assert code == 3 and rep["exit_code"] == 3 and "does-not-exist" in rep["message"]


@pytest.mark.parametrize("args", [["--token-ids", "1,2,512"], ["--token-ids", "5"], ["--token-ids", "1,y"],
                                  ["--dtype", "float16", "--token-ids", "1,2"], ["--prompts", "/nonexistent.txt"]])
def test_validate_usage_errors(ck, args):
    code, rep = cli("validate", ck["bf16"], "--reference", ck["fp8"], *args, "--json")
    assert code == 2 and rep["error"] == "UsageError", rep


# -- V2-style checkpoint -----------------------------------------------------------------------------------------


V2_OVERRIDES = dict(
    model_type="deepseek_v2", q_lora_rank=None, n_group=1, topk_group=1, router_bias=False,
    extra_config={"architectures": ["DeepseekV2ForCausalLM"], "scoring_func": "softmax", "topk_method": "greedy",
                  "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                  "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
)


def test_v2_style_checkpoint_converts_and_validates(ck):
    """V2-Lite-shaped: plain q_proj (no q_lora), softmax routing, greedy top-k, one group, no router bias.
    Converts, validates with KLD 0 against its FP8 source, and its logits match transformers' DeepseekV2."""
    fp8 = build_checkpoint(ck["root"] / "v2-fp8", "tiny", **V2_OVERRIDES)
    names = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("q_a_proj" in n or "e_score_correction_bias" in n for n in names)
    bf16 = ck["root"] / "v2-bf16"
    code, rep = cli("fp8-to-bf16", fp8, "-o", bf16, "--validate", "--json")
    assert code == 0, rep
    v = rep["validation"]
    assert v["passed"] is True and v["mean_kld"] == 0.0 and v["max_kld"] == 0.0
    assert [r["rel_error"] for r in v["layers"]] == [0.0] * N_LAYERS

    code, rep = cli("logits", bf16, "--token-ids", ids_arg(IDS), "-o", ck["root"] / "v2.npy", "--json")
    assert code == 0
    ours = np.load(ck["root"] / "v2.npy")
    hf = hf_logits(hf_model(bf16), IDS)
    np.testing.assert_allclose(ours, hf, rtol=1e-4, atol=1e-4 * np.abs(hf).max())

    # the V2 router is really exercised: swapping two experts of layer 1 is caught there
    p = "model.layers.1.mlp.experts.{}.{}.weight"
    edits = {}
    for w in ("gate_proj", "up_proj", "down_proj"):
        edits[p.format(2, w)], edits[p.format(5, w)] = read_tensor(bf16, p.format(5, w)), read_tensor(bf16, p.format(2, w))
    cand = edited_copy(bf16, ck["root"] / "v2-swap", edits)
    code, rep = cli("validate", cand, "--reference", fp8, "--token-ids", ids_arg(IDS), "--json")
    assert rep["mean_kld"] > 0 and rep["first_diverging_layer"] == 1


# -- memory: one layer at a time ------------------------------------------------------------------------------


class LiveTracker:
    """A weight source wrapper that records every read and, at each read, which *other* decoder layers still have
    a tensor alive (weak references: nothing is kept alive by the tracker)."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.reads: Counter = Counter()
        self._alive: list[tuple[int, weakref.ref]] = []
        self.overlaps: list[tuple[str, set]] = []

    def has(self, name):
        return self.inner.has(name)

    def get(self, name):
        m = re.match(r"model\.layers\.(\d+)\.", name)
        layer = int(m.group(1)) if m else -1
        others = {lay for lay, ref in self._alive if ref() is not None and lay != layer}
        if others:
            self.overlaps.append((name, others))
        self.reads[name] += 1
        t = self.inner.get(name)
        self._alive.append((layer, weakref.ref(t)))
        return t


def test_forward_many_holds_one_layer_and_reads_each_tensor_once(ck):
    """Layer-major over several sequences: each tensor is read once (not once per sequence), and when a layer's
    first tensor is read no tensor of another layer is still alive: the resident weights are one layer's."""
    src = LiveTracker(CheckpointWeightSource(ck["fp8"]))
    seqs = [IDS, IDS[::-1], IDS[3:]]
    logits, hidden = val.forward_many(src, seqs, torch.float32, return_hidden=True)
    assert len(logits) == 3 and len(hidden) == N_LAYERS
    assert src.overlaps == []
    assert max(src.reads.values()) == 1
    assert not any(".layers.3." in n for n in src.reads)  # the MTP layer is never read
    # and the results equal one-sequence-at-a-time runs, up to the float rounding of batching the token-wise MoE
    # over all sequences (matmul blocking differs with the row count)
    for s, lg in zip(seqs, logits):
        one, _ = val.forward_many(CheckpointWeightSource(ck["fp8"]), [s], torch.float32, return_hidden=False)
        torch.testing.assert_close(one[0], lg, rtol=1e-5, atol=1e-5)


# --- the failure contract: which check failed, by how much; thresholds range-checked; no internal keys ---------

def test_failed_checks_name_the_threshold_and_the_margin(ck, down0, tmp_path):
    rep_path = tmp_path / "rep.json"
    code, rep = cli("validate", down0, "--reference", ck["fp8"], "--token-ids", ids_arg(IDS),
                    "--min-top1", "0", "--json", "--report", str(rep_path))
    assert code == 4 and rep["passed"] is False
    assert [f["check"] for f in rep["failed_checks"]] == ["mean_kld"]  # top-1 bound 0 cannot fail
    f = rep["failed_checks"][0]
    assert f["value"] == rep["mean_kld"] and f["threshold"] == 0.01
    assert f"over by {rep['mean_kld'] - 0.01:.4g}" in f["message"]
    assert "_exit_code" not in rep and "_exit_code" not in json.loads(rep_path.read_text())
    r = subprocess_cli("validate", str(down0), "--reference", str(ck["fp8"]), "--token-ids", ids_arg(IDS))
    assert r.returncode == 4 and "failed: Mean KLD" in r.stderr and "--max-kld 0.01" in r.stderr


def test_passing_validation_has_no_failed_checks(ck):
    code, rep = cli("validate", ck["bf16"], "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), "--json")
    assert code == 0 and rep["passed"] is True and rep["failed_checks"] == []


@pytest.mark.parametrize("flag,value", [("--max-kld", "-1"), ("--max-kld", "nan"), ("--min-top1", "97"),
                                        ("--min-top1", "-0.1")])
def test_thresholds_out_of_range_are_usage_errors(ck, flag, value):
    code, rep = cli("validate", ck["bf16"], "--reference", ck["fp8"], "--token-ids", ids_arg(IDS), flag, value,
                    "--json")
    assert code == 2 and flag in rep["message"], rep


def test_logits_refuses_to_overwrite_without_flag(ck, tmp_path):
    dst = tmp_path / "x.npy"
    dst.write_bytes(b"precious")
    code, rep = cli("logits", ck["fp8"], "--token-ids", ids_arg(IDS), "-o", dst, "--json")
    assert code == 2 and "--overwrite" in rep["hint"]
    assert dst.read_bytes() == b"precious"
    code, rep = cli("logits", ck["fp8"], "--token-ids", ids_arg(IDS), "-o", dst, "--overwrite", "--json")
    assert code == 0
    assert np.load(dst).shape == (len(IDS), rep["shape"][1])
    assert not list(tmp_path.glob("*.tmp"))
