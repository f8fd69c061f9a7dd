"""``dsconvert imatrix``: llama.cpp's importance matrix computed on the original (FP8 or BF16) checkpoint.

llama-imatrix needs the model loaded in llama.cpp, so people compute it on an already quantized file. Here the
reference forward (:mod:`dsconvert.model`) runs layer by layer over the calibration windows (one layer's weights
resident, routed experts one at a time, as ``validate``) and a hook sums the squared input activations of every
matrix llama.cpp's quantizer consults, under the GGUF tensor names of the ``deepseek2`` file that ``dsconvert
gguf`` writes (docs/gguf-deepseek2.md §3 and §6):

* every 2-D linear of a layer (``attn_q_a``, ``attn_q_b``, ``attn_kv_a_mqa``, ``attn_output``, ``ffn_gate_inp``,
  dense and shared-expert ``ffn_*``): one matrix, ``counts`` = tokens;
* routed experts (``ffn_{gate,up,down}_exps``): one matrix per expert, each summed over the tokens routed to it,
  ``counts`` per expert (an expert no token reached has count 0; llama-quantize then uses weights of 1);
* ``attn_k_b`` / ``attn_v_b`` (the absorbed MLA matrices, one per head): the per-head ``q_nope`` and the
  attention-weighted latent ``softmax(QK^T) @ c_kv``, ``ne0 * n_head`` values and one count, as llama-imatrix
  records a 3-D ``MUL_MAT``;
* ``output.weight`` only with ``process_output`` (llama-imatrix's ``--process-output``; off by default there too).

DeepSeek-V4 release checkpoints (:class:`~.imatrix_sums.V4ImatrixCollector`, the ``deepseek4`` names of
:mod:`dsconvert.formats.gguf_deepseek4`): the same per-linear and per-expert sums for every linear the V4 forward
runs and the layers' mHC mixing matrices (``hc_attn_fn``, ``hc_ffn_fn``; not ``output_hc_fn``, which is outside
``blk.*`` and llama-imatrix does not collect either); ``attn_output_a`` in the 2-D layout llama-quantize reads.

The file is the GGUF imatrix format current llama.cpp writes (``<name>.in_sum2`` float32 ``[n_mat, ne0]`` and
``<name>.counts`` float32 ``[n_mat, 1]``, keys ``general.type = imatrix``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``), or the legacy ``.dat`` on request (per entry
``(sum / count) * ncall`` with ``ncall = ceil(max count / chunk size)``; 1 where an expert got no token).
Source: llama.cpp ``tools/imatrix/imatrix.cpp`` (``collect_imatrix``, ``save_imatrix``, ``save_imatrix_legacy``)
and ``tools/quantize/quantize.cpp`` (how the file is read back).

Sums are accumulated in float64 and stored as float32 (llama-imatrix accumulates in float32).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, OutputExistsError, UnsupportedError, UsageError
from ..formats import gguf_imatrix as imf
from ..formats.gguf_imatrix import legacy_imatrix_bytes  # noqa: F401  (re-export)
from ..model.registry import V3, V4, architecture
from ..report import base_report, peak_rss_bytes
from .imatrix_sums import ImatrixCollector, V4ImatrixCollector
from .progress import ByteProgress
from .weights import LayerCachedSource
from .weights import CheckpointWeightSource

FORMATS = ("gguf", "dat")


@dataclass
class ImatrixOptions:
    """What ``dsconvert imatrix`` computes.

    Attributes:
        calib_data: text file (tokenized with SRC's tokenizer.json) or ``.json`` list of token-id lists; None:
            the bundled calibration text.
        num_samples: windows (llama-imatrix's chunks).
        seq_len: tokens per window (llama-imatrix's ``-c``; its default is 512).
        process_output: also collect ``output.weight`` (lm_head).
        fmt: ``gguf`` (current llama.cpp) or ``dat`` (legacy).
        dtype: ``float32`` or ``bfloat16`` computation.
    """

    calib_data: str | None = None
    num_samples: int = 32
    seq_len: int = 512
    process_output: bool = False
    fmt: str = "gguf"
    dtype: str = "float32"


def write_gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], datasets: list[str],
                       chunk_count: int, chunk_size: int) -> None:
    """Write ``entries`` as llama.cpp's GGUF imatrix (:func:`~dsconvert.formats.gguf_imatrix.write_gguf`) to
    ``path`` atomically (``.tmp``, fsync, rename)."""
    from .manifest import commit_tmp

    tmp = path.with_name(path.name + ".tmp")
    imf.write_gguf(tmp, entries, datasets, chunk_count, chunk_size)
    commit_tmp(tmp, path)


def estimate_peak_bytes(cfg: dict, num_samples: int, seq_len: int, bytes_per_value: int = 4, streams: int = 1
                        ) -> int:
    """Peak RAM of the run in bytes (GB = 1e9): the residual stream of every window (twice, in and out of a
    layer; ``streams`` copies of it: V4's ``hc_mult`` mHC streams), one layer's dense weights in the compute
    dtype plus one routed expert, the attention scores of one window ``(n_head, T, T)`` float32 times three, and
    the float64 sums of one layer's entries."""
    h, T = int(cfg["hidden_size"]), int(seq_len)
    heads = int(cfg.get("num_attention_heads", 1))
    inter = int(cfg.get("intermediate_size", 0))
    moe_i = int(cfg.get("moe_intermediate_size", 0) or 0)
    n_exp = int(cfg.get("n_routed_experts", 0) or 0)
    q_lora = int(cfg.get("q_lora_rank") or 0)
    kv = int(cfg.get("kv_lora_rank", 0))
    dn, dr, dv = (int(cfg.get(k, 0)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    attn = h * q_lora + q_lora * heads * (dn + dr) + h * (kv + dr) + kv * heads * (dn + dv) + heads * dv * h
    mlp = max(3 * h * inter, 3 * h * moe_i * (int(cfg.get("n_shared_experts", 0) or 0) + 1))
    weights = (attn + mlp) * bytes_per_value
    stream = 2 * streams * num_samples * T * h * bytes_per_value
    scores = 3 * heads * T * T * 4
    sums = 8 * (n_exp * (2 * h + moe_i) + 8 * h + heads * (dn + kv))
    return int(weights + stream + scores + sums + 0.5e9)


def run_imatrix(src: Path, out: Path, opts: ImatrixOptions, *, overwrite: bool = False, dry_run: bool = False,
                progress: bool | None = None, executor=None) -> dict:
    """``dsconvert imatrix SRC -o FILE``: compute and write the importance matrix (see the module notes).

    ``executor``: a :class:`~.executor.RayExecutor` runs each MoE layer's routed experts, a group per unit, on
    the cluster (:class:`~.calib_ray.RayImatrixExperts`); None or a local executor: all here. Same bytes.

    Raises:
        OutputExistsError (exit 2): ``out`` exists and ``overwrite`` is not set (checked before any work).
        UsageError (exit 2): unknown ``fmt``, unreadable calibration data, ``--ray`` on a DeepSeek-V4 source.
        BadInputError / UnsupportedError (exit 3): the checkpoint fails pre-flight (as for every command), is not
            DeepSeek V2/V3/V4, or the sums are not finite (NaN/Inf activations).
    """
    from .calib_data import calibration_ids
    from .preflight import check_output_writable
    from .weights import compute_dtype as _dtype

    t0 = time.perf_counter()
    if opts.fmt not in FORMATS:
        raise UsageError(f"--output-format {opts.fmt!r}", hint="use gguf (current llama.cpp) or dat (legacy)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"-o {out}: the file exists", hint="add --overwrite to replace it, or choose another -o")
    check_output_writable(out)
    dtype = _dtype(opts.dtype)
    source = CheckpointWeightSource(src)
    cfg = source.config
    arch = architecture(cfg)
    if arch not in (V3, V4):
        raise UnsupportedError(f"{src}: imatrix supports DeepSeek V2/V3/V4; model_type {cfg.get('model_type')!r} "
                               "has no llama.cpp tensor names here", hint="run imatrix on a DeepSeek checkpoint")
    v4 = arch is V4
    if v4 and executor is not None and executor.remote:
        raise UsageError("imatrix --ray: DeepSeek-V4 sources run on one machine for now (the Ray expert units "
                         "replay V3's MoE)", hint="drop --ray (the V4 imatrix streams one layer at a time)")
    ids, _ = calibration_ids(source.ck, opts.calib_data, opts.num_samples, opts.seq_len)
    windows_sha = hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()
    dataset = str(opts.calib_data) if opts.calib_data else "dsconvert bundled calibration text"
    n_layer = int(cfg["num_hidden_layers"])
    peak = estimate_peak_bytes(cfg, len(ids), max(len(s) for s in ids), 2 if dtype == torch.bfloat16 else 4,
                               streams=int(cfg.get("hc_mult", 1)) if v4 else 1)
    rep = base_report("imatrix")
    rep.update({"source": str(src), "output": str(out), "format": opts.fmt, "options": asdict(opts),
                "calibration": {"name": dataset, "windows": len(ids), "tokens": sum(len(s) for s in ids),
                                "windows_sha256": windows_sha},
                "layers": n_layer, "estimated_peak_memory_bytes": peak, "dry_run": dry_run})
    if dry_run:
        return rep

    n_expert = int(cfg.get("n_routed_experts", 0) or 0)
    col = (V4ImatrixCollector if v4 else ImatrixCollector)(cfg, n_expert)
    model = arch.model()(LayerCachedSource(source), dtype=dtype)
    seqs = [torch.tensor(s, dtype=torch.long) for s in ids]
    pos = [torch.arange(len(s)) for s in ids]
    remote = executor is not None and executor.remote
    with ByteProgress(n_layer, "imatrix", unit="layers", enabled=progress) as prog, torch.no_grad(), \
            contextlib.ExitStack() as stack:
        experts = None
        if remote:
            from .calib_ray import RayImatrixExperts

            stack.enter_context(executor.session())
            experts = stack.enter_context(RayImatrixExperts(executor, str(Path(src).resolve()), dtype, col, prog,
                                                            out.with_name(out.name + ".dsconvert-ray")))
        hs = [model.embed(i) for i in seqs]
        for layer in range(n_layer):
            prog.describe(f"layer {layer + 1}/{n_layer}", boundary=True)
            if v4:  # hash-routed layers need the token ids; no absorbed per-head matrices
                hs = model.layer_forward_many(layer, hs, pos, on_linear=col.on_linear, token_ids=seqs,
                                              on_mix=col.on_mix)
            else:
                hs = model.layer_forward_many(layer, hs, pos, on_linear=col.on_linear, on_heads=col.on_heads,
                                              moe_experts=None if experts is None else experts.layer(layer))
            prog.advance(1)
        if opts.process_output:
            for h in hs:
                model.head(h, on_linear=col.on_linear)
    entries = col.entries()
    bad = [n for n, (v, _) in entries.items() if not np.isfinite(v).all()]
    if bad:
        raise BadInputError(f"{src}: non-finite importance sums for {', '.join(bad[:4])}"
                            + (" ..." if len(bad) > 4 else ""),
                            hint="the weights or activations hold NaN/Inf; run `dsconvert validate` on SRC to find "
                                 "the layer")
    chunk_size = max(len(s) for s in ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    if opts.fmt == "gguf":
        write_gguf_imatrix(out, entries, [dataset], len(ids), chunk_size)
    else:
        from .manifest import write_atomic

        write_atomic(out, legacy_imatrix_bytes(entries, len(ids), chunk_size, dataset))
    unreached = {n: int((c == 0).sum()) for n, (_, c) in entries.items() if (c == 0).any()}
    rep.update({"entries": len(entries), "bytes": out.stat().st_size,
                "experts_without_tokens": unreached,
                "expert_tokens": {n: {"min": int(c.min()), "max": int(c.max())} for n, (_, c) in entries.items()
                                  if c.size > 1},
                "peak_rss": peak_rss_bytes(), "seconds": round(time.perf_counter() - t0, 3)})
    if remote:
        rep["executor"] = executor.report()
    return rep
