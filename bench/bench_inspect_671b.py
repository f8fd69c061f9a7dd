"""``inspect`` and ``fp8-to-bf16 --dry-run`` on the full 671B release layout (headers only, sparse shards).

Prints, measured in one run (no assertions):
  * wall time of each command, and
  * the start-up cost (``dsconvert --version`` in a fresh interpreter), and
  * the ratio of the rest to the floor: opening every shard and parsing its safetensors header with the
    ``safetensors`` library (what any reader must do at least).

Usage: python bench/bench_inspect_671b.py [--work DIR]
The layout uses about 200 MB of disk (sparse files with 688 GB apparent size).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsconvert.testing.fixtures import real_v3_spec, write_headers_only  # noqa: E402


def _floor(src: Path) -> float:
    from safetensors import safe_open

    t = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                h.get_slice(k).get_shape()
    return time.perf_counter() - t


def _timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dsconvert.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        t = time.perf_counter()
        src = write_headers_only(Path(tmp) / "src", real_v3_spec())
        print(f"wrote the 671B headers-only layout in {time.perf_counter() - t:.1f} s")
        floor = _floor(src)
        print(f"floor (safetensors header parse of every shard): {floor:.2f} s")
        start = min(_timed(["--version"]) for _ in range(3))
        print(f"start-up (dsconvert --version): {start:.2f} s")
        for label, cmd in (("inspect", ["inspect", str(src), "--json"]),
                           ("fp8-to-bf16 --dry-run", ["fp8-to-bf16", str(src), "-o", f"{tmp}/out", "--dry-run",
                                                      "--json"])):
            s = _timed(cmd)
            print(f"{label:22s} {s:7.2f} s   ({s - start:5.2f} s after start-up = {(s - start) / floor:5.1f}x the floor)")


if __name__ == "__main__":
    main()
