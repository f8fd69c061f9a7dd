"""A *trained* tiny DeepSeek-V3 in the release layout, for the tests and benches that speak about quality.

Random fixtures (:mod:`dsconvert.testing.fixtures`) test layout; their logits are noise, routing flips dominate
any KLD and AWQ/GPTQ comparisons on them say little about real models. This module builds the one checkpoint
whose weights were trained on real text:

* **Corpus** (:func:`training_corpus`): the reference-manual topics of the running Python's
  ``pydoc_data/topics.py`` (English prose with code, PSF licence) minus the topics the bundled calibration set
  uses, plus the source of a fixed list of standard-library modules (PSF licence). Nothing is downloaded.
* **Calibration set** (:func:`calibration_text`, committed as ``dsconvert/data/calibration.txt``): other topics
  and other modules' source, disjoint from the training corpus and from ``dsconvert/data/validation.txt``
  (the held-out evaluation text, English prose about rivers that no Python file contains).
* **Model** (:data:`TRAINED_SPEC`): 3 decoder layers (1 dense + 2 MoE with 8 routed experts, top-2, and a
  shared expert), hidden 256, every in_features a multiple of 128 (so W4A16 g64 and g128 apply to every
  linear), trained with transformers' ``DeepseekV3ForCausalLM`` in float32 (AdamW, fixed seed, one thread),
  the router's ``e_score_correction_bias`` updated by DeepSeek-V3's auxiliary-loss-free balancing rule
  (``bias += gamma * sign(mean load - expert load)``, DeepSeek-V3 technical report section 2.1.2).
* **Written** with :func:`dsconvert.testing.fixtures.build_checkpoint` (the release layout: FP8 blocks +
  float32 ``weight_scale_inv`` by DeepSeek's rule, F32 router bias, BF16 norms/embeddings, an MTP block with
  the fixture's random initialisation since transformers does not train it, a BPE ``tokenizer.json`` trained
  on the corpus).

The result is committed under ``tests/data/trained-tiny-v3`` (a few MB: reproducing it takes minutes of CPU,
loading it milliseconds, and the quality guards must not move with a CPU's float rounding). Rebuild with::

    python -m dsconvert.testing.trained tests/data/trained-tiny-v3

``report.json`` in that directory records the corpus hash, the training loss and the held-out perplexities.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .fixtures import FixtureSpec, build_checkpoint, make_config, tensor_table

DATA = Path(__file__).resolve().parent.parent / "data"
#: Where the committed trained checkpoint lives (in the source tree, next to the tests that use it).
TRAINED_DIR = Path(__file__).resolve().parent.parent.parent / "tests" / "data" / "trained-tiny-v3"

TRAINED_SPEC = FixtureSpec(
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=3,
    first_k_dense_replace=1, num_nextn_predict_layers=1, num_attention_heads=4, q_lora_rank=128,
    kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, vocab_size=512, num_shards=2,
    seed=12, outlier_channels=0)

#: Standard-library modules whose source is training text / calibration text (disjoint lists).
TRAIN_MODULES = ("textwrap", "shlex", "heapq", "string", "fractions", "statistics", "glob", "queue", "calendar",
                 "difflib", "contextlib", "functools", "dataclasses", "enum", "argparse")
CALIB_MODULES = ("colorsys", "bisect", "fnmatch", "graphlib")
#: Every CALIB_EVERY-th reference topic (sorted by name) goes to the calibration set, the rest to training.
CALIB_EVERY = 6
CALIB_CHARS = 24_000  # ~7k tokens with the trained tokenizer

# training hyper-parameters (float32, one thread: deterministic on one machine)
STEPS, BATCH, SEQ, LR, WARMUP, BIAS_GAMMA = 360, 12, 128, 3e-3, 30, 1e-3


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _module_source(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(name)
    return Path(spec.origin).read_text(encoding="utf-8")


def training_corpus() -> str:
    """The training text: the reference topics not used for calibration, then the TRAIN_MODULES' source."""
    parts = [t for i, (_, t) in enumerate(_topics()) if i % CALIB_EVERY != 0]
    parts += [_module_source(m) for m in TRAIN_MODULES]
    return "\n\n".join(parts)


def calibration_text() -> str:
    """The calibration set's text: every CALIB_EVERY-th reference topic (prose with examples) up to
    ``CALIB_CHARS * 2/3`` characters, then the CALIB_MODULES' source (code), ``CALIB_CHARS`` in all."""
    prose, n = [], 0
    for i, (_, t) in enumerate(_topics()):
        if i % CALIB_EVERY == 0 and n < CALIB_CHARS * 2 // 3:
            prose.append(t.strip())
            n += len(t)
    code = "\n\n".join(_module_source(m) for m in CALIB_MODULES)
    text = "\n\n".join(prose)[: CALIB_CHARS * 2 // 3] + "\n\n" + code
    return text[:CALIB_CHARS]


def _hf_config(spec: FixtureSpec):
    import transformers

    cfg = make_config(spec)
    cfg.pop("quantization_config", None)
    for k in ("architectures", "auto_map", "torch_dtype", "transformers_version"):
        cfg.pop(k, None)
    return transformers.DeepseekV3Config(**cfg, attn_implementation="eager")


def _checkpoint_names(state: dict) -> dict:
    """transformers 5 stores each layer's experts fused (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I));
    split them into the release's per-expert names."""
    out = {}
    for k, v in state.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            pre, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{pre}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def train(out_dir: str | Path, steps: int = STEPS, log=print) -> dict:
    """Train the model on :func:`training_corpus` and write it to ``out_dir`` in the release layout.

    Returns the training report (also ``out_dir/report.json``): corpus sha256 and size, loss curve, seconds,
    held-out perplexity on ``validation.txt`` and on the calibration text.
    """
    import transformers
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    transformers.set_seed(0)
    out = Path(out_dir)
    spec = TRAINED_SPEC
    corpus = training_corpus()
    # the tokenizer first: a throwaway random-weights build gives tokenizer.json trained on the corpus
    tmp_tok = out.with_name(out.name + ".tok")
    from .release_files import write_tokenizer

    tmp_tok.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tmp_tok, spec.vocab_size, corpus)
    tok = Tokenizer.from_file(str(tmp_tok / "tokenizer.json"))
    ids = torch.tensor(tok.encode(corpus).ids, dtype=torch.long)
    log(f"corpus: {len(corpus)} chars, {ids.numel()} tokens")

    cfg = _hf_config(spec)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    model.train()
    routers = [m for m in model.modules() if isinstance(m, transformers.models.deepseek_v3.modeling_deepseek_v3
                                                        .DeepseekV3TopkRouter)]
    loads: list[torch.Tensor] = []

    def hook(mod, inp, outp):
        loads.append(torch.bincount(outp[2].flatten(), minlength=mod.num_experts).float())

    for r in routers:
        r.register_forward_hook(hook)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    curve = []
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([ids[s: s + SEQ + 1] for s in starts.tolist()])  # (B, SEQ+1)
        loads.clear()
        loss = _lm_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # auxiliary-loss-free load balancing (DeepSeek-V3 report, section 2.1.2)
            for r, load in zip(routers, loads):
                r.e_score_correction_bias += BIAS_GAMMA * torch.sign(load.mean() - load)
        if step % 20 == 0 or step == steps - 1:
            curve.append([step, round(float(loss), 4)])
            log(f"step {step}: loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.eval()
    state = _checkpoint_names({k: v.detach().float() for k, v in model.state_dict().items()})
    # the MTP block and e_score_correction_bias: the bias trained above; the MTP block keeps the fixture's init
    names = {n for n, _, _ in tensor_table(spec)}
    values = {k: v for k, v in state.items() if k in names}
    missing = sorted(n for n in names if n not in values and not n.startswith(f"model.layers.{spec.num_hidden_layers}."))
    if missing:
        raise RuntimeError(f"trained state lacks {missing[:5]}")
    if out.exists():
        shutil.rmtree(out)
    build_checkpoint(out, spec, values=values, tokenizer_text=corpus)
    shutil.rmtree(tmp_tok)
    (out / "README.md").write_text(
        "# trained-tiny-v3\n\nA tiny DeepSeek-V3 (3 layers, 8 experts) trained by `python -m "
        "dsconvert.testing.trained` on Python's reference-manual topics and standard-library source (PSF "
        "licence), written in the FP8 release layout. The MTP block is untrained. See report.json.\n")
    (out / "LICENSE").write_text("Weights trained on text under the Python Software Foundation License; "
                                 "no further restrictions.\n")
    rep = {
        "spec": asdict(replace(spec, extra_config={})),
        "corpus": {"chars": len(corpus), "tokens": int(ids.numel()),
                   "sha256": hashlib.sha256(corpus.encode()).hexdigest(),
                   "python": sys.version.split()[0], "modules": list(TRAIN_MODULES)},
        "training": {"steps": steps, "batch": BATCH, "seq": SEQ, "lr": LR, "seconds": round(seconds, 1),
                     "loss_curve": curve},
        "heldout_ppl": heldout_ppl(out),
    }
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def _lm_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def heldout_ppl(ckpt: Path, seq: int = 128) -> dict:
    """Perplexity of the reference forward of ``ckpt`` on the bundled evaluation and calibration texts
    (windows of ``seq`` tokens, as ``validate`` cuts them)."""
    from ..convert.validate import forward_many, tokenize, weight_source

    out = {}
    for name, text in (("validation.txt", (DATA / "validation.txt").read_text(encoding="utf-8")),
                       ("calibration.txt", calibration_text())):
        ids = tokenize(ckpt, text)
        seqs = [ids[i: i + seq] for i in range(0, len(ids), seq)]
        seqs = [s for s in seqs if len(s) >= 2][:16]
        logits, _ = forward_many(weight_source(ckpt), seqs, torch.float32, return_hidden=False)
        nll, n = 0.0, 0
        for lg, s in zip(logits, seqs):
            lp = torch.log_softmax(lg[:-1].double(), -1)
            t = torch.tensor(s[1:])
            nll -= float(lp[torch.arange(len(t)), t].sum())
            n += len(t)
        out[name] = {"tokens": n, "ppl": round(math.exp(nll / n), 3)}
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else TRAINED_DIR
    print(json.dumps(train(target, steps=int(sys.argv[2]) if len(sys.argv) > 2 else STEPS), indent=2))
