"""``dsconvert gguf`` quantization throughput vs llama.cpp, and peak RSS while writing a larger GGUF.

Prints (no assertions):
  * for Q8_0, Q4_K_M and Q2_K: seconds spent quantizing the same tensors (the quantizable tensors of an F32 GGUF
    of the fixture, each to the type llama.cpp's rules give it) by llama.cpp's ``llama_model_quantize``
    (``nthread`` = N, whole file including its I/O) and by dsconvert's torch quantizers
    (``torch.set_num_threads(N)``, quantization calls only), for N = 1 and 2, and the ratio ours / llama.cpp;
    then ``dsconvert gguf --threads N --kernel K`` end to end (in process: read the fixture, quantize, write and
    hash the file) for K = torch (dsconvert's kernels) and ggml (llama.cpp's ``ggml_quantize_chunk``, when the
    library is found), and its ratio to llama.cpp (llama.cpp's speed / ours: > 1 is faster than llama.cpp);
  * peak RSS of ``dsconvert gguf`` (a subprocess) writing the larger fixture as BF16 and Q8_0, next to the
    largest stacked expert tensor in BF16 and the output size.

Usage: python bench/bench_gguf.py [--layers 2] [--experts 16] [--hidden 1024] [--types Q8_0,Q4_K_M,Q2_K] [--threads 1,2]
       [--kernels torch,ggml]
Fixtures and outputs are cached under .bench/gguf/.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does; read when torch's OpenMP loads

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsconvert.convert import gguf_export as ge  # noqa: E402
from dsconvert.formats.gguf_types import file_type_id  # noqa: E402
from dsconvert.quant import ggml  # noqa: E402
from dsconvert.quant.ggml import native  # noqa: E402
from dsconvert.testing.fixtures import build_checkpoint  # noqa: E402

OUT = ROOT / ".bench" / "gguf"


def fixture(args) -> Path:
    d = OUT / f"fx-h{args.hidden}-l{args.layers}-e{args.experts}"
    if not (d / "config.json").is_file():
        shutil.rmtree(d, ignore_errors=True)
        h = args.hidden
        build_checkpoint(d, "tiny", hidden_size=h, intermediate_size=2 * h, moe_intermediate_size=h // 2,
                         num_hidden_layers=args.layers, first_k_dense_replace=1, num_attention_heads=8,
                         q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                         n_routed_experts=args.experts, num_experts_per_tok=4, n_group=4, topk_group=2,
                         vocab_size=8192, num_shards=4)
    return d


def llama_quantize(src: Path, dst: Path, ftype: str, nthread: int) -> float:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = file_type_id(ftype)
    p.nthread = nthread
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed")
    return time.perf_counter() - t


def ours_quantize(f32: Path, types: dict[str, str], nthread: int) -> tuple[float, int]:
    torch.set_num_threads(nthread)
    total, n_el = 0.0, 0
    for t in gguf.GGUFReader(f32).tensors:
        qt = types[t.name]
        if qt == "F32":
            continue
        x = torch.from_numpy(np.array(t.data, dtype=np.float32))
        s = time.perf_counter()
        ggml.quantize(x, qt)
        total += time.perf_counter() - s
        n_el += x.numel()
    return total, n_el


def peak_rss(src: Path, out: Path, qtype: str) -> dict:
    cmd = [sys.executable, "-m", "dsconvert.cli", "gguf", str(src), "-o", str(out), "--type", qtype, "--json", "-q",
           "--overwrite"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr)
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q2_K")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kernels", default="torch,ggml")
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    src = fixture(args)
    f32 = OUT / f"{src.name}-F32.gguf"
    if not f32.exists():
        ge.run(src, f32, ge.GGUFOptions(type="F32"), progress=False)
    ck = ge.open_checkpoint(src)
    for ftype in args.types.split(","):
        types = ge.make_plan(ck, ge.GGUFOptions(type=ftype), None).types
        for n in (int(x) for x in args.threads.split(",")):
            tl = llama_quantize(f32, OUT / f"llama-{ftype}.gguf", ftype, n)
            to, n_el = ours_quantize(f32, types, n)
            print(f"{ftype:7s} threads={n}: {n_el / 1e6:.1f} M elements quantized; llama.cpp {tl:.2f} s "
                  f"({n_el / tl / 1e6:.1f} M/s), dsconvert kernels {to:.2f} s ({n_el / to / 1e6:.2f} M/s); "
                  f"ratio time ours/llama.cpp = {to / tl:.2f}x, speed = {tl / to:.2f}x", flush=True)
            digests = set()
            for kernel in args.kernels.split(","):
                if kernel == "ggml" and native.load() is None:
                    print(f"{ftype:7s} threads={n}: --kernel ggml skipped (no ggml library)", flush=True)
                    continue
                torch.set_num_threads(n)
                out = OUT / f"ours-{ftype}-{kernel}.gguf"
                s = time.perf_counter()
                ge.run(src, out, ge.GGUFOptions(type=ftype, threads=n, kernel=kernel), overwrite=True, progress=False)
                te = time.perf_counter() - s
                digests.add(ge.sha256_file(out))
                print(f"{ftype:7s} threads={n}: dsconvert gguf --kernel {kernel} end to end {te:.2f} s; "
                      f"speed ours/llama.cpp = {tl / te:.2f}x", flush=True)
            print(f"{ftype:7s} threads={n}: the kernels' files are {'identical' if len(digests) == 1 else 'DIFFERENT'}",
                  flush=True)
    if args.no_rss:
        return
    plan = ge.make_plan(ck, ge.GGUFOptions(type="BF16"), None)
    largest = max(plan.nbytes.values())
    for qtype in ("BF16", "Q8_0"):
        rep = peak_rss(src, OUT / f"rss-{qtype}.gguf", qtype)
        rss = rep["peak_rss"]["bytes"]
        print(f"peak RSS writing {qtype}: {rss / 2**20:.0f} MiB for a {rep['output']['bytes'] / 2**20:.0f} MiB file; "
              f"largest tensor (BF16) {largest / 2**20:.0f} MiB; {rep['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
