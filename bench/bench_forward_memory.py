"""Peak RSS of ``dsconvert logits`` and ``dsconvert validate`` (the reference forward) vs the model's size.

The claim under test: the forward streams the model layer by layer, so its memory is bounded by one decoder layer
(plus embeddings / lm_head and activations), not by the whole model. Each command runs in its own process; its
peak RSS comes from the kernel (``os.wait4`` rusage ``ru_maxrss``), and for ``validate`` also from the report's own
``peak_rss`` (``--json``).

Fixtures: ``tiny`` (a few MB: the interpreter + torch baseline), and two checkpoints with the same layer shapes
and 2 and 8 decoder layers (the second ~4x the weights). Optionally ``--with-bench`` adds the 1.3 GB ``bench``
preset (slow on 2 cores: ~25 s of FP8 dequantization per forward pass).

Printed per run (no assertions):
  * total BF16 bytes of the weights the forward reads (every decoder layer + embed + norm + lm_head; not MTP);
  * BF16 bytes of the largest decoder layer;
  * peak RSS, and peak RSS minus the tiny-fixture baseline of the same command ("model-attributable"), as ratios
    of the two sizes above.

``--estimate`` instead prints, for the 2-layer fixture (and its fp8-to-bf16 output), the ``--dry-run`` peak-RAM
estimate of ``validate`` / ``logits`` next to the measured peak and their ratio (the accuracy figure the README
quotes; the suite only guards a wide band, tests/model/test_forward_estimate.py), with the CPU count and thread setting
that move the peak between machines.

Usage: python bench/bench_forward_memory.py [--with-bench] [--estimate] [--clean]
Fixtures are cached under .bench/forward-memory/ (about 0.5 GB; 1.8 GB with --with-bench); --clean deletes them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This process imports neither torch nor dsconvert, and builds the fixtures in a child: a fork of a large parent
# would start each measured child with the parent's RSS, and ru_maxrss (ours and the report's getrusage) keeps
# that pre-exec high-water mark.
CACHE = ROOT / ".bench" / "forward-memory"
# Same layer shapes, 2 and 8 decoder layers: an MoE layer is ~54M params (32 experts x 3 x 512 x 1024 + MLA).
MEDIUM = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=2,
              first_k_dense_replace=1, num_nextn_predict_layers=1, num_attention_heads=8, q_lora_rank=384,
              kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
              num_experts_per_tok=4, n_group=4, topk_group=2, vocab_size=8192, num_shards=3, outlier_channels=8)
FIXTURES = {  # name: (preset, FixtureSpec overrides)
    "tiny": ("tiny", {}),
    "medium-2L": ("tiny", MEDIUM),
    "medium-8L": ("tiny", dict(MEDIUM, num_hidden_layers=8, num_shards=9)),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def fixture(name: str, preset: str, overrides: dict) -> Path:
    d = CACHE / name
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        code = ("import json, sys; from dsconvert.testing.fixtures import build_checkpoint; "
                "build_checkpoint(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, str(d), preset, json.dumps(overrides)], cwd=ROOT, check=True)
        print(f"built {name} in {time.perf_counter() - t:.1f} s", flush=True)
    return d


def _header(path: Path) -> dict:
    """A safetensors header, parsed here (8-byte little-endian length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return hdr


def weight_sizes(ckpt: Path) -> dict:
    """BF16 bytes the forward reads: per decoder layer (0..n-1) and in total (+ embed, final norm, lm_head).
    FP8 weights count 2 bytes per element (their BF16 size); scales are not weights."""
    cfg = json.loads((ckpt / "config.json").read_text())
    n = int(cfg["num_hidden_layers"])
    per_layer = [0] * n
    other = 0
    for shard in sorted(ckpt.glob("*.safetensors")):
        for name, info in _header(shard).items():
            if name.endswith("_scale_inv"):
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            m = _LAYER.match(name)
            if m is None:
                other += 2 * numel
            elif int(m.group(1)) < n:
                per_layer[int(m.group(1))] += 2 * numel
            # layer n (MTP) is never run
    return {"layers": n, "total": sum(per_layer) + other, "largest_layer": max(per_layer),
            "embed_head": other}


def run_measured(args: list[str]) -> tuple[int, int, dict | None, float]:
    """Run ``python -m dsconvert.cli ARGS``; returns (exit status, peak RSS bytes from the kernel, JSON report or
    None, seconds)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "dsconvert.cli", *args], cwd=ROOT, stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        secs = time.perf_counter() - t
        out.seek(0)
        text = out.read().decode()
        if p.returncode not in (0, 4):
            err.seek(0)
            sys.exit(f"dsconvert {' '.join(args)} failed ({p.returncode}):\n{err.read().decode()[-2000:]}")
    try:
        rep = json.loads(text)
    except ValueError:
        rep = None
    return p.returncode, ru.ru_maxrss * 1024, rep, secs


def estimate_vs_measured() -> None:
    """Print estimate, measured peak (``ru_maxrss``) and their ratio for the cases of tests/model/test_forward_estimate.py."""
    fp8 = fixture("medium-2L", "tiny", MEDIUM)
    bf16 = CACHE / "medium-2L-bf16"
    if not (bf16 / "config.json").is_file():
        shutil.rmtree(bf16, ignore_errors=True)
        run_measured(["fp8-to-bf16", str(fp8), "-o", str(bf16), "-q"])
    ids = ",".join(map(str, range(300)))
    cases = {"validate": ["validate", str(bf16), "--reference", str(fp8)],
             "validate_long": ["validate", str(bf16), "--reference", str(fp8), "--seq-len", "512",
                               "--num-samples", "4"],
             "validate_bf16": ["validate", str(bf16), "--reference", str(fp8), "--dtype", "bfloat16"],
             "logits_fp8": ["logits", str(fp8), "--token-ids", ids],
             "logits_bf16": ["logits", str(bf16), "--token-ids", ids]}
    print(f"cpus {os.cpu_count()}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}  "
          f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}")
    for name, args in cases.items():
        _, _, plan, _ = run_measured([*args, "--dry-run", "--json"])
        est = plan["plan"]["peak_memory_estimate"]["bytes"]
        extra = ["--max-kld", "100", "--min-top1", "0", "-q"] if args[0] == "validate" else []
        _, peak, _, secs = run_measured([*args, *extra, "--json"])
        print(f"  {name:14s} estimate {mib(est)}  measured {mib(peak)}  measured/estimate {peak / est:5.2f}  "
              f"{secs:6.1f} s", flush=True)


def mib(b: float) -> str:
    return f"{b / 2**20:8.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-bench", action="store_true", help="also the 1.3 GB 'bench' preset (slow)")
    ap.add_argument("--clean", action="store_true", help="delete the cached fixtures when done")
    ap.add_argument("--estimate", action="store_true", help="dry-run estimate vs measured peak, per case")
    a = ap.parse_args()
    if a.estimate:
        estimate_vs_measured()
        if a.clean:
            shutil.rmtree(CACHE, ignore_errors=True)
        return
    fixtures = dict(FIXTURES)
    if a.with_bench:
        fixtures["bench"] = ("bench", {})
    t0 = time.perf_counter()
    ids = ",".join(str(i) for i in range(2, 66))  # 64 tokens
    rows = []
    for name, (preset, overrides) in fixtures.items():
        d = fixture(name, preset, overrides)
        sz = weight_sizes(d)
        for cmd, args in (("logits", ["logits", str(d), "--token-ids", ids, "--json"]),
                          ("validate", ["validate", str(d), "--reference", str(d), "--json", "-q"])):
            code, peak, rep, secs = run_measured(args)
            self_peak = rep.get("peak_rss") if rep else None
            rows.append((name, cmd, sz, peak, self_peak, secs))
            print(f"{name:10s} {cmd:8s} {sz['layers']} layers  weights {mib(sz['total'])}  largest layer "
                  f"{mib(sz['largest_layer'])}  peak RSS {mib(peak)}"
                  + (f" (report: {mib(self_peak)})" if self_peak else "") + f"  {secs:6.1f} s", flush=True)

    print("\nratios (model-attributable = peak RSS - the tiny fixture's peak RSS for the same command):")
    base = {cmd: peak for name, cmd, _, peak, _, _ in rows if name == "tiny"}
    for name, cmd, sz, peak, _, _ in rows:
        if name == "tiny":
            continue
        extra = peak - base[cmd]
        print(f"  {name:10s} {cmd:8s} peak/weights {peak / sz['total']:5.2f}   attributable/weights "
              f"{extra / sz['total']:5.2f}   attributable/largest layer {extra / sz['largest_layer']:5.2f}")
    by = {(n, c): (sz, peak) for n, c, sz, peak, _, _ in rows}
    for cmd in ("logits", "validate"):
        (s2, p2), (s8, p8) = by[("medium-2L", cmd)], by[("medium-8L", cmd)]
        print(f"  {cmd:8s} 8 layers vs 2: weights x{s8['total'] / s2['total']:.2f}, peak RSS x{p8 / p2:.2f}, "
              f"attributable x{(p8 - base[cmd]) / (p2 - base[cmd]):.2f}")
    print(f"\nbench wall time {time.perf_counter() - t0:.1f} s")
    if a.clean:
        shutil.rmtree(CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
