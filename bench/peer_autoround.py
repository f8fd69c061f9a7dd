"""Intel auto-round (the peer of ``quantize --method autoround``) on the trained tiny DeepSeek-V3, on the same
calibration windows as dsconvert (bundled calibration text, ``--num-samples``/``--seq-len``/``--calib-seed``).

Needs ``auto-round`` importable by the interpreter running this file (keep it out of the project venv:
``python -m venv /tmp/arvenv --system-site-packages && /tmp/arvenv/bin/pip install auto-round``). The trained
FP8 model is first converted to BF16 by ``dsconvert fp8-to-bf16`` (run with ``--dsconvert-python``), loaded by
transformers' ``DeepseekV3ForCausalLM`` and quantized by ``AutoRound`` (W4A16, the group size given, ``iters``,
batch size 8, its defaults otherwise), exported in the GPTQ layout (``auto_gptq``), which ``dsconvert validate``
reads. Prints one JSON line: ``{"group", "iters", "seconds" (AutoRound quantize + save), "out"}``.

    /tmp/arvenv/bin/python bench/peer_autoround.py --out /tmp/ar-peer --group 64 \\
        --dsconvert-python /work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _dsconvert(py: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([py, "-c", "from dsconvert.cli import main; main()", *args], env=env, capture_output=True,
                       text=True, check=True)
    return p.stdout


def calibration_windows(py: str, src: Path, num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """dsconvert's own calibration windows (token ids), computed by the project's interpreter."""
    code = ("import json,sys; from dsconvert.formats.checkpoint import open_checkpoint; "
            "from dsconvert.convert.calib_data import calibration_ids; "
            f"ids,_=calibration_ids(open_checkpoint(sys.argv[1]), None, {num_samples}, {seq_len}, {seed}); "
            "print(json.dumps([list(map(int,s)) for s in ids]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([py, "-c", code, str(src)], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def run_peer(src: Path, out: Path, group: int, iters: int, py: str, num_samples: int = 8, seq_len: int = 128,
             seed: int = 0) -> dict:
    import torch
    from auto_round import AutoRound
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    bf16 = out.parent / (out.name + "-bf16")
    if not (bf16 / "config.json").is_file():
        _dsconvert(py, "fp8-to-bf16", str(src), "-o", str(bf16), "--quiet")
    ids = calibration_windows(py, src, num_samples, seq_len, seed)
    model = DeepseekV3ForCausalLM.from_pretrained(str(bf16), dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(bf16))
    data = [torch.tensor([s], dtype=torch.long) for s in ids]
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme="W4A16", group_size=group, iters=iters, dataset=data,
                   seqlen=seq_len, nsamples=len(data), batch_size=8, device_map="cpu")
    ar.quantize_and_save(str(out), format="auto_gptq")
    return {"group": group, "iters": iters, "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(REPO / "tests/data/trained-tiny-v3"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--dsconvert-python", default=sys.executable)
    a = ap.parse_args()
    print(json.dumps(run_peer(Path(a.src), Path(a.out), a.group, a.iters, a.dsconvert_python, seed=a.calib_seed)))


if __name__ == "__main__":
    main()
