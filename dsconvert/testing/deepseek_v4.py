"""Tiny DeepSeek-V4 checkpoints in the exact release layout (docs/checkpoint-layout.md §11, §12 and §13).

A transformers ``DeepseekV4ForCausalLM`` built for the fixture's config (on the meta device) fixes every name and
shape transformers expects: the writer maps each of its tensors to a release name through
:mod:`dsconvert.formats.deepseek_v4`'s table and refuses to write if any is left over or disagrees. Values are
random (this module's deterministic per-tensor init, stable across transformers versions), quantized as DeepSeek
ships them:

* every ``fp8`` family as ``F8_E4M3`` + ``<stem>.scale`` ``F8_E8M0`` (power-of-two scale per 128x128 block);
* routed experts as FP4 e2m1 ``I8 [M, N/2]`` + ``.scale F8_E8M0 [M, N/32]`` (variant ``flash``), or as FP8 with
  F32 power-of-two 128x128 scales (variant ``flash-base``, as third-party copies of V4-Flash-Base headers show);
* BF16 embeddings, head, norms, router, compressor/indexer projections; F32 mHC, sinks, ``ape``, router bias;
  I64 ``tid2eid`` in hash layers (rows of distinct experts);
* the MTP block ``mtp.0.*`` (transformers does not instantiate it: its tensors come from the same table with
  this module's own deterministic init);
* ``config.json`` with the release's flat, legacy keys (``compress_ratios`` incl. the MTP slot,
  ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``, top-level ``expert_dtype``) and
  ``quantization_config {quant_method fp8, fmt e4m3, scale_fmt ue8m0, weight_block_size [128, 128]}``.

Because transformers loads the result with its own FP8/FP4 decoder, ``from_pretrained(fixture)`` reproducing
:func:`decoded_state_dict` is an independent check of this writer (tests/formats/test_deepseek_v4.py). Dimensions are
multiples of 128 in the presets compared against transformers (it infers the FP8 block from the scale grid);
``tiny-odd`` has partial blocks for dsconvert's own checks.

Requires transformers >= 5.24 (``pip install .[test]``).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UsageError
from ..formats import deepseek_v4 as v4
from ..quant.fp4_decode import dequant_fp4, e8m0_grid_to_float32, quantize_fp4, quantize_fp8_e8m0
from ..quant.fp8_block import dequant_fp8_block
from .release_files import MARKER_PREFIX, write_tokenizer

VARIANTS = ("flash", "flash-base")


@dataclass
class V4Spec:
    """Shape of a synthetic DeepSeek-V4 checkpoint (defaults: ``tiny``, every layer kind, ~3 MB)."""

    hidden_size: int = 256
    moe_intermediate_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 4, 128, 4)  # sliding, CSA, HCA, CSA (the MTP slot is appended: 0)
    num_hash_layers: int = 2
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 4
    head_dim: int = 128
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 128
    o_groups: int = 2
    o_lora_rank: int = 128
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    index_n_heads: int = 4
    index_head_dim: int = 128
    index_topk: int = 64
    sliding_window: int = 16
    vocab_size: int = 512
    variant: str = "flash"  # flash (FP4 experts) | flash-base (FP8 experts)
    num_shards: int = 3
    seed: int = 0
    tokenizer: bool = True
    extra_files: bool = True


V4_PRESETS: dict[str, V4Spec] = {
    "tiny": V4Spec(),
    # partial 128-blocks on both axes (hidden 320 = 2.5 blocks, experts 96 wide): dsconvert-only checks
    "tiny-odd": V4Spec(hidden_size=320, moe_intermediate_size=96, q_lora_rank=160),
}


def release_config(spec: V4Spec) -> dict:
    """config.json with the V4-Flash release's keys, dimensions scaled down."""
    s = spec
    fp4 = s.variant == "flash"
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
          "weight_block_size": list(v4.FP8_BLOCK)}
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": v4.MODEL_TYPE,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "num_hidden_layers": len(s.compress_ratios),
        "num_nextn_predict_layers": s.num_nextn_predict_layers,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": 1,
        "head_dim": s.head_dim,
        "qk_rope_head_dim": s.qk_rope_head_dim,
        "q_lora_rank": s.q_lora_rank,
        "o_groups": s.o_groups,
        "o_lora_rank": s.o_lora_rank,
        "sliding_window": s.sliding_window,
        "compress_ratios": list(s.compress_ratios) + [0] * s.num_nextn_predict_layers,
        "compress_rope_theta": 160000,
        "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                         "beta_slow": 1},
        "max_position_embeddings": 1048576,
        "index_n_heads": s.index_n_heads,
        "index_head_dim": s.index_head_dim,
        "index_topk": s.index_topk,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "n_routed_experts": s.n_routed_experts,
        "num_experts_per_tok": s.num_experts_per_tok,
        "n_shared_experts": s.n_shared_experts,
        "moe_intermediate_size": s.moe_intermediate_size,
        "num_hash_layers": s.num_hash_layers,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "expert_dtype": "fp4" if fp4 else "fp8",
        "quantization_config": qc,
    }
    return cfg


def _seed(seed: int, name: str) -> int:
    return zlib.crc32(f"v4:{seed}:{name}".encode())


def _init(e: v4.Expected, gen: torch.Generator) -> torch.Tensor:
    """Deterministic float32 values for one release tensor: unit-scale activations, decisive routing,
    non-trivial mHC mixes, sinks and position biases (transformers' own init zeroes several of these)."""
    f, shape = e.family, e.shape
    rel = f.release
    r = lambda: torch.randn(shape, generator=gen)  # noqa: E731
    if f.role == "norm":
        return 1.0 + 0.1 * r()
    if f.role == "embed":
        return r() * 0.5
    if f.role == "head":
        return r() * (2.0 / math.sqrt(shape[1]))
    if f.role == "sink":
        return r() * 0.5
    if rel.endswith("ape"):
        return r() * 0.5
    if rel.endswith("gate.bias"):
        return 0.1 * r() + 1e-3 * torch.rand(shape, generator=gen)  # values BF16 cannot hold
    if f.role == "router":
        return r() * (2.0 / math.sqrt(shape[1]))
    if f.role == "hc":
        if rel.endswith("scale"):
            return 1.0 + 0.2 * r()
        if rel.endswith("base"):
            return 0.5 * r()
        return r() / math.sqrt(shape[1])
    w = r() / math.sqrt(shape[-1])
    if rel.endswith(("wo_b.weight", "w2.weight")):
        w *= 0.25  # residual-branch outputs scaled down, as in trained models
    return w


def _tid2eid(g: v4.V4Geometry, gen: torch.Generator) -> torch.Tensor:
    """``[V, k]`` int64: k distinct experts per token id."""
    return torch.stack([torch.randperm(g.experts, generator=gen)[: g.experts_per_tok] for _ in range(g.vocab)])


def _hf_model_state(cfg: dict) -> dict[str, torch.Tensor]:
    """The state dict (names and shapes) of a random transformers ``DeepseekV4ForCausalLM`` for ``cfg``."""
    try:
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError("make-fixture --arch v4 needs transformers >= 5.24 with DeepseekV4ForCausalLM",
                         hint="pip install '.[test]'") from e
    hf_cfg = DeepseekV4Config(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(hf_cfg)
    return {k: v for k, v in model.state_dict().items()}


def _release_tensors(spec: V4Spec, cfg: dict) -> tuple[v4.V4Geometry, list[tuple[v4.Expected, torch.Tensor]]]:
    """Every logical release tensor with its float32 (or int64) value, checked one-to-one against the
    transformers model's state dict (a family missing from the table, or a shape disagreeing, raises)."""
    g = v4.geometry(cfg)
    hf = _hf_model_state(cfg)
    expected = v4.expected_tensors(g)
    covered: set[str] = set()
    out = []
    for e in expected:
        gen = torch.Generator().manual_seed(_seed(spec.seed, e.name))
        t = _tid2eid(g, gen) if e.storage == "index" else _init(e, gen)
        if e.hf is not None:
            if e.hf not in hf or tuple(hf[e.hf].shape) != e.shape:
                got = tuple(hf[e.hf].shape) if e.hf in hf else "absent"
                raise RuntimeError(f"V4 layout table: {e.name} -> {e.hf} {e.shape}, transformers has {got}")
            covered.add(e.hf)
        elif e.expert is not None and e.layer < g.layers:
            stem = f"model.layers.{e.layer}.mlp.experts."
            merged = stem + ("down_proj" if ".w2." in e.name else "gate_up_proj")
            want = (g.experts, g.hidden, g.inter) if ".w2." in e.name else (g.experts, 2 * g.inter, g.hidden)
            if merged not in hf or tuple(hf[merged].shape) != want:
                raise RuntimeError(f"V4 layout table: experts of layer {e.layer} do not match {merged}")
            covered.add(merged)
        out.append((e, t))
    extra = sorted(set(hf) - covered)
    if extra:
        raise RuntimeError(f"V4 layout table misses transformers tensors: {extra[:5]}")
    return g, out


def encode(e: v4.Expected, g: v4.V4Geometry, value: torch.Tensor, variant: str) -> dict[str, torch.Tensor]:
    """The stored tensors for one logical tensor: ``{name: weight, stem.scale: scale}`` or ``{name: value}``."""
    dt = v4.stored_dtype(e, g)
    if dt == "I8":
        q, s = quantize_fp4(value)
        return {e.name: q, v4.scale_name(e.name): s}
    if dt == "F8_E4M3":
        q, s = quantize_fp8_e8m0(value, v4.FP8_BLOCK)
        if e.storage == "expert" and variant == "flash-base":
            s = e8m0_grid_to_float32(s)  # Base: F32 power-of-two scales (third-party header copies)
        return {e.name: q, v4.scale_name(e.name): s}
    if e.storage == "index":
        return {e.name: value.to(torch.int64)}
    return {e.name: value.to(torch.float32 if e.family.dtype == "F32" else torch.bfloat16)}


def decode(e: v4.Expected, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """The exact float32 value of a stored tensor (what a lossless loader must reproduce)."""
    w = stored[e.name]
    sname = v4.scale_name(e.name) if e.name.endswith(".weight") else None
    if sname and sname in stored:
        s = stored[sname]
        if w.dtype == torch.int8:
            return dequant_fp4(w, s, torch.float32)
        return dequant_fp8_block(w, e8m0_grid_to_float32(s), v4.FP8_BLOCK, torch.float32)
    return w if not w.dtype.is_floating_point else w.float()


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def build_v4_checkpoint(out_dir: str | Path, spec: V4Spec | str = "tiny", **overrides) -> Path:
    """Write a DeepSeek-V4-layout checkpoint into ``out_dir`` (created).

    Args:
        spec: a :class:`V4Spec` or a preset name (``tiny``, ``tiny-odd``).
        overrides: V4Spec fields to replace (e.g. ``variant="flash-base"``).

    Returns the directory.

    Raises:
        UsageError: unknown preset/variant, or transformers without DeepSeek-V4.
    """
    if isinstance(spec, str):
        if spec not in V4_PRESETS:
            raise UsageError(f"unknown V4 preset {spec!r}", hint=", ".join(V4_PRESETS))
        spec = V4_PRESETS[spec]
    spec = replace(spec, **overrides)
    if spec.variant not in VARIANTS:
        raise UsageError(f"unknown --variant {spec.variant!r}", hint=" or ".join(VARIANTS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = release_config(spec)
    g, tensors = _release_tensors(spec, cfg)
    stored: list[dict[str, torch.Tensor]] = [encode(e, g, t, spec.variant) for e, t in tensors]
    sizes = [sum(t.numel() * t.element_size() for t in d.values()) for d in stored]
    per_shard = sum(sizes) / spec.num_shards
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(spec.num_shards)]
    acc = 0
    for d, n in zip(stored, sizes):
        shards[min(int(acc // per_shard), spec.num_shards - 1)].update(d)
        acc += n
    # one scale in the next shard, as the release does where a weight ends a shard
    for i in range(spec.num_shards - 1):
        moved = next((k for k in shards[i] if k.endswith(".scale")), None)
        if moved is not None:
            shards[i + 1][moved] = shards[i].pop(moved)
            break
    weight_map, total = {}, 0
    shards = [s for s in shards if s]
    for i, sh in enumerate(shards):
        name = _shard_name(i + 1, len(shards))
        save_file(sh, str(out / name), metadata={"format": "pt"})
        for k, t in sh.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if spec.tokenizer:
        write_tokenizer(out, spec.vocab_size)
    if spec.extra_files:
        _write_extra_files(out)
    return out


def decoded_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """Release name -> exact float32 (or integer) value of every logical tensor of a V4 fixture on disk,
    decoded with this module's kernels (for tests comparing loaders against the writer)."""
    from safetensors.torch import load_file

    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    g = v4.geometry(cfg)
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    stored: dict[str, torch.Tensor] = {}
    for f in sorted(set(idx.values())):
        stored.update(load_file(str(src / f)))
    return {e.name: decode(e, stored) for e in v4.expected_tensors(g)}


def _write_extra_files(out: Path) -> None:
    def remote(kind: str) -> str:
        return (f'"""dsconvert test fixture stand-in for DeepSeek-V4\'s {kind}.py. It must be copied, never run."""\n'
                "import pathlib\n"
                f"pathlib.Path(__file__).with_name('{MARKER_PREFIX}{kind.replace('/', '_')}').write_text('executed')\n")

    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0,
         "top_p": 1.0}, indent=2) + "\n")
    (out / "encoding").mkdir(exist_ok=True)
    (out / "encoding" / "encoding_dsv4.py").write_text(remote("encoding_dsv4"))
    (out / "inference").mkdir(exist_ok=True)
    (out / "inference" / "model.py").write_text(remote("model"))
    (out / "inference" / "convert.py").write_text(remote("convert"))
    (out / "README.md").write_text("# Synthetic DeepSeek-V4-layout checkpoint\n\nBuilt by dsconvert's fixture "
                                   "builder for tests. Random weights.\n")
    (out / "LICENSE").write_text("Synthetic test data; no license restrictions.\n")


def flash_spec(variant: str = "flash") -> V4Spec:
    """DeepSeek-V4-Flash's dimensions (docs/checkpoint-layout.md §11), for headers-only layouts."""
    return V4Spec(hidden_size=4096, moe_intermediate_size=2048, compress_ratios=(0, 0) + (4, 128) * 20 + (4,),
                  num_hash_layers=3, num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024,
                  o_groups=8, o_lora_rank=1024, n_routed_experts=256, num_experts_per_tok=6, index_n_heads=64,
                  index_head_dim=128, index_topk=512, sliding_window=128, vocab_size=129280, variant=variant)


def write_v4_headers_only(out_dir: str | Path, spec: V4Spec, *, shard_bytes: int = 4_300_000_000) -> Path:
    """A V4 checkpoint whose shards hold real headers and **sparse** data (holes, no disk used): for ``inspect``
    and ``--dry-run`` at full size (``flash_spec()``). Never convert one: its scales read as zeros. Needs no
    transformers (names and shapes come from the layout table alone)."""
    import struct

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = release_config(spec)
    g = v4.geometry(cfg)
    rows = []
    sizes = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}
    for e in v4.expected_tensors(g):
        dt = v4.stored_dtype(e, g)
        if dt is None:
            dt = e.family.dtype
            rows.append((e.name, e.shape, dt))
            continue
        rows.append((e.name, v4.stored_shape(e, g), dt))
        sdt = "F32" if (e.storage == "expert" and spec.variant == "flash-base") else "F8_E8M0"
        rows.append((v4.scale_name(e.name), v4.scale_shape(e, g), sdt))
    shards: list[list] = [[]]
    acc = 0
    for r in rows:
        nb = math.prod(r[1]) * sizes[r[2]]
        if acc + nb > shard_bytes and shards[-1]:
            shards.append([])
            acc = 0
        shards[-1].append((*r, nb))
        acc += nb
    weight_map, total = {}, 0
    for i, rs in enumerate(shards):
        fname = _shard_name(i + 1, len(shards))
        hdr: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shp, dt, nb in rs:
            hdr[name] = {"dtype": dt, "shape": list(shp), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        js = json.dumps(hdr, separators=(",", ":")).encode()
        js += b" " * (-len(js) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(js)) + js)
            f.truncate(8 + len(js) + off)
        total += off
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
