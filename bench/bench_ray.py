"""``--ray``: speed-up of 2 local worker nodes over 1, and the cost of Ray against a local run.

Starts a throw-away cluster on 127.0.0.1 (a head with no CPUs, so it only schedules, plus worker nodes of
``--cpus`` CPUs each; dsconvert.testing.raycluster), then runs the same command on one fixture:

  * locally (``--workers 1``: one shard at a time in this machine's process);
  * ``--ray`` with 1 worker node, then with 2 (a node is added between the runs);

and prints the wall time of each command's own work (its report's ``seconds``), the speed-up 2 nodes / 1 node,
Ray 1 node / local, the units per node, and checks that every output is byte-identical to the local one.
No assertions on time. On a machine with fewer cores than nodes x CPUs the nodes share cores and the
speed-up says so; on a real cluster each node brings its own disks and cores.

For ``gptq``/``awq``/``imatrix`` the units are each MoE layer's routed expert groups; the rest of every layer runs
on the driver, so the speed-up is bounded by that share (Amdahl).

Usage: python bench/bench_ray.py [--command fp8-to-bf16|gguf|gptq|awq|imatrix] [--cpus 1] [--shards 8]
Fixtures are cached under .bench/.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT, cached_fixture, run_json

sys.path.insert(0, str(ROOT))

BUILD = """
import sys
from dsconvert.testing.fixtures import build_checkpoint
build_checkpoint(sys.argv[1], "tiny", hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                 num_hidden_layers=4, n_routed_experts=16, vocab_size=16384, tokenizer=True,
                 num_shards=int(sys.argv[2]), num_nextn_predict_layers=0)
"""


def fixture(shards: int) -> Path:
    return cached_fixture(f"ray-h1024-{shards}sh-fp8", BUILD, str(shards))


def run(args: list[str]) -> dict:
    return run_json(args, env={"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"})


def digest(path: Path) -> str:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--command", default="fp8-to-bf16", choices=["fp8-to-bf16", "gguf", "gptq", "awq", "imatrix"],
                    help="gptq/awq: quantize --gptq/--awq (expert groups as units); imatrix: imatrix")
    ap.add_argument("--cpus", type=int, default=1, help="CPUs per worker node")
    ap.add_argument("--shards", type=int, default=8)
    a = ap.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("skipped: the ray package is not installed (pip install 'dsconvert[ray]')")
        return
    from dsconvert.testing.raycluster import LocalCluster

    src = fixture(a.shards)
    work = ROOT / ".bench" / "ray-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    def cmd(name: str) -> tuple[list[str], Path]:
        if a.command == "gguf":
            out = work / name / "m.gguf"
            out.parent.mkdir()
            return ["gguf", str(src), "-o", str(out), "--type", "Q8_0"], out
        if a.command in ("gptq", "awq"):
            out = work / name
            return ["quantize", str(src), "-o", str(out), f"--{a.command}", "--group-size", "32", "--num-samples", "8", "--seq-len",
                    "128"], out
        if a.command == "imatrix":
            out = work / name / "imatrix.gguf"
            out.parent.mkdir()
            return ["imatrix", str(src), "-o", str(out), "--num-samples", "8", "--seq-len", "128"], out
        out = work / name
        return ["fp8-to-bf16", str(src), "-o", str(out), "--workers", "1"], out

    args, out_local = cmd("local")
    t0 = time.perf_counter()
    local = run(args)
    local.setdefault("seconds", round(time.perf_counter() - t0, 3))
    print(f"{a.command} local: {local['seconds']:.2f} s", flush=True)
    results = {}
    with LocalCluster(workers=1, cpus=a.cpus, head_cpus=0) as c:
        for nodes in (1, 2):
            if nodes == 2:
                c.add_node(1)
            args, out = cmd(f"ray{nodes}")
            rep = run([*args, "--ray", c.address])
            ex = rep["executor"]
            same = digest(out) == digest(out_local)
            results[nodes] = rep["seconds"]
            per = ", ".join(f"{len(n['units'])} units {n['mb_per_s']} MB/s" for n in ex["nodes_used"])
            print(f"{a.command} --ray, {nodes} worker node(s) x {a.cpus} CPU: {rep['seconds']:.2f} s "
                  f"({len(ex['units'])} units; {per}); byte-identical to local: {same}", flush=True)
    print(f"speed-up 2 nodes / 1 node: {results[1] / results[2]:.2f}x; "
          f"ray 1 node vs local: {local['seconds'] / results[1]:.2f}x (cores here: {os.cpu_count()})")


if __name__ == "__main__":
    main()
