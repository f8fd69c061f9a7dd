"""dsconvert's GGUF against llama.cpp's own pipeline (``convert_hf_to_gguf.py`` + ``llama_model_quantize``) on the
committed trained test model, measured through llama.cpp on held-out text (``dsconvert/data/validation.txt``,
64-token windows) against our float32 reference forward on the FP8 source. Prints, in one run (no assertions):

* per-tensor differences between the two Q4_K_M files (types, shapes, bytes) and the largest difference between
  the two F32 files (both keep the exact float32 product of each FP8 weight and its scale, so 0);
* Mean KLD of both pipelines for Q8_0, Q4_K_M, Q3_K_M and Q2_K (``dsconvert gguf --type T`` straight from the
  FP8 source; ``llama_model_quantize`` from the converter's F32 file) and which tensors differ in type or bytes;
* Mean KLD of Q4_K_M made from our F32 weights multiplied by ``1 + u``, ``u`` uniform in +-2^-9 (a BF16
  rounding-sized perturbation), for a few seeds: how much of a difference between the pipelines is the
  sensitivity of the K-quant rounding to the input at that scale.

Needs the llama.cpp source of the installed llama-cpp-python (``--llama-cpp DIR``; get it with
``pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps`` and unpack ``vendor/llama.cpp``).

Usage: python bench/bench_gguf_vs_converter.py --llama-cpp DIR [--work DIR] [--seeds 5] [--noise-exp 9] [--only-noise]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsconvert.convert.validate import forward_many  # noqa: E402
from dsconvert.convert.weights import CheckpointWeightSource  # noqa: E402
from dsconvert.model.metrics import compare_logits  # noqa: E402
from dsconvert.testing.trained import TRAINED_DIR  # noqa: E402

FTYPES = {"Q8_0": 7, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15}
WINDOW = 64

_CONVERT = """
import runpy, sys
sys.path[:0] = [{lcpp!r} + "/gguf-py", {lcpp!r}]
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"  # the test tokenizer is not in its table
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path({lcpp!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def _llama_quantize(llama_cpp, src: Path, dst: Path, ftype: int) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {src}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--noise-exp", type=int, default=9, help="perturbation size 2^-E (9: BF16 rounding)")
    ap.add_argument("--only-noise", action="store_true", help="skip the pipeline comparison")
    a = ap.parse_args()
    import gguf
    import llama_cpp
    from tokenizers import Tokenizer

    work = a.work or Path(tempfile.mkdtemp(prefix="dsconvert-vsconv-"))
    src = work / "src"
    if not src.is_dir():
        shutil.copytree(TRAINED_DIR, src)
        for f in ("modeling_deepseek.py", "configuration_deepseek.py"):  # the converter must not need remote code
            (src / f).unlink(missing_ok=True)
        for name in ("config.json", "tokenizer_config.json"):
            d = json.loads((src / name).read_text())
            d.pop("auto_map", None)
            if name == "tokenizer_config.json":
                d["tokenizer_class"] = "TokenizersBackend"
            (src / name).write_text(json.dumps(d))
    theirs, ours = work / "theirs-F32.gguf", work / "ours-F32.gguf"
    if not theirs.is_file():
        subprocess.run([sys.executable, "-c", _CONVERT.format(lcpp=str(a.llama_cpp.resolve())), str(src),
                        "--outfile", str(theirs), "--outtype", "f32"], check=True, capture_output=True)
    if not ours.is_file():
        subprocess.run([sys.executable, "-c", "from dsconvert.cli import main; main()", "gguf", str(src), "-o",
                        str(ours), "--type", "F32"], check=True, capture_output=True)

    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode((ROOT / "dsconvert/data/validation.txt")
                                                                  .read_text()).ids
    seqs = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(len(ids) // WINDOW)]
    ref = forward_many(CheckpointWeightSource(src), seqs, torch.float32, return_hidden=False)[0]

    def kld(path: Path) -> float:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, n_threads=2, logits_all=True,
                              verbose=False)
        try:
            out = []
            for r, s in zip(ref, seqs):
                llm.reset()
                llm.eval(s)
                got = torch.from_numpy(np.array(llm.scores[:len(s)], dtype=np.float32))
                out.append(compare_logits(r, got, torch.tensor(s))["mean_kld"])
            return float(np.mean(out))
        finally:
            llm.close()

    ta = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    worst = max(float(np.abs(np.asarray(ta[k].data, np.float32) - np.asarray(tb[k].data, np.float32)).max())
                for k in ta if k in tb)
    print(f"{len(seqs)} windows x {WINDOW} tokens; F32 files: tensors only in one: "
          f"{sorted(set(ta) ^ set(tb))}; largest |ours - theirs| {worst:.3g}")
    for name, ft in ({} if a.only_noise else FTYPES).items():
        qa, qb = work / f"ours-{name}.gguf", work / f"theirs-{name}.gguf"
        subprocess.run([sys.executable, "-c", "from dsconvert.cli import main; main()", "gguf", str(src), "-o",
                        str(qa), "--type", name, "--overwrite"], check=True, capture_output=True)
        _llama_quantize(llama_cpp, theirs, qb, ft)
        row = {"ours": kld(qa), "theirs": kld(qb)}
        ta_, tb_ = ({t.name: t for t in gguf.GGUFReader(q).tensors} for q in (qa, qb))
        types = [k for k in ta_ if k not in tb_ or ta_[k].tensor_type != tb_[k].tensor_type]
        data = [k for k in ta_ if k in tb_ and not np.array_equal(np.asarray(ta_[k].data), np.asarray(tb_[k].data))]
        print(f"{name:7s} tensors whose type differs: {types or 'none'}; whose bytes differ: {data or 'none'} "
              f"(of {len(ta_)})")
        print(f"{name:7s} Mean KLD ours {row['ours']:.4g}  llama.cpp converter {row['theirs']:.4g}  "
              f"ratio {row['ours'] / row['theirs']:.3f}", flush=True)
    lin = [t for t in gguf.GGUFReader(ours).tensors
           if t.name.startswith("blk.") and len(t.shape) >= 2 and "gate_inp" not in t.name]
    for seed in range(a.seeds):
        f = work / f"noise{seed}-F32.gguf"
        shutil.copy(ours, f)
        mm = np.memmap(f, mode="r+", dtype=np.uint8)
        g = np.random.default_rng(seed)
        for t in lin:
            w = mm[t.data_offset:t.data_offset + t.n_bytes].view(np.float32)
            w[:] = w * (1 + g.uniform(-2.0 ** -a.noise_exp, 2.0 ** -a.noise_exp, w.shape).astype(np.float32))
        mm.flush()
        del mm
        _llama_quantize(llama_cpp, f, work / f"noise{seed}-Q4_K_M.gguf", FTYPES["Q4_K_M"])
        print(f"Q4_K_M  Mean KLD ours x (1 + U(+-2^-{a.noise_exp})), seed {seed}: {kld(work / f'noise{seed}-Q4_K_M.gguf'):.4g}",
              flush=True)


if __name__ == "__main__":
    main()
