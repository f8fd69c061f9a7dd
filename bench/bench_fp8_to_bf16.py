"""End-to-end fp8-to-bf16 on the >= 1 GB bench fixture vs the I/O floor, and peak RSS on two fixture sizes.

Prints ratios measured in one run (no assertions):
  * ours / I/O floor, where the floor is a plain read of every input byte plus a write (+ fsync per shard) of
    every output byte, with the same files and the same page-cache state;
  * peak RSS of the conversion process on the bench fixture and on one 4x larger, vs the bound
    2 x largest BF16 tensor + 1 GiB.

Usage: python bench/bench_fp8_to_bf16.py [--presets bench,bench4x] [--workers 1]
Fixtures are cached under .bench/ (about 1.3 GB and 5 GB of FP8, plus the outputs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT, run_json

sys.path.insert(0, str(ROOT))

from dsconvert.formats.checkpoint import scan  # noqa: E402
from dsconvert.testing.fixtures import build_checkpoint  # noqa: E402


def fixture(preset: str) -> Path:
    d = ROOT / ".bench" / f"{preset}-fp8"
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        build_checkpoint(d, preset)
        print(f"built {preset} fixture in {time.perf_counter() - t:.1f} s", flush=True)
    return d


def io_floor(src: Path, out_bytes_per_shard: list[int], tmp: Path) -> float:
    """Seconds to read every shard of ``src`` and write ``out_bytes_per_shard`` (fsync each file)."""
    tmp.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    buf = bytearray(32 << 20)
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    block = b"\x5a" * (32 << 20)
    for i, n in enumerate(out_bytes_per_shard):
        with open(tmp / f"floor-{i}.bin", "wb") as f:
            left = n
            while left > 0:
                k = min(left, len(block))
                f.write(block[:k])
                left -= k
            f.flush()
            os.fsync(f.fileno())
    dt = time.perf_counter() - t
    shutil.rmtree(tmp)
    return dt


def run_ours(src: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return run_json(["fp8-to-bf16", str(src), "-o", str(out), "--workers", str(workers)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="bench,bench4x")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for preset in args.presets.split(","):
        src = fixture(preset)
        ck = scan(src)
        largest_bf16 = max(2 * e.numel for _, e in ck.tensors.values() if e.dtype in ("F8_E4M3", "BF16"))
        out = ROOT / ".bench" / f"{preset}-bf16"
        # warm the page cache identically for both measurements
        io_floor(src, [], ROOT / ".bench" / "floor-warm")
        ours = run_ours(src, out, args.workers)
        shard_sizes = [(out / s["name"]).stat().st_size for s in ours["plan"]["output_shards"]]
        floor = io_floor(src, shard_sizes, ROOT / ".bench" / "floor")
        bytes_in = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        bytes_out = sum(shard_sizes)
        bound = 2 * largest_bf16 + 2**30
        print(f"[{preset}] FP8 in {bytes_in / 1e9:.3f} GB, BF16 out {bytes_out / 1e9:.3f} GB")
        print(f"[{preset}] ours {ours['seconds']:.2f} s (process wall {ours['wall']:.2f} s), I/O floor {floor:.2f} s, "
              f"ratio ours/floor {ours['seconds'] / floor:.2f}x (goal <= 1.3x); "
              f"{bytes_out / 1e9 / ours['seconds']:.2f} GB/s written")
        print(f"[{preset}] peak RSS {ours['peak_rss']['gib']:.3f} GiB; bound 2 x largest BF16 tensor "
              f"({largest_bf16 / 2**20:.0f} MiB) + 1 GiB = {bound / 2**30:.3f} GiB; "
              f"ratio {ours['peak_rss']['bytes'] / bound:.2f}")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
