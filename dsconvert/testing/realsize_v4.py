"""A checkpoint with DeepSeek-V4-Flash's real tensor dimensions, written streaming: ``make-fixture --arch v4
--preset real``.

What is real (docs/checkpoint-layout.md §11-§13): every tensor name, shape and dtype of V4-Flash for the layers
asked for (hidden 4096, vocab 129,280, 64 heads of 512, q_lora 1024, 8 output groups of rank 1024, routed experts
of 2048 inputs/outputs, 1 shared expert, top-6, indexer 64 x 128, mHC of 4 streams), taken from the layout table
of :mod:`dsconvert.formats.deepseek_v4` (the one the tiny fixtures check one-to-one against transformers'
``DeepseekV4ForCausalLM``):

* FP8 ``F8_E4M3`` linears with ``F8_E8M0`` power-of-two scales per 128x128 block;
* routed experts as FP4 e2m1 ``I8 [M, N/2]`` (two codes per byte) + ``F8_E8M0 [M, N/32]``;
* BF16 embeddings, head, norms, router, compressor/indexer projections; F32 mHC, sinks, ``ape``, router bias;
  I64 ``tid2eid`` in the hash-routed layers;
* the schedule: layer 0 sliding-window attention with hash routing (as Flash's layers 0-1), then CSA (ratio 4)
  and HCA (ratio 128) alternating with learned routing (as Flash's layers 2-42); ``--mtp`` adds ``mtp.0.*``
  (sliding, routed, e/h projections);
* shards of at most ~4.3 GB, the index with ``total_size``, the release's ``config.json`` keys with
  ``num_hidden_layers``, ``compress_ratios`` (MTP slot included), ``num_hash_layers``, ``n_routed_experts`` set to
  what was written, a 129,280-entry byte-level BPE tokenizer and the other release files.

What is synthetic: the values. FP8 bytes are slices of a 32 MiB pool quantized as V4 ships FP8 (per 128x128
block the smallest power-of-two scale with amax/scale <= 448); FP4 bytes are 16-byte-aligned slices (so each
32-element group keeps its amax code) of a pool quantized as V4 ships FP4 (per 32 the smallest power-of-two with
amax/scale <= 6). Neither holds a NaN code. Each scale byte is ``127 + e`` with ``e`` ``log2(std / pool std)``
rounded up or down at random (probability by distance), so dequantized weights have a standard deviation near
``1 / sqrt(in_features)`` (a quarter of that for ``wo_b`` and ``w2``), as the tiny fixtures initialise them.
Embedding and head are slices of a BF16 normal pool; every other tensor uses the tiny fixtures' initialiser.

Memory: the pools (~70 MiB) plus one chunk (16 MiB) and the largest small tensor (the CSA compressor's 4M
floats); never a whole embedding, head or expert.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UsageError
from ..formats import deepseek_v4 as v4
from ..quant.fp4_decode import dequant_fp4, quantize_fp4, quantize_fp8_e8m0
from .deepseek_v4 import V4Spec, _init, _seed, _shard_name, _write_extra_files, flash_spec, release_config
from .realsize import (CHUNK_BYTES, RELEASE_SHARD_BYTES, _bf16_chunks, _byte_chunks, _fp8_chunks, _Pools, _Row,
                       plan_rows, write_constructed_tokenizer, write_rows)

__all__ = ["RealV4Options", "real_v4_spec", "plan_real_v4", "write_real_v4_checkpoint", "flash_release_bytes"]

_FP4_POOL_BYTES = 4 * 2**20  # 8M e2m1 codes
_FP4_ALIGN = v4.FP4_GROUP // 2  # bytes per 32-code group
_BIG_FLOAT = 4 * 2**20  # float tensors above this many elements come from the BF16 pool


@dataclass(frozen=True)
class RealV4Options:
    """What to write: ``layers`` main layers (layer 0 sliding, then CSA / HCA alternating), the first
    ``hash_layers`` of them hash-routed, an MTP block or not, ``experts`` routed experts per layer. ``vocab``
    below the release's 129,280 only to keep tests small.

    Raises (from :meth:`validate`):
        UsageError: ``layers < 1``; ``hash_layers`` outside ``[0, layers]``; fewer than 8 experts (top-6 routing
            needs at least 6; 8 is the smallest multiple of 8 above); ``vocab`` below 262 (the byte-level
            tokenizer's floor).
    """

    layers: int = 2
    hash_layers: int = 1
    mtp: bool = False
    experts: int = 256
    vocab: int = 129_280
    seed: int = 0

    def validate(self) -> None:
        if self.layers < 1:
            raise UsageError(f"--layers {self.layers}: need at least one decoder layer")
        if not 0 <= self.hash_layers <= self.layers:
            raise UsageError(f"hash layers {self.hash_layers} must be between 0 and --layers {self.layers}")
        if self.experts < 8:
            raise UsageError(f"--experts {self.experts}: V4-Flash routes each token to 6 experts; write at least 8",
                             hint="use 8, 16, ... or 256 (the release)")
        if self.vocab < 262:
            raise UsageError(f"vocab {self.vocab} is below the byte-level tokenizer's 262 entries")


def real_v4_spec(opts: RealV4Options) -> V4Spec:
    """V4-Flash's :class:`V4Spec` (``flash_spec()``) cut to ``opts``: ratios ``[0, 4, 128, 4, ...]``."""
    opts.validate()
    ratios = (0,) + tuple((4, 128)[i % 2] for i in range(opts.layers - 1))
    return replace(flash_spec(), compress_ratios=ratios, num_hash_layers=opts.hash_layers,
                   n_routed_experts=opts.experts, num_nextn_predict_layers=int(opts.mtp), vocab_size=opts.vocab,
                   seed=opts.seed)


def _rows(g: v4.V4Geometry) -> tuple[list[_Row], dict[str, v4.Expected]]:
    rows: list[_Row] = []
    by_name: dict[str, v4.Expected] = {}
    for e in v4.expected_tensors(g):
        by_name[e.name] = e
        dt = v4.stored_dtype(e, g)
        if dt is None:
            rows.append(_Row(e.name, e.shape, e.family.dtype, e.storage))
            continue
        rows.append(_Row(e.name, v4.stored_shape(e, g), dt, "fp4" if dt == "I8" else "fp8"))
        rows.append(_Row(v4.scale_name(e.name), v4.scale_shape(e, g), "F8_E8M0", "scale", e.name))
    return rows, by_name


def plan_real_v4(opts: RealV4Options, shard_bytes: int = RELEASE_SHARD_BYTES) -> list[list[_Row]]:
    """The V4 tensors of ``opts`` (release order) split into shards by :func:`realsize.plan_rows`."""
    cfg = release_config(real_v4_spec(opts))
    return plan_rows(_rows(v4.geometry(cfg))[0], shard_bytes)


def flash_release_bytes() -> int:
    """Tensor bytes of V4-Flash's full layout (43 layers with its own schedule, 3 hash layers, MTP, 256 experts)
    as this writer stores them: what a real-size figure extrapolates to."""
    g = v4.geometry(release_config(flash_spec()))
    return sum(r.nbytes for r in _rows(g)[0])


def _fp8_release(x: torch.Tensor) -> torch.Tensor:
    """``[g, 16384]`` float32 groups to e4m3 codes, each group one 128x128 block with its e8m0 scale."""
    q, _ = quantize_fp8_e8m0(x.reshape(-1, 128), v4.FP8_BLOCK)
    return q


class _V4Pools:
    """The FP8 and BF16 pools of :class:`realsize._Pools` (FP8 quantized with e8m0 block scales), an FP4 pool, and
    the standard deviation of each pool's decoded codes (before any scale)."""

    def __init__(self, seed: int):
        self.base = _Pools(seed, _fp8_release)
        gen = torch.Generator().manual_seed(seed + 1)
        parts = []
        rows = 512  # of 2048 codes: 1M floats at a time
        for _ in range(_FP4_POOL_BYTES // (rows * 1024)):
            q, _ = quantize_fp4(torch.randn((rows, 2048), generator=gen))
            parts.append(q.view(torch.uint8).reshape(-1).numpy().copy())
        self.fp4 = np.concatenate(parts)
        one = torch.full((1, 2**20 // v4.FP4_GROUP), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        self.fp4_std = float(dequant_fp4(torch.from_numpy(self.fp4[: 2**19]).view(torch.int8).view(1, -1), one,
                                         torch.float32).std())
        self.fp8_std = float(torch.from_numpy(self.base.fp8[: 2**20]).view(torch.float8_e4m3fn).float().std())


def _scale_bytes(shape: tuple[int, ...], target_std: float, code_std: float, gen: torch.Generator) -> bytes:
    """e8m0 bytes ``127 + e`` with ``e`` ``log2(target_std / code_std)`` stochastically rounded per element."""
    x = math.log2(target_std / code_std)
    lo = math.floor(x)
    e = lo + (torch.rand(shape, generator=gen) < (x - lo)).to(torch.int32)
    return (e + 127).clamp(1, 254).to(torch.uint8).numpy().tobytes()


def _target_std(e: v4.Expected) -> float:
    std = 1.0 / math.sqrt(e.shape[1])
    return std * 0.25 if e.name.endswith(("wo_b.weight", "w2.weight")) else std


def _tid2eid_chunks(g: v4.V4Geometry, gen: torch.Generator, rows: int = 8192):
    """``[V, k]`` int64, ``k`` distinct experts per token id, ``rows`` token ids at a time."""
    for r0 in range(0, g.vocab, rows):
        n = min(rows, g.vocab - r0)
        yield torch.rand((n, g.experts), generator=gen).argsort(dim=1)[:, : g.experts_per_tok].contiguous()


def write_real_v4_checkpoint(out_dir: str | Path, opts: RealV4Options = RealV4Options(), *,
                             shard_bytes: int = RELEASE_SHARD_BYTES, chunk_bytes: int = CHUNK_BYTES,
                             on_shard: Callable[[str, int, float], None] | None = None) -> Path:
    """Write a real-dimension DeepSeek-V4-Flash checkpoint (FP8 + FP4 experts) to ``out_dir`` (created).

    Args:
        opts: layers / hash layers / MTP / experts / vocab / seed.
        shard_bytes: maximum tensor bytes per shard (default 4.3 GB).
        chunk_bytes: bytes generated and written at a time.
        on_shard: called as ``on_shard(file_name, file_bytes, seconds)`` after each shard.

    Returns the directory. Same ``opts``, same bytes.

    Raises:
        UsageError: invalid ``opts`` (see :class:`RealV4Options`).
    """
    spec = real_v4_spec(opts)
    cfg = release_config(spec)
    g = v4.geometry(cfg)
    rows, by_name = _rows(g)
    shards = plan_rows(rows, shard_bytes)
    pools = _V4Pools(opts.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def emit(f, r: _Row) -> None:
        gen = torch.Generator().manual_seed(_seed(spec.seed, r.name))
        if r.kind == "fp8":
            for mv in _fp8_chunks(pools.base, r.nbytes, chunk_bytes):
                f.write(mv)
        elif r.kind == "fp4":
            for mv in _byte_chunks(pools.fp4, pools.base.rng, r.nbytes, chunk_bytes, _FP4_ALIGN):
                f.write(mv)
        elif r.kind == "scale":
            e = by_name[r.of]
            code_std = pools.fp4_std if v4.stored_dtype(e, g) == "I8" else pools.fp8_std
            f.write(_scale_bytes(r.shape, _target_std(e), code_std, gen))
        elif r.kind == "index":
            for t in _tid2eid_chunks(g, gen):
                f.write(t.numpy().tobytes())
        elif r.dtype == "BF16" and math.prod(r.shape) > _BIG_FLOAT:  # embedding, head
            factor = 0.5 if by_name[r.name].family.role == "embed" else 2.0 / math.sqrt(r.shape[-1])
            for mv in _bf16_chunks(pools.base, math.prod(r.shape), factor, chunk_bytes):
                f.write(mv)
        else:
            t = _init(by_name[r.name], gen).to(torch.float32 if r.dtype == "F32" else torch.bfloat16)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())

    weight_map: dict[str, str] = {}
    total = 0
    for i, srows in enumerate(shards):
        t0 = time.perf_counter()
        fname = _shard_name(i + 1, len(shards))
        size = write_rows(out / fname, srows, emit)
        for r in srows:
            weight_map[r.name] = fname
            total += r.nbytes
        if on_shard:
            on_shard(fname, size, time.perf_counter() - t0)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_constructed_tokenizer(out, g.vocab)
    _write_extra_files(out)
    return out
