"""One MoE decoder layer through ``CalibrationEngine.run_layer`` (GPTQ or AWQ): time against the layer's
floating-point work at this machine's matmul rate, and peak RSS against the dry-run estimate.

Builds a one-layer checkpoint (``first_k_dense_replace=0``, so the only layer is MoE) with
``dsconvert.testing.fixtures.build_checkpoint`` at the dimensions given (defaults are small enough for a
shared 2-core machine; the real V3 layer is ``--hidden 7168 --inter 2048 --experts 256 --samples 128
--seq-len 512``), then runs the layer in a child process per method and prints, measured in one run (no
assertions):

* seconds, and the FLOP estimate of the layer divided by the measured float32 matmul rate (the "ideal"
  seconds) with their ratio (the target is <= 2x);
* peak RSS of the child (its own ``VmHWM``, :func:`dsconvert.report.peak_rss_bytes`; ``ru_maxrss`` would carry
  the parent's high-water mark across fork+exec) next to ``BASE_RSS + estimate_peak_bytes`` (the figure
  ``quantize --dry-run`` adds), with their ratio (the target is within +-25 %).

FLOP model (GPTQ, per linear ``(M, N)`` with ``n`` calibration tokens): Hessian ``2 n N^2``, Cholesky +
inverse + Cholesky about ``2 N^3``, lazy column updates ``2 M N^2 / 2``; plus the capture and propagate
forwards of the layer (``2 x 2 x params_touched_per_token x tokens``). AWQ: the forward passes of its grid
search (``n_grid + 1`` MLP forwards per mapping) and the clip search (``n_grid/2`` candidates on <= 512
tokens). Usage::

    python bench/bench_calibrate_layer.py [--hidden 1024 --inter 256 --experts 16 --samples 8 --seq-len 128]
        [--methods gptq,awq] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _dims(a) -> dict:
    heads = max(1, a.hidden // 128)
    return dict(hidden_size=a.hidden, intermediate_size=a.inter * 4, moe_intermediate_size=a.inter,
                num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=heads,
                q_lora_rank=max(64, a.hidden // 4), kv_lora_rank=max(64, a.hidden // 14), n_routed_experts=a.experts,
                num_experts_per_tok=min(8, a.experts), n_group=1, topk_group=1, vocab_size=512, tokenizer=False,
                extra_files=False)


def child(a) -> None:
    import torch

    from dsconvert.convert.calibrate import CalibrationEngine
    from dsconvert.convert.fp8_to_bf16 import BASE_RSS
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.quant.rtn import GPTQ, QuantSpec
    from dsconvert.report import peak_rss_bytes

    torch.set_num_threads(a.threads)
    spec = QuantSpec(4, 128 if a.hidden % 128 == 0 and a.inter % 128 == 0 else 64, True)
    src = CheckpointWeightSource(a.ck)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 512, (a.seq_len,), generator=g).tolist() for _ in range(a.samples)]
    spill = Path(a.ck + "-spill")
    def policy(n, shp):
        if a.experts_only and ".mlp.experts." not in n:
            return None  # the routed experts only: the slope of memory and time per expert
        return spec if shp[1] % spec.group_size == 0 else None

    eng = CalibrationEngine(src, policy, a.method,
                            GPTQ, ids, n_grid=a.n_grid, spill_dir=spill,
                            max_memory=a.max_memory, expert_group=a.expert_group)
    t0 = time.perf_counter()
    res = eng.run_layer(0)
    sec = time.perf_counter() - t0
    res.close()
    shutil.rmtree(spill, ignore_errors=True)
    est = BASE_RSS + eng.peak_memory_estimate()
    print(json.dumps({"seconds": sec, "peak_rss": peak_rss_bytes(),
                      "estimate": est, "expert_group": eng.expert_group, "awq_candidates": eng.awq_candidates,
                      "stage_seconds": res.stats.get("stage_seconds")}))


def matmul_rate(threads: int) -> float:
    """float32 FLOP/s of a 2048^3 matmul at ``threads`` threads (best of 3)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best


def flops(a, method: str) -> float:
    T, H, I, E, k = a.samples * a.seq_len, a.hidden, a.inter, a.experts, min(8, a.experts)
    d = _dims(a)
    heads, ql, kvl = d["num_attention_heads"], d["q_lora_rank"], d["kv_lora_rank"]
    attn = [(ql, H), (heads * 192, ql), (kvl + 64, H), (heads * 256, kvl), (H, heads * 128)]
    n_e = T * k / E
    fwd = 2 * T * (sum(m * n for m, n in attn) + k * 3 * H * I)  # one layer forward on all tokens
    total = 2 * fwd  # capture + propagate
    if method == "gptq":
        for m, n in ([] if a.experts_only else attn):
            total += 2 * T * n * n + 2 * n ** 3 + m * n * n
        for m, n in ((2 * I, H), (H, I)):  # gate+up share a Hessian; down
            total += E * (2 * n_e * n * n + 2 * n ** 3 + m * n * n)
    else:
        total += (a.n_grid + 1) * fwd + (a.n_grid // 2) * 2 * min(T, 512) * (3 * E * H * I)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--max-memory", type=int, default=None, help="engine budget, bytes (default: its default)")
    ap.add_argument("--expert-group", type=int, default=None, help="experts in flight (default: from the budget)")
    ap.add_argument("--experts-only", action="store_true", help="quantize only the routed experts (keep the rest)")
    ap.add_argument("--keep", action="store_true", help="keep the built checkpoint in /tmp for the next run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--ck", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    from dsconvert.testing.fixtures import build_checkpoint

    ck = Path("/tmp") / f"calib-bench-{a.hidden}-{a.inter}-{a.experts}"
    if not (ck / "config.json").is_file():
        shutil.rmtree(ck, ignore_errors=True)
        build_checkpoint(ck, "tiny", **_dims(a))
    rate = matmul_rate(a.threads)
    print(f"layer: hidden {a.hidden}, {a.experts} experts of {a.inter}x{a.hidden}, {a.samples}x{a.seq_len} tokens, "
          f"{a.threads} thread(s); matmul rate {rate / 1e9:.1f} GFLOP/s")
    for m in a.methods.split(","):
        cmd = [sys.executable, __file__, "--child", "--method", m, "--ck", str(ck), "--hidden", str(a.hidden),
               "--inter", str(a.inter), "--experts", str(a.experts), "--samples", str(a.samples),
               "--seq-len", str(a.seq_len), "--threads", str(a.threads), "--n-grid", str(a.n_grid)]
        cmd += ["--max-memory", str(a.max_memory)] if a.max_memory else []
        cmd += ["--expert-group", str(a.expert_group)] if a.expert_group else []
        cmd += ["--experts-only"] if a.experts_only else []
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        ideal = flops(a, m) / rate
        print(f"{m}: {r['seconds']:.1f} s, ideal {ideal:.1f} s at the matmul rate -> {r['seconds'] / ideal:.2f}x; "
              f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB vs estimate {r['estimate'] / 2**30:.2f} GiB "
              f"-> {r['peak_rss'] / r['estimate']:.2f}x (expert group {r['expert_group']}, "
              f"AWQ candidates at once {r['awq_candidates']}); stages {r['stage_seconds']}", flush=True)
    if not a.keep:
        shutil.rmtree(ck, ignore_errors=True)


if __name__ == "__main__":
    main()
