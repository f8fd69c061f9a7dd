"""Run every benchmark in sequence (``make bench``); each prints its own measured ratios. Slow: builds ~7 GB of
fixtures under .bench/ on first use."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_fp8_kernel.py", "bench_fp8_to_bf16.py", "bench_quantize.py", "bench_awq_gptq.py", "bench_quality.py",
           "bench_ggml_quants.py", "bench_gguf.py", "bench_forward_memory.py", "bench_inspect_671b.py",
           "bench_gguf_recipes.py", "bench_ray.py"]

if __name__ == "__main__":
    failed = []
    for s in SCRIPTS:
        print(f"\n===== {s}", flush=True)
        if subprocess.run([sys.executable, str(HERE / s)]).returncode != 0:
            failed.append(s)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
