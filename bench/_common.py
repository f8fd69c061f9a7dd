"""Helpers the bench scripts share: best-of timing, fixtures built once in a child process and cached under
``.bench/``, and running the CLI for its ``--json`` report.

Imports neither torch nor dsconvert: Linux carries a parent's ``ru_maxrss`` high-water mark into forked children,
so a fat parent would inflate every child report's ``peak_rss``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` timed calls of ``fn`` after one warm-up call, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cached_fixture(name: str, build: str, *args: str) -> Path:
    """``.bench/NAME``, built first (``python -c BUILD DIR ARGS...`` in a child) unless it has a config.json."""
    d = ROOT / ".bench" / name
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", build, str(d), *args], cwd=ROOT, check=True)
        print(f"built fixture {name} in {time.perf_counter() - t:.1f} s", flush=True)
    return d


def run_json(args: list[str], env: dict | None = None) -> dict:
    """``dsconvert ARGS --json -q`` in a child: its report, plus ``wall`` (seconds, interpreter start included).

    Exits the bench with the command's stderr tail when it fails."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "dsconvert.cli", *args, "--json", "-q"], cwd=ROOT,
                       env=None if env is None else {**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"dsconvert {' '.join(args)} -> {p.returncode}\n{p.stderr[-3000:]}")
    rep = json.loads(p.stdout)
    rep["wall"] = wall
    return rep
