"""Quality on the trained tiny DeepSeek-V3 (dsconvert.testing.trained): the model is really trained, the
calibration data is recorded and kept apart from the evaluation windows, and held-out KLD regression guards.

The KLD bounds are the values ``bench/bench_quality.py`` measured (README, Quality) plus a stated margin:
RTN is deterministic (10 %); the calibrated methods get twice the seed-to-seed spread measured for them
(GPTQ 16 % -> 30 %; AWQ 2 % -> 10 %), so a different CPU's rounding does not trip them but a regression does.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

MEASURED = {  # W4A16 g64, held-out default windows (1894 tokens), calibration seed 0
    "rtn": (5.894e-3, 0.9292),
    "gptq": (3.041e-3, 0.9510),
    "awq": (5.684e-3, 0.9303),
}
MARGIN = {"rtn": 1.10, "gptq": 1.30, "awq": 1.10}
TOP1_MARGIN = 0.01  # Same top p may drop by one point


def _quantize(src: Path, out: Path, *extra: str) -> dict:
    r = run_cli("quantize", src, "-o", out, "--scheme", "W4A16", "--group-size", "64", "--json", *extra, timeout=600)
    assert r.rc == 0, str(r)
    return r.json()


def _validate(cand: Path, src: Path, *extra: str):
    r = run_cli("validate", cand, "--reference", src, "--max-kld", "1", "--min-top1", "0", "--json", *extra,
                timeout=600)
    assert r.rc == 0, str(r)
    return r


@pytest.fixture(scope="module")
def gptq_out(trained_src, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gptq") / "out"
    return out, _quantize(trained_src, out, "--gptq")


def _expected_windows(src: Path, text: str, num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """The documented window rule, rederived with the tokenizers library directly."""
    from tokenizers import Tokenizer

    ids = [0] + Tokenizer.from_file(str(src / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    wins = [ids[i: i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    pick = torch.randperm(len(wins), generator=torch.Generator().manual_seed(seed))[:num_samples]
    return [wins[i] for i in sorted(pick.tolist())]


def _sha(wins: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(wins, separators=(",", ":")).encode()).hexdigest()


# -- the model ---------------------------------------------------------------------------------------------------
def test_trained_model_is_trained(trained_src, tmp_path):
    """Held-out perplexity far below the same architecture with the fixture's random weights."""
    from dsconvert.testing.fixtures import build_checkpoint
    from dsconvert.testing.trained import TRAINED_SPEC, heldout_ppl

    rnd = build_checkpoint(tmp_path / "random", TRAINED_SPEC, tokenizer=False)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained_src / f, rnd / f)
    trained, random = heldout_ppl(trained_src), heldout_ppl(rnd)
    assert trained["validation.txt"]["tokens"] > 1500
    assert trained["validation.txt"]["ppl"] < 0.25 * random["validation.txt"]["ppl"], (trained, random)
    assert trained["validation.txt"]["ppl"] < 80  # measured 54.5 (random weights: 389)


def test_trained_model_layout_and_transformers_agree(trained_src):
    """The committed files are the release layout (FP8 + block scales, F32 router bias that is not zero, MTP
    block) and transformers' DeepseekV3ForCausalLM on the dequantized weights gives our forward's logits."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from dsconvert.convert.validate import forward_many, weight_source
    from dsconvert.model.metrics import compare_logits
    from dsconvert.testing.trained import TRAINED_SPEC, _hf_config

    cfg = json.loads((trained_src / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((trained_src / "model.safetensors.index.json").read_text())["weight_map"]
    n = TRAINED_SPEC.num_hidden_layers
    assert any(k.startswith(f"model.layers.{n}.eh_proj") for k in index)  # MTP block
    src = weight_source(trained_src)
    with safe_open(str(trained_src / index["model.layers.1.mlp.gate.e_score_correction_bias"]), "pt") as f:
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # trained by the balancing rule
    with safe_open(str(trained_src / index["model.layers.0.self_attn.o_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.o_proj.weight").dtype == torch.float8_e4m3fn
    # every in_features of a quantizable linear divides by 64 and 128 (W4A16 g64/g128 apply everywhere)
    for name in index:
        if name.endswith("proj.weight") and f"layers.{n}." not in name and "eh_proj" not in name:
            assert src.get(name).shape[1] % 128 == 0, name

    model = transformers.DeepseekV3ForCausalLM(_hf_config(TRAINED_SPEC)).eval()
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            state[k] = torch.stack([torch.cat([src.get(f"{pre}{e}.gate_proj.weight"),
                                               src.get(f"{pre}{e}.up_proj.weight")]) for e in range(v.shape[0])])
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            state[k] = torch.stack([src.get(f"{pre}{e}.down_proj.weight") for e in range(v.shape[0])])
        else:
            state[k] = src.get(k)
    model.load_state_dict({k: t.float() for k, t in state.items()})
    ids = list(range(2, 98))
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0].float()
    ours, _ = forward_many(src, [ids], torch.float32, return_hidden=False)
    m = compare_logits(hf, ours[0], torch.tensor(ids))
    assert m["mean_kld"] < 1e-8 and m["same_top_p"] == 1.0, m


# -- calibration kept apart from evaluation -----------------------------------------------------------------------
def test_calibration_record_hash(trained_src, gptq_out):
    """The report and the output's quantization_config name the bundled calibration set and hash exactly the
    windows the documented rule draws from it (recomputed here from the tokenizer)."""
    from dsconvert.convert.calibration_data import BUNDLED_CALIBRATION

    out, rep = gptq_out
    wins = _expected_windows(trained_src, BUNDLED_CALIBRATION.read_text(encoding="utf-8"), 8, 128, 0)
    rec = rep["calibration"]["data"]
    assert rec["dataset"] == "dsconvert:calibration.txt" and rec["seed"] == 0
    assert rec["windows_sha256"] == _sha(wins) and rec["tokens"] == 8 * 128
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["calibration"] == rec == rep["quantization_config"]["calibration"]
    # every routed expert of both MoE layers: its calibration token count, summing to top-k x tokens
    et = rep["calibration"]["expert_tokens"]
    assert sorted(et) == ["1", "2"] and all(sum(v.values()) == 2 * 8 * 128 for v in et.values())


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_calibration_seed_changes_windows_gptq_layout(trained_src, tmp_path):
    from dsconvert.convert.calibration_data import BUNDLED_CALIBRATION

    rep = _quantize(trained_src, tmp_path / "o", "--gptq", "--format", "gptq", "--calib-seed", "1",
                    "--num-samples", "2", "--seq-len", "64")
    wins = _expected_windows(trained_src, BUNDLED_CALIBRATION.read_text(encoding="utf-8"), 2, 64, 1)
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["calibration"]["windows_sha256"] == _sha(wins)  # GPTQModel's free-form meta
    assert qc["meta"]["calibration"]["seed"] == 1 and rep["calibration"]["data"]["sequences"] == 2


def test_validate_default_windows_do_not_overlap_calibration(trained_src, gptq_out):
    out, _ = gptq_out
    r = _validate(out, trained_src)
    rep = r.json()
    assert rep["calibration_overlap"] is False and rep["calibration_overlap_windows"] == 0
    assert "warning" not in r.stderr and rep["tokens"] > 1500  # the whole bundled text by default
    # regression guard: GPTQ g64 held-out Mean KLD and Same top p (module docstring)
    kld, top1 = MEASURED["gptq"]
    assert rep["mean_kld"] <= kld * MARGIN["gptq"] and rep["same_top_p"] >= top1 - TOP1_MARGIN, rep
    assert rep["mean_kld"] <= 0.7 * MEASURED["rtn"][0]


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_validate_warns_on_calibration_overlap(trained_src, gptq_out):
    """Evaluating on the calibration text: the windows the quantizer saw are counted, the JSON is marked and
    stderr warns (exit 0: the metrics are still computed)."""
    from dsconvert.convert.calibration_data import BUNDLED_CALIBRATION

    out, _ = gptq_out
    r = _validate(out, trained_src, "--prompts", BUNDLED_CALIBRATION)
    rep = r.json()
    text = BUNDLED_CALIBRATION.read_text(encoding="utf-8")
    calib = _expected_windows(trained_src, text, 8, 128, 0)
    evaluated = _expected_windows(trained_src, text, 10**6, 128, 0)[:16]  # validate's first 16 windows
    expected = sum(1 for w in evaluated if w in calib)
    assert expected > 0
    assert rep["calibration_overlap"] is True and rep["calibration_overlap_windows"] == expected
    assert "warning" in r.stderr and "overlap" in r.stderr
    assert rep["warnings"] and rep["calibration"]["dataset"] == "dsconvert:calibration.txt"


@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_calibrating_on_the_evaluation_text_is_flagged(trained_src, tmp_path):
    """The old default workflow (calibrate on validation.txt, validate on it): every calibration window is an
    evaluation window."""
    from dsconvert.convert.validate import BUNDLED_TEXT

    _quantize(trained_src, tmp_path / "o", "--gptq", "--calib-data", BUNDLED_TEXT, "--num-samples", "4")
    rep = _validate(tmp_path / "o", trained_src).json()
    assert rep["calibration_overlap"] is True and rep["calibration_overlap_windows"] == 4


# -- KLD regression guards -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", pytest.param("awq", marks=pytest.mark.slow)])
@pytest.mark.slow  # > 4 s: in make test-slow, so make test stays near 10 min
def test_heldout_kld_guard(trained_src, tmp_path, method):
    extra = () if method == "rtn" else ("--awq",)
    _quantize(trained_src, tmp_path / "o", *extra)
    rep = _validate(tmp_path / "o", trained_src).json()
    kld, top1 = MEASURED[method]
    assert math.isfinite(rep["mean_kld"]) and rep["mean_kld"] <= kld * MARGIN[method], rep["mean_kld"]
    assert rep["same_top_p"] >= top1 - TOP1_MARGIN, rep["same_top_p"]


def test_unknown_expert_policy_is_a_usage_error(trained_src, tmp_path):
    r = run_cli("quantize", trained_src, "-o", tmp_path / "o", "--gptq", "--expert-policy", "zero")
    assert r.rc == 2 and "expert policy" in r.stderr and "topk" in r.stderr, str(r)
    assert not (tmp_path / "o").exists()
