"""GGUF sizes of the 671B DeepSeek-V3/R1 for each ``--recipe`` and llama.cpp mix, from ``gguf --dry-run`` on the
full release layout (headers only, sparse shards: ~200 MB of disk), against the published files of the same
types (docs/gguf-deepseek2.md §6). Prints, measured in one run (no assertions): our planned size, the published
size and their ratio, plus bits per weight.

Usage: python bench/bench_gguf_recipes.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsconvert.testing.fixtures import build_checkpoint, real_v3_spec, write_headers_only  # noqa: E402

#: published sizes (GB, 1e9 bytes) of R1 files of these types
PUBLISHED = {"Q4_K_M": 404, "Q2_K": 245, "deepseek-IQ1_S": 131, "deepseek-IQ1_M": 158, "deepseek-IQ2_XXS": 183,
             "deepseek-Q2_K_XL": 212}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="dsconvert-recipes-"))
    src = work / "DeepSeek-V3-671B-headers"
    if not (src / "config.json").is_file():
        write_headers_only(src, real_v3_spec())
        tiny = build_checkpoint(work / "tok", "tiny")  # a tokenizer.json (the plan only counts the vocab)
        for f in tiny.glob("tokenizer*.json"):
            shutil.copy(f, src / f.name)
    exe = [sys.executable, "-c", "from dsconvert.cli import main; main()"]
    print(f"{'what':20s} {'ours GB':>9s} {'published':>9s} {'ratio':>6s} {'bpw':>6s}  status")
    for what in PUBLISHED:
        flag = ["--recipe", what] if what.startswith("deepseek-") else ["--type", what]
        r = subprocess.run([*exe, "gguf", str(src), *flag, "--dry-run", "--json"], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{what:20s} {'-':>9s} {PUBLISHED[what]:9d} {'-':>6s} {'-':>6s}  "
                  f"refused: {r.stderr.strip().splitlines()[0] if r.stderr.strip() else r.returncode}")
            continue
        p = json.loads(r.stdout)["plan"]
        gb = p["total_size"]["gb"]
        print(f"{what:20s} {gb:9.1f} {PUBLISHED[what]:9d} {gb / PUBLISHED[what]:6.2f} {p['bpw']:6.3f}  ok")


if __name__ == "__main__":
    main()
