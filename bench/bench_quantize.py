"""``dsconvert quantize`` (RTN) throughput vs ``fp8-to-bf16`` on the same FP8 fixture, and peak RSS.

Prints, from one run each (no assertions):
  * GB of source read per second and source parameters per second, for fp8-to-bf16 and for quantize
    W4A16 in compressed-tensors, AutoAWQ and GPTQ layouts (group 128);
  * the ratio quantize / fp8-to-bf16 of those rates (both read the same bytes and dequantize the same FP8);
  * peak RSS of each process (from its ``--json`` report) and the quantizer's mean relative RMS weight error.

Timings are the reports' ``seconds`` (the command's own work, interpreter start excluded); process wall time is
printed too. The default fixture is the ``bench`` preset cut to 2 decoder layers (one dense, one MoE) without the MTP
block (about 0.4 GB of FP8, every tensor shape of the full bench preset), so the run stays within a few minutes.

Usage: python bench/bench_quantize.py [--layers 2] [--formats compressed-tensors,awq,gptq] [--scheme W4A16]
Fixtures are cached under .bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from _common import ROOT, cached_fixture, run_json as run

# This process imports neither torch nor dsconvert and builds the fixture in a child (see _common).
BUILD = """
from dataclasses import replace
from dsconvert.testing.fixtures import PRESETS, build_checkpoint
layers = int(sys.argv[2])
build_checkpoint(sys.argv[1], replace(PRESETS["bench"], num_hidden_layers=layers, num_nextn_predict_layers=0,
                                      num_shards=layers + 1))
"""


def fixture(layers: int) -> Path:
    return cached_fixture(f"bench-{layers}L-nomtp-fp8", BUILD, str(layers))


def source_params(src: Path) -> int:
    """Parameters of every tensor except the FP8 scales, from the safetensors headers."""
    n = 0
    for p in src.glob("*.safetensors"):
        with open(p, "rb") as f:
            hdr = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, e in hdr.items():
            if name != "__metadata__" and not name.endswith("_scale_inv"):
                k = 1
                for d in e["shape"]:
                    k *= d
                n += k
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the bench-shaped fixture")
    ap.add_argument("--formats", default="compressed-tensors,awq,gptq")
    ap.add_argument("--scheme", default="W4A16")
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    src = fixture(args.layers)
    params = source_params(src)
    bytes_in = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"fixture {src.name}: {bytes_in / 1e9:.3f} GB of safetensors, {params / 1e6:.1f} M parameters")
    work = ROOT / ".bench" / "quantize-out"
    shutil.rmtree(work, ignore_errors=True)

    rows = []
    base = run(["fp8-to-bf16", str(src), "-o", str(work / "bf16")])
    rows.append(("fp8-to-bf16 (BF16)", base, None))
    shutil.rmtree(work / "bf16", ignore_errors=True)
    for fmt in args.formats.split(","):
        out = work / fmt
        rep = run(["quantize", str(src), "-o", str(out), "--scheme", args.scheme, "--group-size",
                   str(args.group_size), "--format", fmt])
        rows.append((f"quantize {args.scheme} g{args.group_size} {fmt}", rep, rep["plan"]["bits_per_weight_quantized"]))
        shutil.rmtree(out, ignore_errors=True)

    base_s = base["seconds"]
    print(f"{'command':44s} {'s':>7s} {'wall s':>7s} {'GB/s read':>9s} {'Mparam/s':>9s} {'vs bf16':>8s} "
          f"{'peak RSS GiB':>12s} {'bpw':>6s} {'rel RMS err':>11s}")
    for label, rep, bpw in rows:
        s = rep["seconds"]
        read = rep["plan"]["bytes_read"]["bytes"]
        err = (rep.get("quantization_error") or {}).get("mean")
        print(f"{label:44s} {s:7.2f} {rep['wall']:7.2f} {read / 1e9 / s:9.3f} {params / 1e6 / s:9.1f} "
              f"{base_s / s:7.2f}x {rep['peak_rss']['gib']:12.3f} {'' if bpw is None else f'{bpw:6.3f}':>6s} "
              f"{'' if err is None else f'{err:11.4f}':>11s}")
    print("'vs bf16' = throughput relative to fp8-to-bf16 on the same source (1.00x = as fast; below 1 = slower)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
