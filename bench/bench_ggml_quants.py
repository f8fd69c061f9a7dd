"""Throughput of dsconvert's torch GGML quantizers vs llama.cpp's ``ggml_quantize_chunk``.

llama.cpp's chunk call is single threaded, so ours is timed with ``torch.set_num_threads(1)`` for
the like-for-like ratio, and again with 2 threads. Prints MB of float32 input per second (best of
``--reps``) and the ratios; asserts nothing. ``--imatrix`` passes the same random importance weights to both
(required for IQ2_XXS and IQ2_XS).

    python bench/bench_ggml_quants.py [--rows 512] [--cols 7168] [--types Q8_0,Q4_K,Q6_K] [--device cpu] [--imatrix]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does; read when torch's OpenMP loads

import torch  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

from dsconvert.quant.ggml import get_type  # noqa: E402
from dsconvert.testing import ggml_oracle  # noqa: E402


def _best(fn, reps: int, sync=lambda: None) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--types", default="Q8_0,Q4_K,Q6_K")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to time ours with")
    ap.add_argument("--imatrix", action="store_true", help="quantize with random importance weights")
    args = ap.parse_args()

    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    mb = x.numel() * 4 / 1e6
    xn = x.numpy()
    xd = x.to(args.device)
    im = torch.rand(args.cols, generator=torch.Generator().manual_seed(1)) + 0.1 if args.imatrix else None
    imn = None if im is None else im.numpy()
    imd = None if im is None else im.to(args.device)
    sync = torch.cuda.synchronize if xd.is_cuda else (lambda: None)
    oracle = ggml_oracle.load()
    print(f"input {args.rows}x{args.cols} float32 = {mb:.1f} MB, device {args.device}; "
          f"llama.cpp: {oracle.path if oracle else 'not available'}")
    for name in args.types.split(","):
        t = get_type(name)
        ref_s = None
        if oracle is not None:
            qt = GGMLQuantizationType[t.name]
            oracle.quantize(xn[:4], qt, imn)
            ref_s = _best(lambda: oracle.quantize(xn, qt, imn), args.reps)
            print(f"{t.name:7s} llama.cpp 1 thread : {mb / ref_s:8.1f} MB/s")
        for th in (int(v) for v in args.threads.split(",")):
            torch.set_num_threads(th)
            t.quantize(xd[:4], imd)
            s = _best(lambda: t.quantize(xd, imd), args.reps, sync)
            ratio = f"  ours/llama.cpp = {ref_s / s:5.2f}" if ref_s else ""
            print(f"{t.name:7s} ours {th} thread(s)  : {mb / s:8.1f} MB/s{ratio}")


if __name__ == "__main__":
    main()
