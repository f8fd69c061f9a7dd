"""Quality of RTN / AWQ / GPTQ / AutoRound-SignRound (ours) on the trained tiny DeepSeek-V3, against its FP8 source.

For each method and group size: Mean KLD and Same top p on ``validate``'s default held-out windows (the bundled
evaluation text, 16 x 128 tokens, disjoint from the calibration set), at two calibration seeds (different
windows of the bundled calibration set), with the spread between seeds. The spread of two equivalent
calibrations is this evaluation's noise floor (README, Quality). ``--part policies`` compares the policies for
experts with few calibration tokens (all-tokens / rtn / topk) in a starved setting (64 calibration tokens for
8 experts x top-2 in two MoE layers: about half the experts get fewer than 16); at the default 8 x 128 tokens no
expert of this model gets fewer than 139, so the policies coincide there.

Peers run only when installed; they are not dependencies. auto-round runs through bench/peer_autoround.py
(same calibration windows, W4A16, 200 iterations) under ``--autoround-python`` (a separate venv) or this
interpreter when it imports ``auto_round``. ``seconds``: wall time of the quantize run (auto-round: its quantize
and save, the model load excluded).

    python bench/bench_quality.py [--part methods|policies|all] [--groups 64,128] [--methods awq,gptq,autoround]
        [--autoround-python /tmp/arvenv/bin/python]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dsconvert.convert import quantize as qz  # noqa: E402
from dsconvert.convert.validate import ValidateOptions, _pool, forward_many, sequences, weight_source  # noqa: E402
from dsconvert.testing.trained import TRAINED_DIR  # noqa: E402


class Evaluator:
    """Reference logits once; Mean KLD / Same top p of each candidate on the same windows."""

    def __init__(self, src: Path):
        self.src = src
        vocab = int(json.loads((src / "config.json").read_text())["vocab_size"])
        self.seqs = sequences(src, ValidateOptions(), vocab)
        self.ref, _ = forward_many(weight_source(src), self.seqs, torch.float32, return_hidden=False)

    def __call__(self, cand: Path) -> dict:
        logits, _ = forward_many(weight_source(cand), self.seqs, torch.float32, return_hidden=False)
        m = _pool(self.ref, logits, self.seqs)
        return {"mean_kld": m["mean_kld"], "same_top_p": m["same_top_p"]}


def quantize(src: Path, out: Path, **kw) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    rep = qz.run(src, out, qz.Options(scheme="W4A16", **kw), overwrite=True, progress=False)
    return {"seconds": round(time.perf_counter() - t0, 1), "report": rep}


def methods(ev: Evaluator, tmp: Path, groups: list[int], methods_run=("awq", "gptq", "autoround"),
            peer_python: str | None = None) -> list[dict]:
    rows = []
    for g in groups:
        out, sec = _q(ev, tmp, "rtn", group_size=g)
        rtn = ev(out)
        rows.append({"method": "rtn", "group": g, "seed": None, **rtn, "x_rtn": 1.0, "seconds": sec})
        for method in methods_run:
            for seed in (0, 1):
                out, sec = _q(ev, tmp, method, group_size=g, method=method, calib_seed=seed)
                r = ev(out)
                rows.append({"method": method, "group": g, "seed": seed, **r, "x_rtn": r["mean_kld"] / rtn["mean_kld"],
                             "seconds": sec})
        if peer_python:  # Intel auto-round on the same calibration windows (bench/peer_autoround.py)
            for seed in (0, 1):
                r, sec = _peer(ev, tmp, peer_python, g, seed)
                rows.append({"method": "auto-round", "group": g, "seed": seed, **r,
                             "x_rtn": r["mean_kld"] / rtn["mean_kld"], "seconds": sec})
    return rows


def _q(ev: Evaluator, tmp: Path, tag: str, **kw) -> tuple[Path, float]:
    out = tmp / tag
    return out, quantize(ev.src, out, **kw)["seconds"]


def _peer(ev: Evaluator, tmp: Path, python: str, group: int, seed: int) -> tuple[dict, float]:
    """auto-round via bench/peer_autoround.py under ``python`` (an interpreter that imports auto_round)."""
    import subprocess

    out = tmp / f"peer-{group}-{seed}"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([python, str(Path(__file__).parent / "peer_autoround.py"), "--src", str(ev.src), "--out",
                        str(out), "--group", str(group), "--calib-seed", str(seed), "--dsconvert-python",
                        sys.executable], capture_output=True, text=True, check=True)
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    return ev(out), rec["seconds"]


def policies(ev: Evaluator, tmp: Path) -> list[dict]:
    rows = []
    for label, ns, sl in (("starved (2 x 32 tokens)", 2, 32),):
        for method in ("gptq", "awq"):
            for pol in ("all-tokens", "rtn", "topk"):
                for seed in (0, 1):
                    out = tmp / "pol"
                    q = quantize(ev.src, out, group_size=64, method=method, calib_seed=seed, num_samples=ns,
                                 seq_len=sl, expert_policy=pol)
                    layers = q["report"]["calibration"]["layers"]
                    starved = sum(1 for st in layers for e in st["experts"].values() if e["policy"] != "routed")
                    rows.append({"setting": label, "method": method, "policy": pol, "seed": seed,
                                 "starved_experts": starved, **ev(out)})
    return rows


def peers(peer_python: str | None) -> dict:
    return {"llm-compressor": "installed, not wired into this bench" if importlib.util.find_spec("llmcompressor")
            else "not installed",
            "auto-round": f"run with {peer_python}" if peer_python else "not installed (--autoround-python)"}


def _spread(rows: list[dict], key: str, *group) -> None:
    from collections import defaultdict

    acc = defaultdict(list)
    for r in rows:
        acc[tuple(r[k] for k in group)].append(r[key])
    for k, v in acc.items():
        if len(v) > 1:
            mean = sum(v) / len(v)
            print(f"  {'/'.join(map(str, k))}: mean {mean:.3e}, spread {max(v) - min(v):.2e} "
                  f"({(max(v) - min(v)) / mean * 100:.0f} % of the mean)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="methods", choices=("methods", "policies", "all"))
    ap.add_argument("--groups", default="64,128")
    ap.add_argument("--methods", default="awq,gptq,autoround", help="calibrated methods of ours to run")
    ap.add_argument("--autoround-python", default=None,
                    help="an interpreter that imports auto_round (default: this one, when it does)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    peer_python = a.autoround_python or (sys.executable if importlib.util.find_spec("auto_round") else None)
    ev = Evaluator(TRAINED_DIR)
    print(f"trained tiny DeepSeek-V3, held-out windows: {len(ev.seqs)} x <= 128 "
          f"({sum(len(s) for s in ev.seqs)} tokens); peers: {peers(peer_python)}")
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.part in ("methods", "all"):
            rows = out["methods"] = methods(ev, tmp, [int(g) for g in a.groups.split(",")],
                                            tuple(m for m in a.methods.split(",") if m), peer_python)
            print(f"{'method':10} {'g':>4} {'seed':>4} {'Mean KLD':>10} {'x RTN':>6} {'Same top p':>10} {'seconds':>8}")
            for r in rows:
                print(f"{r['method']:10} {r['group']:>4} {str(r['seed']):>4} {r['mean_kld']:10.3e} "
                      f"{r['x_rtn']:6.2f} {r['same_top_p'] * 100:9.2f}% {r['seconds']:8.1f}")
            print("seed spread (two equivalent calibrations: the noise floor):")
            _spread([r for r in rows if r["seed"] is not None], "mean_kld", "method", "group")
        if a.part in ("policies", "all"):
            rows = out["policies"] = policies(ev, tmp)
            print(f"{'setting':26} {'method':6} {'policy':10} {'seed':>4} {'starved':>7} {'Mean KLD':>10} "
                  f"{'Same top p':>10}")
            for r in rows:
                print(f"{r['setting']:26} {r['method']:6} {r['policy']:10} {r['seed']:>4} {r['starved_experts']:>7} "
                      f"{r['mean_kld']:10.3e} {r['same_top_p'] * 100:9.2f}%")
            print("mean over seeds:")
            _spread(rows, "mean_kld", "setting", "method", "policy")
    if a.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
