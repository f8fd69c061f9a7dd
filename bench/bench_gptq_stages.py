"""Where one MoE layer's GPTQ calibration peaks: runs ``CalibrationEngine.run_layer`` on an existing checkpoint
(e.g. ``dsconvert make-fixture DIR --preset real --layers 1 --dense-layers 0 --experts 16``: V3 dimensions) in
this process and prints, per stage, the process's own peak resident set (``VmHWM`` from ``/proc/self/status``,
reset with ``/proc/self/clear_refs`` at each stage boundary, so each figure is that stage's own high-water
mark), next to :func:`~dsconvert.convert.calibrate.estimate_peak_bytes` plus ``BASE_RSS``. The non-expert
kernels are split per linear (``gptq_quantize`` and ``output_error`` wrapped). Linux only. Usage::

    python bench/bench_gptq_stages.py CKPT --samples 32 --seq-len 512 [--threads 2] [--layer 0]

Prints each stage's peak to stderr as it ends (a stopped run keeps what it had) and one JSON object (``stages``: ``[(stage, peak bytes)]`` in order, ``peak_rss``, ``estimate``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def vm_hwm() -> int:
    """This process's peak resident set (bytes) since start or the last :func:`reset_hwm`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--expert-group", type=int, default=None)
    ap.add_argument("--max-memory", type=int, default=None)
    a = ap.parse_args()

    import torch

    from dsconvert.convert import calibrate as cal
    from dsconvert.convert.fp8_to_bf16 import BASE_RSS
    from dsconvert.convert.weights import CheckpointWeightSource
    from dsconvert.quant.rtn import GPTQ, QuantSpec

    torch.set_num_threads(a.threads)
    stages: list[tuple[str, int]] = []
    current = ["start"]
    overall = [0]

    def mark(stage: str) -> None:
        peak = vm_hwm()
        overall[0] = max(overall[0], peak)
        stages.append((current[0], peak))
        print(f"{time.strftime('%H:%M:%S')} {current[0]}: {peak / 2**30:.3f} GiB", file=sys.stderr, flush=True)
        current[0] = stage
        reset_hwm()

    def wrap(fn, label):
        def inner(*args, **kw):
            name = kw.get("name") or (kw.get("names") or [None])[0]
            mark(f"{label} {name}" if name else label)
            out = fn(*args, **kw)
            mark(f"after {label}")
            return out
        return inner

    cal.gptq_quantize = wrap(cal.gptq_quantize, "gptq_quantize")
    cal.output_error = wrap(cal.output_error, "output_error")
    spec = QuantSpec(4, 128, True)
    src = CheckpointWeightSource(a.ckpt, check_values=False)
    g = torch.Generator().manual_seed(0)
    vocab = src.config["vocab_size"]
    ids = [torch.randint(0, vocab, (a.seq_len,), generator=g).tolist() for _ in range(a.samples)]
    spill = Path(a.ckpt.rstrip("/") + "-spill")
    eng = cal.CalibrationEngine(src, lambda n, shp: spec if shp[1] % 128 == 0 else None, "gptq", GPTQ, ids,
                                spill_dir=spill, expert_group=a.expert_group, max_memory=a.max_memory,
                                progress=lambda i, s: mark(s))
    mark("run_layer")
    t0 = time.perf_counter()
    for i in range(a.layer + 1):
        res = eng.run_layer(i)
        res.close()
    sec = time.perf_counter() - t0
    mark("end")
    shutil.rmtree(spill, ignore_errors=True)
    print(json.dumps({"tokens": eng.num_tokens, "seconds": round(sec, 1), "expert_group": eng.expert_group,
                      "peak_rss": overall[0], "estimate": BASE_RSS + eng.peak_memory_estimate(),
                      "stages": [(s, round(b / 2**30, 3)) for s, b in stages]}, indent=1))


if __name__ == "__main__":
    main()
