"""Calibrated INT4 vs RTN: Mean KLD against the FP8 source of RTN, AWQ and GPTQ W4A16 on fixture models.

Prints, measured in one run (no assertions), per fixture: Mean KLD vs the FP8 source (and Same top p) for
RTN, AWQ and GPTQ at the same scheme and group size, the ratios AWQ/RTN and GPTQ/RTN, seconds, and the
peak RSS of each method (each method runs in its own child process, so the peaks are separate).

Calibration: the bundled ``dsconvert/data/validation.txt`` tokenized with the fixture's tokenizer, cut into
128-token sequences; the first ``--calib-tokens`` tokens calibrate, the last ``--eval-tokens`` (disjoint)
evaluate. The policy quantizes every decoder Linear whose in_features the group size divides; the others
(and the router, norms, embeddings, lm_head) stay float for RTN, AWQ and GPTQ alike.

Usage: python bench/bench_awq_gptq.py [--fixtures tiny,medium] [--group-size 64] [--asym] [--threads 1]
Fixtures are cached under .bench/.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

#: Fixture presets: ``tiny`` as the tests use it; ``medium`` about 4x wider with 16 experts (a couple of
#: minutes for both methods on two cores).
FIXTURES = {
    "tiny": {},
    "medium": dict(hidden_size=768, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, n_routed_experts=16,
                   num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=512, outlier_channels=8),
}
SEQ = 128


def fixture(name: str) -> Path:
    from dsconvert.testing.fixtures import build_checkpoint

    d = ROOT / ".bench" / f"calib-{name}-fp8"
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        build_checkpoint(d, "tiny", **FIXTURES[name])
    return d


def _splits(d: Path, calib_tokens: int, eval_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    from dsconvert.convert.calib_data import BUNDLED_TEXT, tokenize

    ids = tokenize(d, BUNDLED_TEXT.read_text(encoding="utf-8"))
    n_eval = min(eval_tokens, len(ids) // 3) // SEQ * SEQ
    n_cal = min(calib_tokens, len(ids) - n_eval - SEQ) // SEQ * SEQ
    calib = [ids[i:i + SEQ] for i in range(0, n_cal, SEQ)]
    e0 = len(ids) - n_eval
    evals = [ids[i:i + SEQ] for i in range(e0, len(ids) - SEQ + 1, SEQ)]
    return calib, evals


class _Over:
    def __init__(self, inner, over):
        self.inner, self.over, self.config = inner, over, inner.config

    def has(self, name):
        return name in self.over or self.inner.has(name)

    def get(self, name):
        return self.over[name] if name in self.over else self.inner.get(name)


def run_one(name: str, method: str, group_size: int, symmetric: bool, calib_tokens: int, eval_tokens: int) -> dict:
    """One method on one fixture (in this process): quantize, then Mean KLD vs the FP8 source."""
    from dsconvert.convert.calibrate import CalibrationEngine
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.model import ReferenceModel, compare_logits
    from dsconvert.quant.rtn import COMPRESSED_TENSORS, QuantSpec, dequantize, quantize

    d = fixture(name)
    src = CheckpointWeightSource(d)
    calib, evals = _splits(d, calib_tokens, eval_tokens)
    spec = QuantSpec(4, group_size, symmetric)

    def policy(module: str, shape: tuple[int, int]):
        return spec if shape[1] % group_size == 0 else None

    t0 = time.perf_counter()
    over: dict[str, torch.Tensor] = {}
    n_layers = src.config["num_hidden_layers"]
    stats = {}
    if method == "rtn":
        for t in src.ck.tensors:
            parts = t.split(".")
            if (t.startswith("model.layers.") and int(parts[2]) < n_layers and t.endswith(".weight")
                    and "_proj" in parts[-2]):
                w = src.get(t)
                sp = policy(t[:-7], tuple(w.shape)) if w.dim() == 2 else None
                if sp is not None:
                    over[t] = dequantize(quantize(w, sp, COMPRESSED_TENSORS))
    else:
        eng = CalibrationEngine(src, policy, method, COMPRESSED_TENSORS, calib)
        lin = []
        for i in range(n_layers):
            r = eng.run_layer(i)
            over.update({n + ".weight": dequantize(qt) for n, qt in r.quantized.items()})
            over.update(r.replaced)
            lin += list(r.stats["linears"].values())
        stats["linears"] = len(lin)
        stats["median_rel_mse_vs_rtn"] = float(torch.tensor(
            [s["rel_output_mse"] / max(s["rtn_rel_output_mse"], 1e-30) for s in lin]).median())
    seconds = time.perf_counter() - t0
    ref = ReferenceModel(src)
    cand = ReferenceModel(_Over(src, over))
    kl, top = [], []
    for e in evals:
        ids = torch.tensor(e)
        m = compare_logits(ref(ids).logits, cand(ids).logits, ids)
        kl.append(m["mean_kld"])
        top.append(m["same_top_p"])
    return {"fixture": name, "method": method, "mean_kld": sum(kl) / len(kl), "same_top_p": sum(top) / len(top),
            "seconds": seconds, "calib_tokens": sum(map(len, calib)), "eval_tokens": sum(map(len, evals)),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="tiny,medium")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (1: robust on shared cores)")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=384)
    ap.add_argument("--one", nargs=2, metavar=("FIXTURE", "METHOD"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], a.group_size, not a.asym, a.calib_tokens, a.eval_tokens)))
        return
    scheme = f"W4A16{'_ASYM' if a.asym else ''} g{a.group_size}"
    print(f"Mean KLD vs the FP8 source, {scheme}, torch threads {a.threads}")
    for name in a.fixtures.split(","):
        fixture(name)
        rows = {}
        for method in ("rtn", "awq", "gptq"):
            cmd = [sys.executable, __file__, "--one", name, method, "--group-size", str(a.group_size),
                   "--threads", str(a.threads), "--calib-tokens", str(a.calib_tokens),
                   "--eval-tokens", str(a.eval_tokens)] + (["--asym"] if a.asym else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        r0 = rows["rtn"]
        print(f"\n{name}: calibration {rows['awq']['calib_tokens']} tokens, evaluation {r0['eval_tokens']} other tokens")
        print(f"  {'method':6} {'Mean KLD':>9} {'vs RTN':>7} {'top-1':>6} {'seconds':>8} {'peak RSS':>9} "
              f"{'lin. MSE vs RTN (median)':>25}")
        for m, r in rows.items():
            ratio = r["mean_kld"] / r0["mean_kld"] if r0["mean_kld"] > 0 else float("nan")
            lin = f"{r['median_rel_mse_vs_rtn']:.2f}x" if "median_rel_mse_vs_rtn" in r else "-"
            print(f"  {m:6} {r['mean_kld']:9.4f} {ratio:6.2f}x {r['same_top_p']:6.3f} {r['seconds']:8.1f} "
                  f"{r['peak_rss_mib']:7.0f} MiB {lin:>25}")
        print(f"  AWQ/RTN {rows['awq']['mean_kld'] / r0['mean_kld']:.2f}   "
              f"GPTQ/RTN {rows['gptq']['mean_kld'] / r0['mean_kld']:.2f}")


if __name__ == "__main__":
    main()
