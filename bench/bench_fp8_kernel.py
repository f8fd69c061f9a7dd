"""Throughput of dequant_fp8_block on CPU, in GB/s of BF16 output, next to the naive kernel and clone.

Run: python bench/bench_fp8_kernel.py [M N]   (default 7168 x 7168: 49 MiB fp8 -> 98 MiB bf16)
Prints numbers only; no assertions. All variants measured in one run, best of --repeat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench this checkout's dsconvert
from _common import best_of  # noqa: E402
from dsconvert.quant.fp8_block import dequant_fp8_block, scale_grid  # noqa: E402


def naive(weight: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The previous implementation: pad to whole blocks, fp32, broadcast multiply, crop, cast."""
    m, n = weight.shape
    bm, bn = block
    gm, gn = s.shape
    wf = torch.zeros((gm * bm, gn * bn), dtype=torch.float32)
    wf[:m, :n] = weight.to(torch.float32)
    wf = wf.view(gm, bm, gn, bn) * s[:, None, :, None]
    return wf.view(gm * bm, gn * bn)[:m, :n].to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="*", type=int, default=[7168, 7168])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--realistic", action="store_true",
                    help="normal-ish weights (few subnormals, no NaN) instead of uniform random bytes")
    args = ap.parse_args()
    m, n = args.shape
    g = torch.Generator().manual_seed(0)
    if args.realistic:
        w = (torch.randn((m, n), generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    else:
        w = torch.randint(0, 256, (m, n), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    s = (10.0 ** (-6 + 3 * torch.rand(scale_grid((m, n)), generator=g))).float()
    ref = naive(w, s)
    out = torch.empty_like(ref)
    gb = ref.numel() * ref.element_size() / 1e9
    print(f"torch {torch.__version__}  threads={torch.get_num_threads()}  "
          f"cpu_capability={torch.backends.cpu.get_cpu_capability()}  shape={m}x{n}  "
          f"data={'realistic' if args.realistic else 'uniform bytes'}  bf16 output {gb * 1e3:.0f} MB")
    res = {
        "ours (allocating)": best_of(lambda: dequant_fp8_block(w, s), args.repeat),
        "ours (out=)": best_of(lambda: dequant_fp8_block(w, s, out=out), args.repeat),
        "naive torch": best_of(lambda: naive(w, s), args.repeat),
        "torch.clone (bf16)": best_of(lambda: ref.clone(), args.repeat),
    }
    nan = torch.isnan(ref)
    same = torch.equal(torch.isnan(out), nan) and torch.equal(out.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
    clone = gb / res["torch.clone (bf16)"]
    for name, t in res.items():
        print(f"{name:22s} {t * 1e3:8.1f} ms  {gb / t:6.2f} GB/s  {gb / t / clone:5.2f}x clone")
    print(f"ours/clone = {res['torch.clone (bf16)'] / res['ours (allocating)']:.2f}   "
          f"naive/clone = {res['torch.clone (bf16)'] / res['naive torch']:.2f}   "
          f"ours/naive = {res['naive torch'] / res['ours (allocating)']:.1f}   byte-identical (non-NaN): {same}")


if __name__ == "__main__":
    main()
