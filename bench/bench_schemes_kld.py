"""Mean KLD / Same top p of each quantize scheme and recipe against the FP8 source, with and without the
activation emulation of ``validate`` (docs/int-formats.md §13).

Prints one row per configuration from one run each (no assertions): bits per weight of the quantized modules,
Mean KLD and Same top p with the declared activations emulated, and with weights only
(``--no-emulate-activations``). Default fixture: the ``tiny`` preset (random weights: absolute numbers only
compare schemes with each other); ``--src tests/data/trained-tiny-v3`` uses the trained test model (the README
table). Usage: python bench/bench_schemes_kld.py [--preset tiny | --src DIR] [--only NVFP4,...]
Outputs go under .bench/schemes-kld/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "W4A16 g32": ["--scheme", "W4A16", "--group-size", "32"],
    "W8A16 g32": ["--scheme", "W8A16", "--group-size", "32"],
    "W8A8": ["--scheme", "W8A8"],
    "FP8_BLOCK": ["--scheme", "FP8_BLOCK"],
    "NVFP4A16": ["--scheme", "NVFP4A16"],
    "NVFP4": ["--scheme", "NVFP4"],
    "MXFP4A16": ["--scheme", "MXFP4A16"],
    "MXFP4": ["--scheme", "MXFP4"],
    "experts-mxfp4": ["--preset", "experts-mxfp4"],
    "experts-nvfp4-attn-fp8": ["--preset", "experts-nvfp4-attn-fp8"],
}


def cli(*args) -> dict:
    p = subprocess.run([sys.executable, "-m", "dsconvert.cli", *map(str, args), "--json"], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode not in (0, 4):
        raise SystemExit(f"dsconvert {' '.join(map(str, args))} failed:\n{p.stderr}")
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--src", type=Path, default=None, help="an FP8 checkpoint instead of a generated fixture")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    base = ROOT / ".bench" / "schemes-kld" / (a.src.name if a.src else a.preset)
    src = a.src.resolve() if a.src else base / f"src-{a.preset}"
    if not src.is_dir():
        subprocess.run([sys.executable, "-m", "dsconvert.cli", "make-fixture", str(src), "--preset", a.preset],
                       cwd=ROOT, check=True, capture_output=True)
    names = [n for n in CONFIGS if not a.only or n in a.only.split(",")]
    print(f"{'config':24s} {'bpw':>7s} {'KLD emul':>9s} {'top1 emul':>9s} {'KLD w-only':>10s} {'top1 w-only':>11s}")
    for n in names:
        out = base / n.replace(" ", "-")
        q = cli("quantize", src, "-o", out, *CONFIGS[n], "--overwrite")
        on = cli("validate", out, "--reference", src, "--max-kld", "100", "--min-top1", "0")
        off = cli("validate", out, "--reference", src, "--max-kld", "100", "--min-top1", "0",
                  "--no-emulate-activations")
        print(f"{n:24s} {q['plan']['bits_per_weight_quantized']:7.3f} {on['mean_kld']:9.4f} {on['same_top_p']:9.3f} "
              f"{off['mean_kld']:10.4f} {off['same_top_p']:11.3f}", flush=True)


if __name__ == "__main__":
    main()
