"""A checkpoint with the real DeepSeek-V3/R1 tensor dimensions, written streaming: ``make-fixture --preset real``.

What is real (docs/checkpoint-layout.md sections 1-3):

* every tensor name, shape and dtype of the release for the layers asked for: hidden 7168, vocab 129,280,
  q_lora 1536, kv_lora 512, rope 64, nope 128, v 128, 128 heads, dense intermediate 18432, routed experts of
  2048 (256 by default) plus 1 shared expert, n_group 8, topk_group 4, top-8; ``kv_a_proj_with_mqa`` [576, 7168]
  with its partial [5, 56] scale grid; BF16 embeddings, norms, router, head and ``eh_proj``; F32 router bias;
* FP8 ``float8_e4m3fn`` weights with F32 ``weight_scale_inv`` on the ``(ceil(M/128), ceil(N/128))`` grid;
* shards of at most ~4.3 GB (the release's typical shard), named ``model-0000k-of-00000N.safetensors`` (5-digit
  index, **6-digit** total), tensors laid out inside a shard the way ``safetensors.torch.save_file`` orders them
  (dtype alignment descending, then name); a weight whose scale would end a shard gets its scale in the next shard
  (the release has such cross-shard pairs, e.g. ``model.layers.39.mlp.experts.92.gate_proj``);
* ``model.safetensors.index.json`` with ``metadata.total_size``, ``config.json`` (the R1 config with
  ``num_hidden_layers``, ``first_k_dense_replace``, ``num_nextn_predict_layers`` and ``n_routed_experts`` set to
  what was written), a 129,280-entry byte-level BPE ``tokenizer.json`` and the other release files.

What is synthetic: the values. Generating DeepSeek's quantization per element (float32 noise, 128x128 amax,
divide, cast) runs at ~0.1 GB/s here, so FP8 bytes are slices, at random offsets, of a 32 MiB pool that *was*
quantized as DeepSeek does (zero-padded 16384-element groups scaled so their amax maps to 448): the byte
histogram of a real block, never a NaN byte (0x7F/0xFF). Each block's scale is ``c / sqrt(in_features)`` times a
random factor in [0.75, 1.25], so dequantized weights have a standard deviation near ``0.5 / sqrt(in_features)``
(a quarter of that for ``o_proj`` / ``down_proj``, as the small fixtures do). BF16 matrices are slices of a
standard-normal pool times a per-kind factor; norms, router and bias use the small fixtures' initialisers.
Layout and throughput are real; the model computes nothing meaningful.

Memory: the two pools (64 MiB) plus one chunk (``chunk_bytes``, 16 MiB) and the largest small tensor; never a
whole tensor of the big kinds. The file is written header first, then each tensor's bytes in order.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from dsconvert.errors import UsageError

from .fixtures import (FixtureSpec, _init, _seed, _shard_name, _write_extra_files, make_config, real_v3_spec,
                       tensor_table)
from .release_files import SPECIAL_TOKENS, write_tokenizer_config

__all__ = ["RealOptions", "real_spec", "plan_real", "write_real_checkpoint", "write_constructed_tokenizer",
           "RELEASE_SHARD_BYTES"]

RELEASE_SHARD_BYTES = 4_300_000_000  # the release's typical shard (largest 4,302,384,963 B)
CHUNK_BYTES = 16 * 2**20
_FP8_POOL_BYTES = 32 * 2**20
_BF16_POOL_ELEMS = 16 * 2**20
_FP8_GROUP = 128 * 128
_FP8_STD_OVER_AMAX = 1 / 4.2  # std / amax of 16384 normal samples (amax ~ 4.2 sigma)
# safetensors.torch.save_file lays a file out by dtype alignment descending (the Rust Dtype enum order), then name.
_DTYPE_RANK = {"I8": 5, "F8_E4M3": 7, "F8_E8M0": 8, "BF16": 12, "F32": 15, "I64": 17}
_ST_SIZE = {"I8": 1, "F8_E4M3": 1, "F8_E8M0": 1, "BF16": 2, "F32": 4, "I64": 8}


@dataclass(frozen=True)
class RealOptions:
    """What to write: ``layers`` decoder layers of which the first ``dense_layers`` are dense, an MTP block
    (layer index ``layers``) or not, and ``experts`` routed experts per MoE layer.

    Raises (from :meth:`validate`):
        UsageError: ``layers < 1``, ``dense_layers`` outside ``[0, layers]``, or an expert count that the
            release's grouped routing (8 groups, top-4 groups, top-8 experts) cannot route: it must be a multiple
            of 8 and at least 16.
    """

    layers: int = 2
    dense_layers: int = 1
    mtp: bool = False
    experts: int = 256
    seed: int = 0

    def validate(self) -> None:
        if self.layers < 1:
            raise UsageError(f"--layers {self.layers}: need at least one decoder layer")
        if not 0 <= self.dense_layers <= self.layers:
            raise UsageError(f"--dense-layers {self.dense_layers} must be between 0 and --layers {self.layers}")
        if self.experts % 8 or self.experts < 16:
            raise UsageError(f"--experts {self.experts}: the real router has 8 groups, keeps 4 and picks 8 experts, "
                             "so the expert count must be a multiple of 8 and at least 16",
                             hint="use 16, 32, 64, 128 or 256 (the release)")


def real_spec(opts: RealOptions) -> FixtureSpec:
    """The release's :class:`FixtureSpec` (``real_v3_spec``) cut to ``opts``' layers, MTP and experts."""
    opts.validate()
    return replace(real_v3_spec(), num_hidden_layers=opts.layers, first_k_dense_replace=opts.dense_layers,
                   num_nextn_predict_layers=1 if opts.mtp else 0, n_routed_experts=opts.experts, seed=opts.seed)


@dataclass(frozen=True)
class _Row:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name
    kind: str  # the writer's value kind (V3: fixtures.tensor_table kind), or "scale"
    of: str | None = None  # a scale's weight

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_SIZE[self.dtype]


def _rows(spec: FixtureSpec) -> list[_Row]:
    rows: list[_Row] = []
    for name, shp, kind in tensor_table(spec):
        if kind == "fp8":
            rows.append(_Row(name, shp, "F8_E4M3", kind))
            rows.append(_Row(name + "_scale_inv", (-(-shp[0] // 128), -(-shp[1] // 128)), "F32", "scale", name))
        else:
            rows.append(_Row(name, shp, "F32" if kind == "bias" else "BF16", kind))
    return rows


def plan_real(spec: FixtureSpec, shard_bytes: int = RELEASE_SHARD_BYTES) -> list[list[_Row]]:
    """The V3 tensors (release order) split by :func:`plan_rows`."""
    return plan_rows(_rows(spec), shard_bytes)


def plan_rows(rows: list[_Row], shard_bytes: int) -> list[list[_Row]]:
    """Split ``rows`` (file order) into shards of at most ``shard_bytes`` (a single larger tensor gets its own
    shard). When a boundary falls right after a weight's scale, the scale moves to the next shard, so every such
    boundary is a cross-shard weight/scale pair, as in the release."""
    shards: list[list[_Row]] = [[]]
    acc = 0
    for r in rows:
        if shards[-1] and acc + r.nbytes > shard_bytes:
            prev = shards[-1]
            moved = []
            if len(prev) >= 2 and prev[-1].kind == "scale" and prev[-1].of == prev[-2].name:
                moved = [prev.pop()]
            shards.append(moved)
            acc = sum(x.nbytes for x in moved)
        shards[-1].append(r)
        acc += r.nbytes
    return [s for s in shards if s]


class _Pools:
    """The value pools every big tensor is sliced from (see the module docstring)."""

    def __init__(self, seed: int, fp8_encode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``fp8_encode`` maps float32 ``[g, 16384]`` groups to their ``float8_e4m3fn`` codes (default V3's:
        each group's amax to 448)."""
        gen = torch.Generator().manual_seed(seed)
        parts = []
        groups = _FP8_POOL_BYTES // _FP8_GROUP
        for g0 in range(0, groups, 256):  # 4M floats at a time
            g = min(256, groups - g0)
            x = torch.randn((g, _FP8_GROUP), generator=gen)
            if fp8_encode is None:
                x *= 448.0 / x.abs().amax(dim=1, keepdim=True)  # DeepSeek: q = w / (amax / 448)
                q = x.to(torch.float8_e4m3fn)
            else:
                q = fp8_encode(x)
            parts.append(q.view(torch.uint8).reshape(-1).numpy().copy())
        self.fp8 = np.concatenate(parts)
        self.bf16 = torch.randn(_BF16_POOL_ELEMS, generator=gen).to(torch.bfloat16)
        self.rng = np.random.default_rng(seed)


def _byte_chunks(pool: np.ndarray, rng: np.random.Generator, nbytes: int, chunk: int,
                 align: int = 1) -> Iterator[memoryview]:
    """``nbytes`` bytes as slices of ``pool`` at random offsets (multiples of ``align``), ``chunk`` at a time."""
    chunk = min(chunk, len(pool) // 2) // align * align
    done = 0
    while done < nbytes:
        n = min(chunk, nbytes - done)
        off = int(rng.integers(0, (len(pool) - n) // align + 1)) * align
        yield memoryview(pool[off: off + n])
        done += n


def _fp8_chunks(pools: _Pools, nbytes: int, chunk: int) -> Iterator[memoryview]:
    return _byte_chunks(pools.fp8, pools.rng, nbytes, chunk)


def _bf16_chunks(pools: _Pools, numel: int, factor: float, chunk: int) -> Iterator[memoryview]:
    per = min(chunk // 2, _BF16_POOL_ELEMS // 2)
    buf = torch.empty(per, dtype=torch.bfloat16)
    done = 0
    while done < numel:
        n = min(per, numel - done)
        off = int(pools.rng.integers(0, _BF16_POOL_ELEMS - n + 1))
        out = buf[:n]
        torch.mul(pools.bf16[off: off + n], factor, out=out)
        yield memoryview(out.view(torch.uint8).numpy())
        done += n


_BF16_FACTOR = {"embed": 0.5, "head": None, "bf16": None}  # None: 2 / sqrt(in_features)


def _scale_of(row: _Row, weight_name: str, in_features: int, gen: torch.Generator) -> torch.Tensor:
    std = 0.5 / math.sqrt(in_features)
    if weight_name.endswith(("o_proj.weight", "down_proj.weight")):
        std *= 0.25
    base = std / (448.0 * _FP8_STD_OVER_AMAX)
    return (base * (0.75 + 0.5 * torch.rand(row.shape, generator=gen))).float()


def _header(rows: list[_Row]) -> bytes:
    obj: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for r in rows:
        obj[r.name] = {"dtype": r.dtype, "shape": list(r.shape), "data_offsets": [off, off + r.nbytes]}
        off += r.nbytes
    js = json.dumps(obj, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def write_rows(path: Path, rows: list[_Row], emit: Callable[[object, _Row], None]) -> int:
    """Write one safetensors file: the header of ``rows`` in ``save_file``'s order, then ``emit(file, row)`` for
    each row, which must write exactly ``row.nbytes``. Written to ``<name>.tmp``, renamed when complete; returns
    the file's size."""
    rows = sorted(rows, key=lambda r: (-_DTYPE_RANK[r.dtype], r.name))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(rows))
        for r in rows:
            start = f.tell()
            emit(f, r)
            if f.tell() - start != r.nbytes:
                raise RuntimeError(f"fixture writer: {r.name} wrote {f.tell() - start} bytes, expected {r.nbytes}")
        size = f.tell()
    tmp.replace(path)
    return size


def _write_shard(path: Path, rows: list[_Row], spec: FixtureSpec, pools: _Pools, shapes: dict[str, tuple],
                 chunk: int) -> int:
    def emit(f, r: _Row) -> None:
        gen = torch.Generator().manual_seed(_seed(spec.seed, r.name))
        if r.kind == "fp8":
            for mv in _fp8_chunks(pools, r.nbytes, chunk):
                f.write(mv)
        elif r.kind == "scale":
            wname = r.name[: -len("_scale_inv")]
            f.write(memoryview(_scale_of(r, wname, shapes[wname][1], gen).numpy()).cast("B"))
        elif r.kind in _BF16_FACTOR:
            factor = _BF16_FACTOR[r.kind] or 2.0 / math.sqrt(r.shape[-1])
            for mv in _bf16_chunks(pools, math.prod(r.shape), factor, chunk):
                f.write(mv)
        else:  # norm, router, bias: small, the small fixtures' initialisers
            t = _init(r.name, r.shape, r.kind, spec, gen)
            t = t.float() if r.dtype == "F32" else t.to(torch.bfloat16)
            f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))

    return write_rows(path, rows, emit)


def write_real_checkpoint(out_dir: str | Path, opts: RealOptions = RealOptions(), *,
                          shard_bytes: int = RELEASE_SHARD_BYTES, chunk_bytes: int = CHUNK_BYTES,
                          on_shard: Callable[[str, int, float], None] | None = None) -> Path:
    """Write a real-dimension DeepSeek-V3 FP8 checkpoint to ``out_dir`` (created; must be absent or empty).

    Args:
        opts: layers / dense layers / MTP / experts / seed.
        shard_bytes: maximum tensor bytes per shard (default the release's 4.3 GB).
        chunk_bytes: bytes generated and written at a time (peak memory is about the 64 MiB pools plus this).
        on_shard: called as ``on_shard(file_name, file_bytes, seconds)`` after each shard.

    Returns the directory. Each shard is written to ``<name>.tmp`` and renamed when complete.

    Raises:
        UsageError: invalid ``opts`` (see :class:`RealOptions`).
    """
    spec = real_spec(opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_real(spec, shard_bytes)
    shapes = {r.name: r.shape for s in shards for r in s}
    pools = _Pools(opts.seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, rows in enumerate(shards):
        t0 = time.perf_counter()
        fname = _shard_name(i + 1, len(shards))
        size = _write_shard(out / fname, rows, spec, pools, shapes, chunk_bytes)
        for r in rows:
            weight_map[r.name] = fname
            total += r.nbytes
        if on_shard:
            on_shard(fname, size, time.perf_counter() - t0)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(make_config(spec), indent=2) + "\n")
    write_constructed_tokenizer(out, spec.vocab_size)
    _write_extra_files(out)
    return out


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map (the ByteLevel pre-tokenizer's 256 symbols), commonest text bytes first."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            cs.append(256 + n)
            n += 1
    sym = {b: chr(c) for b, c in zip(printable + [b for b in range(256) if b not in printable], cs)}
    common = b" etaoinshrdlucmfwypvbgkjqxz" + b"ETAOINSHRDLUCMFWYPVBGKJQXZ" + b"0123456789.,'\"-:;!?()\n"
    order = list(dict.fromkeys(list(common) + list(range(256))))
    return [sym[b] for b in order]


def write_constructed_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE ``tokenizer.json`` with exactly ``vocab_size`` entries, constructed directly (no training):
    DeepSeek's special tokens at ids 0-4 (bos 0, eos 1), the 256 byte symbols, then merged tokens: every pair of
    byte symbols (commonest first), then pair + symbol, until the vocabulary is full. Each merge joins two tokens
    already in the vocabulary, so the ``tokenizers`` library loads and applies it as an ordinary BPE. Also writes
    ``tokenizer_config.json``. About 1 s for 129,280 entries.

    Raises:
        ValueError: ``vocab_size`` below 5 + 256 + 1.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alpha = _byte_alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alpha) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for s in alpha:
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    need = vocab_size - len(vocab)
    # pairs in order of the sum of their symbols' ranks (commonest combinations first)
    pairs = sorted(((a, b) for a in range(256) for b in range(256)), key=lambda p: (p[0] + p[1], p))
    for a, b in pairs:
        if len(merges) == need:
            break
        merges.append((alpha[a], alpha[b]))
        vocab[alpha[a] + alpha[b]] = len(vocab)
    i = 0
    while len(merges) < need:  # then pair + symbol, same order
        a, b = pairs[i // 256]
        c = i % 256
        left = alpha[a] + alpha[b]
        merges.append((left, alpha[c]))
        vocab[left + alpha[c]] = len(vocab)
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)
