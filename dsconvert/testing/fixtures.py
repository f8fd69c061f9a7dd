"""Build small checkpoints in exactly the layout DeepSeek released, for the demo, the tests and the benches.

What is real about them (docs/checkpoint-layout.md sections 1-3):

* shard names ``model-0000k-of-00000N.safetensors`` (5-digit index, **6-digit** total) and a
  ``model.safetensors.index.json`` with ``metadata.total_size``;
* ``config.json`` with the release's keys (the R1 config scaled down) including
  ``quantization_config {quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size [128, 128]}``;
* every decoder Linear as ``float8_e4m3fn`` + float32 ``<name>_scale_inv`` on the ``(ceil(M/128), ceil(N/128))``
  grid, quantized as DeepSeek does (zero-pad to 128, scale = amax/448); sizes with partial blocks on both axes;
  at least one scale stored in a different shard than its weight;
* BF16 embeddings, norms, router and lm_head; F32 ``e_score_correction_bias`` (values not representable in
  BF16); an MTP block at index ``num_hidden_layers`` (BF16 ``eh_proj``, ``enorm``, ``hnorm``, ``shared_head.*``,
  ``embed_tokens``);
* ``tokenizer.json`` trained with the ``tokenizers`` library (the ``real`` preset's 129,280-entry one is
  constructed instead: :mod:`dsconvert.testing.realsize`), ``tokenizer_config.json`` (with a chat template),
  ``generation_config.json``, remote-code ``configuration_deepseek.py``/``modeling_deepseek.py`` (which, if
  anything ever executed them, would leave a marker file: tests check that nothing does), README, LICENSE.

Shards are written with ``safetensors.torch.save_file`` (a library independent of dsconvert's own writer).
Weights carry a few outlier input channels (as real LLM activations do) through the norm weights, so that
activation-aware quantization has something to find, and routers are scaled so routing is decisive.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .release_files import MARKER_PREFIX, write_tokenizer

FP8_MAX = 448.0
V32_INDEX_HEADS, V32_INDEX_DIM = 4, 32  # scaled-down index_n_heads / index_head_dim of a deepseek_v32 fixture


@dataclass
class FixtureSpec:
    """Shape of a synthetic DeepSeek-V3 checkpoint. Defaults give the 'tiny' preset (a few MB)."""

    hidden_size: int = 320  # 2.5 blocks of 128: partial blocks along N for every hidden->x linear
    intermediate_size: int = 320  # dense MLP: [320, 320], partial blocks on both axes; divisible by 32 and 64
    moe_intermediate_size: int = 64
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 4
    q_lora_rank: int | None = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # kv_a_proj_with_mqa: [80, 320] -> scale grid [1, 3]
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    vocab_size: int = 512
    num_shards: int = 3
    seed: int = 0
    model_type: str = "deepseek_v3"
    scale_fmt: str | None = None  # "ue8m0" for a V3.1-style config
    fp8: bool = True
    # FP8 weights quantized from BF16-rounded masters (a BF16 fine-tune put back into FP8), so that
    # fp8 -> bf16 -> fp8 reproduces the scales bit for bit too; False: from float32 masters (payload only)
    bf16_masters: bool = False
    tokenizer: bool = True
    extra_files: bool = True
    outlier_channels: int = 4  # input channels whose norm weight is boosted (activation outliers)
    router_bias: bool = True  # F32 mlp.gate.e_score_correction_bias (V3); False for a V2-style checkpoint
    extra_config: dict = field(default_factory=dict)


PRESETS: dict[str, FixtureSpec] = {
    "tiny": FixtureSpec(),
    # >= 1 GB of FP8 (about 1.3 GB): the end-to-end bench fixture.
    "bench": FixtureSpec(hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
                         qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=32, num_experts_per_tok=4,
                         n_group=4, topk_group=2, vocab_size=8192, num_shards=8, outlier_channels=16),
}
# Four times the bench fixture's FP8 bytes, for the flat-memory check.
PRESETS["bench4x"] = replace(PRESETS["bench"], num_hidden_layers=22, num_shards=28)


def _rope_scaling() -> dict:
    return {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def make_config(spec: FixtureSpec) -> dict:
    """config.json for ``spec``: the R1 release's keys and order, dimensions scaled down."""
    s = spec
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": s.first_k_dense_replace,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "kv_lora_rank": s.kv_lora_rank,
        "max_position_embeddings": 163840,
        "model_type": s.model_type,
        "moe_intermediate_size": s.moe_intermediate_size,
        "moe_layer_freq": 1,
        "n_group": s.n_group,
        "n_routed_experts": s.n_routed_experts,
        "n_shared_experts": s.n_shared_experts,
        "norm_topk_prob": True,
        "num_attention_heads": s.num_attention_heads,
        "num_experts_per_tok": s.num_experts_per_tok,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_attention_heads,
        "num_nextn_predict_layers": s.num_nextn_predict_layers,
        "q_lora_rank": s.q_lora_rank,
        "qk_nope_head_dim": s.qk_nope_head_dim,
        "qk_rope_head_dim": s.qk_rope_head_dim,
        "rms_norm_eps": 1e-06,
        "rope_scaling": _rope_scaling(),
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": s.topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "v_head_dim": s.v_head_dim,
        "vocab_size": s.vocab_size,
    }
    if s.fp8:
        qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
        if s.scale_fmt:
            qc["scale_fmt"] = s.scale_fmt
        cfg["quantization_config"] = qc
    if s.model_type == "deepseek_v32":
        cfg.update({"architectures": ["DeepseekV32ForCausalLM"], "index_n_heads": V32_INDEX_HEADS,
                    "index_head_dim": V32_INDEX_DIM, "index_topk": 2048})
    cfg.update(s.extra_config)
    return cfg


def quantize_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's weight quantization: zero-pad to whole blocks, scale = amax/448 per block, q = w/scale -> e4m3fn.

    Args:
        w: ``[M, N]`` float32.
    Returns:
        ``(q [M, N] float8_e4m3fn, scale_inv [ceil(M/128), ceil(N/128)] float32)``.
    """
    m, n = w.shape
    gm, gn = -(-m // block), -(-n // block)
    pad = torch.zeros(gm * block, gn * block, dtype=torch.float32)
    pad[:m, :n] = w
    tiles = pad.view(gm, block, gn, block)  # (gm, 128, gn, 128)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)
    scale = (amax / FP8_MAX).float()
    q = (tiles / scale[:, None, :, None]).view(gm * block, gn * block)[:m, :n].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def _linears(spec: FixtureSpec, layer: int) -> list[tuple[str, tuple[int, int]]]:
    """(name, [out, in]) of every FP8 Linear of decoder layer ``layer`` in the release's order."""
    s = spec
    p = f"model.layers.{layer}."
    h = s.hidden_size
    qk_head = s.qk_nope_head_dim + s.qk_rope_head_dim
    out = []
    if s.q_lora_rank:
        out += [(p + "self_attn.q_a_proj.weight", (s.q_lora_rank, h)),
                (p + "self_attn.q_b_proj.weight", (s.num_attention_heads * qk_head, s.q_lora_rank))]
    else:
        out += [(p + "self_attn.q_proj.weight", (s.num_attention_heads * qk_head, h))]
    out += [(p + "self_attn.kv_a_proj_with_mqa.weight", (s.kv_lora_rank + s.qk_rope_head_dim, h)),
            (p + "self_attn.kv_b_proj.weight",
             (s.num_attention_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank)),
            (p + "self_attn.o_proj.weight", (h, s.num_attention_heads * s.v_head_dim))]
    if layer < s.first_k_dense_replace:
        i = s.intermediate_size
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    else:
        i = s.moe_intermediate_size
        for e in range(s.n_routed_experts):
            q = p + f"mlp.experts.{e}."
            out += [(q + "gate_proj.weight", (i, h)), (q + "up_proj.weight", (i, h)), (q + "down_proj.weight", (h, i))]
        si = i * s.n_shared_experts
        q = p + "mlp.shared_experts."
        out += [(q + "gate_proj.weight", (si, h)), (q + "up_proj.weight", (si, h)), (q + "down_proj.weight", (h, si))]
    return out


def tensor_table(spec: FixtureSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor of the checkpoint as ``(name, shape, kind)`` in file order; kind is
    ``fp8`` (a Linear, stored as FP8 + scale), ``bf16``, ``norm`` (BF16 ones-ish), ``router``, ``bias`` (F32)."""
    s = spec
    h = s.hidden_size
    rows: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (s.vocab_size, h), "embed")]
    n_layers = s.num_hidden_layers + s.num_nextn_predict_layers
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        if layer >= s.num_hidden_layers:  # MTP block
            rows += [(p + "embed_tokens.weight", (s.vocab_size, h), "embed"), (p + "enorm.weight", (h,), "norm"),
                     (p + "hnorm.weight", (h,), "norm"), (p + "eh_proj.weight", (h, 2 * h), "bf16")]
        rows.append((p + "input_layernorm.weight", (h,), "norm"))
        if s.q_lora_rank:
            rows.append((p + "self_attn.q_a_layernorm.weight", (s.q_lora_rank,), "norm"))
        rows.append((p + "self_attn.kv_a_layernorm.weight", (s.kv_lora_rank,), "norm"))
        rows.append((p + "post_attention_layernorm.weight", (h,), "norm"))
        if layer >= s.first_k_dense_replace:
            rows.append((p + "mlp.gate.weight", (s.n_routed_experts, h), "router"))
            if s.router_bias:
                rows.append((p + "mlp.gate.e_score_correction_bias", (s.n_routed_experts,), "bias"))
        rows += [(n, shp, "fp8" if s.fp8 else "bf16") for n, shp in _linears(s, layer)]
        if s.model_type == "deepseek_v32":  # the lightning indexer (docs/checkpoint-layout.md section 7)
            q = p + "self_attn.indexer."
            rows += [(q + "wq_b.weight", (V32_INDEX_HEADS * V32_INDEX_DIM, s.q_lora_rank), "fp8" if s.fp8 else "bf16"),
                     (q + "wk.weight", (V32_INDEX_DIM, h), "fp8" if s.fp8 else "bf16"),
                     (q + "k_norm.weight", (V32_INDEX_DIM,), "bias"), (q + "k_norm.bias", (V32_INDEX_DIM,), "bias"),
                     (q + "weights_proj.weight", (V32_INDEX_HEADS, h), "bf16")]
        if layer >= s.num_hidden_layers:
            rows += [(p + "shared_head.norm.weight", (h,), "norm"),
                     (p + "shared_head.head.weight", (s.vocab_size, h), "head")]
        if layer == s.num_hidden_layers - 1:
            rows += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (s.vocab_size, h), "head")]
    return rows


def _init(name: str, shape: tuple[int, ...], kind: str, spec: FixtureSpec, gen: torch.Generator) -> torch.Tensor:
    """Deterministic float32 values for one tensor."""
    if kind == "norm":
        w = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) and spec.outlier_channels:
            idx = torch.randperm(shape[0], generator=gen)[: spec.outlier_channels]
            w[idx] *= 8.0  # activation outliers on a few channels, as in real LLMs
        return w
    if kind == "bias":
        return 0.1 * torch.randn(shape, generator=gen) + 1e-3 * torch.rand(shape, generator=gen)
    if kind == "router":
        return torch.randn(shape, generator=gen) * (2.0 / math.sqrt(shape[1]))  # decisive routing
    if kind == "embed":
        return torch.randn(shape, generator=gen) * 0.5
    if kind == "head":  # logits of unit scale: a perplexity near the vocabulary size, not a degenerate one
        return torch.randn(shape, generator=gen) * (2.0 / math.sqrt(shape[1]))
    fan_in = shape[-1]
    w = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        # residual-branch outputs scaled down (GPT-2 style): each layer adds a small update to the residual stream,
        # as in trained LLMs, so a small weight error stays small instead of compounding chaotically
        w *= 0.25
    return w


def _seed(seed: int, name: str) -> int:
    """A per-tensor seed that is stable across processes (str hash() is salted per process)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:06d}.safetensors"


def build_checkpoint(out_dir: str | Path, spec: FixtureSpec | str = "tiny", *, values: dict | None = None,
                     tokenizer_text: str | None = None, **overrides) -> Path:
    """Write a DeepSeek-V3-layout checkpoint to ``out_dir`` (created; must not exist or be empty).

    Args:
        spec: a :class:`FixtureSpec` or a preset name (``tiny``, ``bench``, ``bench4x``).
        values: ``{HF tensor name: float32 tensor}`` to write instead of the random initialisation (a trained
            model, :mod:`dsconvert.testing.trained`); its FP8 linears are quantized with
            :func:`dsconvert.quant.fp8_quant.quantize_fp8_block` (DeepSeek's rule). Shapes must match the table.
        tokenizer_text: the text the BPE tokenizer is trained on (default: the bundled validation text).
        overrides: FixtureSpec fields to replace.

    Returns the directory. Memory use is one shard's tensors at a time.
    """
    if isinstance(spec, str):
        spec = PRESETS[spec]
    spec = replace(spec, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = tensor_table(spec)

    def stored_bytes(shape, kind):
        n = math.prod(shape)
        if kind == "fp8":
            return n + 4 * math.prod((-(-shape[0] // 128), -(-shape[1] // 128)))
        return n * (4 if kind == "bias" else 2)

    total = sum(stored_bytes(shp, k) for _, shp, k in table)
    per_shard = total / spec.num_shards
    assignment: list[int] = []
    acc = 0
    for _, shp, k in table:
        assignment.append(min(int(acc // per_shard), spec.num_shards - 1))
        acc += stored_bytes(shp, k)

    # One scale lives in the next shard: the first FP8 tensor that is not in the last shard.
    moved_scale = None
    for (name, _, k), sh in zip(table, assignment):
        if k == "fp8" and sh < spec.num_shards - 1 and "self_attn.kv_a_proj_with_mqa" in name:
            moved_scale = name + "_scale_inv"
            break

    weight_map: dict[str, str] = {}
    total_size = 0
    carry: dict[str, torch.Tensor] = {}  # the moved scale, written into the following shard
    for shard in range(spec.num_shards):
        tensors: dict[str, torch.Tensor] = dict(carry)
        carry.clear()
        for (name, shp, kind), sh in zip(table, assignment):
            if sh != shard:
                continue
            if values is not None and name in values:
                w = values[name].detach().float().cpu()
                if tuple(w.shape) != tuple(shp):
                    raise ValueError(f"{name}: value shape {tuple(w.shape)} != layout shape {tuple(shp)}")
            else:
                w = _init(name, shp, kind, spec, torch.Generator().manual_seed(_seed(spec.seed, name)))
            if kind == "fp8":
                if values is not None and name in values:
                    from ..quant.fp8_quant import quantize_fp8_block as release_rule

                    fp8 = release_rule(w, name=name)
                    q, s = fp8.q, fp8.scale
                else:
                    q, s = quantize_fp8_block(w.to(torch.bfloat16).float() if spec.bf16_masters else w)
                tensors[name] = q
                (carry if moved_scale == name + "_scale_inv" else tensors)[name + "_scale_inv"] = s
            elif kind == "bias":
                tensors[name] = w.float()
            else:
                tensors[name] = w.to(torch.bfloat16)
        fname = _shard_name(shard + 1, spec.num_shards)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total_size += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(make_config(spec), indent=2) + "\n")
    if spec.tokenizer:
        write_tokenizer(out, spec.vocab_size, tokenizer_text)
    if spec.extra_files:
        _write_extra_files(out)
    return out


def _remote_code(kind: str) -> str:
    return (f'"""dsconvert test fixture stand-in for DeepSeek\'s {kind}.py. dsconvert must copy it and never run it."""\n'
            "import pathlib\n"
            f"pathlib.Path(__file__).with_name('{MARKER_PREFIX}{kind}').write_text('this file was executed')\n")


def _write_extra_files(out: Path) -> None:
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6,
         "top_p": 0.95, "transformers_version": "4.46.3"}, indent=2) + "\n")
    (out / "configuration_deepseek.py").write_text(_remote_code("configuration_deepseek"))
    (out / "modeling_deepseek.py").write_text(_remote_code("modeling_deepseek"))
    (out / "README.md").write_text("# Synthetic DeepSeek-V3-layout checkpoint\n\nBuilt by dsconvert's fixture "
                                   "builder for tests. Random weights.\n")
    (out / "LICENSE").write_text("Synthetic test data; no license restrictions.\n")


def write_headers_only(out_dir: str | Path, spec: FixtureSpec | str, *, shard_bytes: int = 4_300_000_000) -> Path:
    """A checkpoint whose shards hold real headers and **sparse** data (holes, no disk used): for ``inspect`` and
    ``--dry-run`` on full-size layouts (e.g. the 671B release, ``real_v3_spec()``). Never convert one: its scales
    read as zeros and pre-flight refuses them."""
    import os
    import struct

    if isinstance(spec, str):
        spec = PRESETS[spec]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, shp, kind in tensor_table(spec):
        if kind == "fp8":
            rows.append((name, shp, "F8_E4M3", math.prod(shp)))
            g = (-(-shp[0] // 128), -(-shp[1] // 128))
            rows.append((name + "_scale_inv", g, "F32", 4 * math.prod(g)))
        else:
            rows.append((name, shp, "F32" if kind == "bias" else "BF16", math.prod(shp) * (4 if kind == "bias" else 2)))
    shards: list[list] = [[]]
    acc = 0
    for r in rows:
        if acc + r[3] > shard_bytes and shards[-1]:
            shards.append([])
            acc = 0
        shards[-1].append(r)
        acc += r[3]
    n = len(shards)
    weight_map = {}
    total = 0
    for i, rs in enumerate(shards):
        fname = _shard_name(i + 1, n)
        hdr = {"__metadata__": {"format": "pt"}}
        off = 0
        for name, shp, dt, nb in rs:
            hdr[name] = {"dtype": dt, "shape": list(shp), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        js = json.dumps(hdr, separators=(",", ":")).encode()
        js += b" " * (-len(js) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(js)) + js)
            f.truncate(8 + len(js) + off)  # sparse: the data region is a hole
        total += off
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(make_config(spec), indent=2) + "\n")
    os.sync() if hasattr(os, "sync") else None
    return out


def real_v3_spec() -> FixtureSpec:
    """The full DeepSeek-V3/R1 shapes (671B + MTP), for headers-only layouts."""
    return FixtureSpec(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                       first_k_dense_replace=3, num_nextn_predict_layers=1, num_attention_heads=128, q_lora_rank=1536,
                       kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                       n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                       vocab_size=129280, num_shards=163)


# DeepSeek-V4 release-layout fixtures live in their own module (they need transformers to fix names and shapes).
from .deepseek_v4 import V4_PRESETS, V4Spec, build_v4_checkpoint, decoded_state_dict  # noqa: E402,F401
