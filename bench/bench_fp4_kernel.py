"""Throughput of DeepSeek-V4's dequantizers on CPU, in GB/s of BF16 output, next to a plain BF16 copy.

Run: python bench/bench_fp4_kernel.py [M N]   (default 2048 x 4096: one V4-Flash routed expert w1)
Variants, all measured in one run (best of --repeat):

* FP4 e2m1 + per-32 E8M0 -> BF16, bit-built fast path (every scale byte in [2, 250], the release case);
* the same through the float32 path (a float32 scale grid forces it);
* FP8 e4m3 + 128x128 E8M0 -> BF16 (dequant_fp8_block after the exact E8M0 decode);
* ``copy_`` of the same BF16 output bytes (the memory-bandwidth floor).

Prints numbers only; no assertions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench this checkout's dsconvert
from _common import best_of  # noqa: E402
from dsconvert.quant.fp4_decode import dequant_fp4, e8m0_grid_to_float32, quantize_fp4, quantize_fp8_e8m0  # noqa: E402
from dsconvert.quant.fp8_block import dequant_fp8_block  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="*", type=int, default=[2048, 4096])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    m, n = a.shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    q4, s4 = quantize_fp4(w)
    q8, s8 = quantize_fp8_e8m0(w)
    s8f = e8m0_grid_to_float32(s8)
    s4f = s4.float()
    out = torch.empty(m, n, dtype=torch.bfloat16)
    ref = out.clone()
    gb = out.numel() * 2 / 1e9
    rows = {
        "copy_ (floor)": best_of(lambda: ref.copy_(out), a.repeat),
        "fp4 -> bf16, bit path": best_of(lambda: dequant_fp4(q4, s4, out=out), a.repeat),
        "fp4 -> bf16, float32 path": best_of(lambda: dequant_fp4(q4, s4f, out=out), a.repeat),
        "fp8 e8m0 -> bf16": best_of(lambda: dequant_fp8_block(q8, s8f, (128, 128), out=out), a.repeat),
    }
    floor = rows["copy_ (floor)"]
    print(f"{m} x {n} -> {gb * 1e3:.1f} MB of BF16, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for k, t in rows.items():
        print(f"  {k:28s} {t * 1e3:8.1f} ms  {gb / t:6.2f} GB/s  {floor / t:5.2f}x copy")


if __name__ == "__main__":
    main()
