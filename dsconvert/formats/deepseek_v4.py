"""The DeepSeek-V4 release layout as data: geometry from ``config.json`` and one table of tensor families.

Every V4 consumer (the fixture writer, pre-flight, ``inspect``, ``fp8-to-bf16``) reads the same table
:data:`FAMILIES`, so a tensor family is added in one place. Facts: docs/checkpoint-layout.md §11, §12, §13 and §14.

Notation: D hidden, H heads, hd head_dim, ql q_lora_rank, g o_groups, ol o_lora_rank, E routed experts,
I moe_intermediate_size, k experts per token, ih/ihd indexer heads/head dim, hc hc_mult, V vocab,
m compress ratio of the layer (0 sliding, 4 CSA, 128 HCA). Shapes are torch ``[out, in]`` = ``[M, N]``.

Storage kinds:

* ``fp8``: ``F8_E4M3 [M, N]`` + ``<stem>.scale`` ``F8_E8M0 [ceil(M/128), ceil(N/128)]``;
* ``expert``: the routed experts, per ``expert_dtype``: ``fp4`` = ``I8 [M, N/2]`` (two e2m1 codes per byte)
  + ``.scale F8_E8M0 [M, N/32]``; ``fp8`` = as ``fp8`` (V4-Flash-Base, whose scales may be F32);
* ``float``: BF16 or F32 as released (copied unchanged by every conversion);
* ``index``: the hash-routing table ``tid2eid`` (I64; I32 accepted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..errors import UnsupportedError

MODEL_TYPE = "deepseek_v4"
FP8_BLOCK = (128, 128)
FP4_GROUP = 32  # e2m1 elements per e8m0 scale, along N (the input dimension)
RATIO_KIND = {0: "sliding", 4: "csa", 128: "hca"}
EXPERT_DTYPES = ("fp4", "fp8")


@dataclass(frozen=True)
class V4Geometry:
    """The numbers of a V4 ``config.json`` that fix tensor names and shapes (release keys,
    docs/checkpoint-layout.md §11)."""

    vocab: int
    hidden: int
    layers: int
    mtp: int
    heads: int
    head_dim: int
    rope_dim: int
    q_lora: int
    o_groups: int
    o_lora: int
    experts: int
    experts_per_tok: int
    shared: int
    inter: int
    index_heads: int
    index_dim: int
    hc: int
    hash_layers: int
    ratios: tuple[int, ...]  # one per main layer, then one per MTP layer
    expert_dtype: str  # "fp4" | "fp8"
    quantized: bool  # config declares quantization_config (False for a BF16 output)

    def layer_prefix(self, i: int) -> str:
        """``layers.{i}.`` for main layers, ``mtp.{i - L}.`` for the MTP block(s)."""
        return f"layers.{i}." if i < self.layers else f"mtp.{i - self.layers}."

    def block_of(self, name: str) -> int | None:
        """The block index of a tensor, the inverse of :meth:`layer_prefix`: ``i`` for ``layers.{i}.*``,
        ``L + j`` for ``mtp.{j}.*`` (the numbering DeepSeek-V3 uses on disk for its MTP layer), else None."""
        m = _BLOCK_RE.match(name)
        if m is None:
            return None
        return int(m.group(2)) + (self.layers if m.group(1) == "mtp" else 0)

    def attention_kind(self, i: int) -> str:
        return RATIO_KIND[self.ratios[i]]

    def moe_kind(self, i: int) -> str:
        """``hash`` (``tid2eid`` routing) for main layers below ``num_hash_layers``, else ``routed``."""
        return "hash" if i < min(self.hash_layers, self.layers) else "routed"


def _int(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise UnsupportedError(f"config.json: {key} is {v!r}; a DeepSeek-V4 config needs a non-negative integer",
                               hint="restore the release's config.json")
    return v


def refuse_v41(cfg: dict, source: str = "config.json") -> None:
    """Refuse DeepSeek-V4.1 (and V4 variants with V4.1 traits), which have no oracle here.

    Raises:
        UnsupportedError: model_type ``deepseek_v41``, a nested ``text_config``/``vision_config``, Engram tables,
            or an FP8 block size other than 128x128 (V4.1 uses 32x32). docs/checkpoint-layout.md §14.
    """
    qc = cfg.get("quantization_config") or {}
    archs = cfg.get("architectures") or []
    why = None
    if cfg.get("model_type") == "deepseek_v41" or any("V41" in str(a) for a in archs):
        why = f"model_type {cfg.get('model_type')!r} / architectures {archs} is DeepSeek-V4.1"
    elif "text_config" in cfg or "vision_config" in cfg:
        why = "the config is nested (text_config/vision_config), as DeepSeek-V4.1's is"
    elif any(k.startswith("engram") for k in cfg):
        why = "it declares Engram n-gram tables (engram_*), a DeepSeek-V4.1 feature"
    elif qc.get("weight_block_size") not in (None, list(FP8_BLOCK)):
        why = (f"quantization_config.weight_block_size is {qc.get('weight_block_size')}, not [128, 128] "
               "(V4.1 uses 32x32)")
    if why:
        raise UnsupportedError(f"{source}: {why}; DeepSeek-V4.1 is not supported: neither transformers nor llama.cpp "
                               "here implements it, so there is no oracle to verify a conversion against",
                               hint="convert a DeepSeek-V4 (Flash, Pro, Flash-Base) checkpoint instead")


def geometry(cfg: dict, source: str = "config.json") -> V4Geometry:
    """Read a V4 release ``config.json`` (flat, legacy keys: ``compress_ratios``, ``num_hash_layers``,
    ``qk_rope_head_dim``) into :class:`V4Geometry`.

    Raises:
        UnsupportedError: V4.1 (see :func:`refuse_v41`); a missing/invalid key; ``compress_ratios`` shorter than
            layers + MTP layers or with values outside {0, 4, 128}; an unknown ``expert_dtype``; ``hc_mult`` != 4.
    """
    refuse_v41(cfg, source)
    L = _int(cfg, "num_hidden_layers")
    n_mtp = _int(cfg, "num_nextn_predict_layers", 0)
    ratios = cfg.get("compress_ratios")
    if ratios is None and isinstance(cfg.get("layer_types"), list):  # a transformers-saved config
        inv = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        ratios = [inv.get(t, -1) for t in cfg["layer_types"]] + [0] * n_mtp
    if not isinstance(ratios, list) or len(ratios) < L + n_mtp or any(r not in RATIO_KIND for r in ratios):
        raise UnsupportedError(f"{source}: compress_ratios {ratios!r} must list one of 0/4/128 for each of the "
                               f"{L} layers and {n_mtp} MTP layers", hint="restore the release's config.json")
    qc = cfg.get("quantization_config") or {}
    if qc and qc.get("quant_method") not in (None, "fp8"):
        qc = {}  # written by `dsconvert quantize` (compressed-tensors): no release FP8/FP4 storage left
    ed = qc.get("expert_dtype", cfg.get("expert_dtype", "fp8" if qc else "fp4"))
    if ed not in EXPERT_DTYPES:
        raise UnsupportedError(f"{source}: expert_dtype {ed!r} is unknown", hint="expected fp4 or fp8")
    if qc and qc.get("scale_fmt") != "ue8m0":
        raise UnsupportedError(f"{source}: quantization_config.scale_fmt is {qc.get('scale_fmt')!r}; DeepSeek-V4 "
                               "declares ue8m0", hint="restore the release's config.json")
    if _int(cfg, "hc_mult", 4) != 4:
        raise UnsupportedError(f"{source}: hc_mult {cfg['hc_mult']} is not 4 (every V4 release and llama.cpp use 4)")
    hd = _int(cfg, "head_dim")
    rope = cfg.get("qk_rope_head_dim")
    if rope is None and isinstance(cfg.get("partial_rotary_factor"), float):
        rope = int(hd * cfg["partial_rotary_factor"])
    if "num_hash_layers" in cfg:
        n_hash = _int(cfg, "num_hash_layers")
    elif isinstance(cfg.get("mlp_layer_types"), list):
        n_hash = sum(1 for t in cfg["mlp_layer_types"] if t == "hash_moe")
    else:
        n_hash = 3
    return V4Geometry(
        vocab=_int(cfg, "vocab_size"), hidden=_int(cfg, "hidden_size"), layers=L, mtp=n_mtp,
        heads=_int(cfg, "num_attention_heads"), head_dim=hd,
        rope_dim=_int({"qk_rope_head_dim": rope}, "qk_rope_head_dim"),
        q_lora=_int(cfg, "q_lora_rank"), o_groups=_int(cfg, "o_groups"), o_lora=_int(cfg, "o_lora_rank"),
        experts=_int(cfg, "n_routed_experts"), experts_per_tok=_int(cfg, "num_experts_per_tok"),
        shared=_int(cfg, "n_shared_experts", 1), inter=_int(cfg, "moe_intermediate_size"),
        index_heads=_int(cfg, "index_n_heads"), index_dim=_int(cfg, "index_head_dim"), hc=4,
        hash_layers=n_hash, ratios=tuple(ratios[: L + n_mtp]), expert_dtype=ed, quantized=bool(qc))


# -- the tensor families ----------------------------------------------------------------------------------------

Shape = Callable[[V4Geometry, int], tuple]  # (geometry, compress ratio m) -> shape


@dataclass(frozen=True)
class Family:
    """One kind of tensor of the release layout.

    Attributes:
        release: name under its prefix (``attn.wq_a.weight``); ``{e}`` stands for the expert index.
        hf: transformers' name under ``model.layers.{i}.`` (globals: the full name); None for routed experts,
            which transformers merges (``gate_up_proj = cat(w1, w3)``, ``down_proj = w2``).
        storage: ``fp8`` | ``expert`` | ``float`` | ``index``.
        shape: ``(geometry, m) -> shape`` of the logical (dequantized) tensor.
        when: which layers hold it: ``all``, ``compress`` (m != 0), ``csa`` (m == 4), ``hash`` (hash-routed
            layers), ``routed`` (the others), ``mtp`` (MTP blocks only), ``global`` (no prefix).
        role: what it is, for ``inspect`` and the quantization policy (``linear``, ``norm``, ``router``, ``hc``,
            ``sink``, ``embed``, ``head``, ``compressor``, ``indexer``, ``hash``).
        dtype: the dtype the release stores a ``float``/``index`` tensor in (the fixture writes it; readers
            accept any float dtype for ``float`` and I64/I32 for ``index``).
    """

    release: str
    hf: str | None
    storage: str
    shape: Shape
    when: str
    role: str
    dtype: str = "BF16"  # the release's dtype for float/index storage (F32, BF16, I64)


def _c(m: int) -> int:
    """CSA doubles the compressor width (overlapping windows); HCA does not."""
    return 2 if m == 4 else 1


_mix = lambda g: (2 + g.hc) * g.hc  # noqa: E731 - pre(hc) + post(hc) + comb(hc*hc)

GLOBAL_FAMILIES: list[Family] = [
    Family("embed.weight", "model.embed_tokens.weight", "float", lambda g, m: (g.vocab, g.hidden), "global", "embed"),
    Family("head.weight", "lm_head.weight", "float", lambda g, m: (g.vocab, g.hidden), "global", "head"),
    Family("norm.weight", "model.norm.weight", "float", lambda g, m: (g.hidden,), "global", "norm"),
    Family("hc_head_fn", "model.hc_head.hc_fn", "float", lambda g, m: (g.hc, g.hc * g.hidden), "global", "hc",
           dtype="F32"),
    Family("hc_head_base", "model.hc_head.hc_base", "float", lambda g, m: (g.hc,), "global", "hc", dtype="F32"),
    Family("hc_head_scale", "model.hc_head.hc_scale", "float", lambda g, m: (1,), "global", "hc", dtype="F32"),
]

LAYER_FAMILIES: list[Family] = [
    Family("hc_attn_fn", "attn_hc.fn", "float", lambda g, m: (_mix(g), g.hc * g.hidden), "all", "hc", dtype="F32"),
    Family("hc_attn_base", "attn_hc.base", "float", lambda g, m: (_mix(g),), "all", "hc", dtype="F32"),
    Family("hc_attn_scale", "attn_hc.scale", "float", lambda g, m: (3,), "all", "hc", dtype="F32"),
    Family("hc_ffn_fn", "ffn_hc.fn", "float", lambda g, m: (_mix(g), g.hc * g.hidden), "all", "hc", dtype="F32"),
    Family("hc_ffn_base", "ffn_hc.base", "float", lambda g, m: (_mix(g),), "all", "hc", dtype="F32"),
    Family("hc_ffn_scale", "ffn_hc.scale", "float", lambda g, m: (3,), "all", "hc", dtype="F32"),
    Family("attn_norm.weight", "input_layernorm.weight", "float", lambda g, m: (g.hidden,), "all", "norm"),
    Family("ffn_norm.weight", "post_attention_layernorm.weight", "float", lambda g, m: (g.hidden,), "all", "norm"),
    Family("attn.attn_sink", "self_attn.sinks", "float", lambda g, m: (g.heads,), "all", "sink", dtype="F32"),
    Family("attn.wq_a.weight", "self_attn.q_a_proj.weight", "fp8", lambda g, m: (g.q_lora, g.hidden), "all",
           "linear"),
    Family("attn.q_norm.weight", "self_attn.q_a_norm.weight", "float", lambda g, m: (g.q_lora,), "all", "norm"),
    Family("attn.wq_b.weight", "self_attn.q_b_proj.weight", "fp8", lambda g, m: (g.heads * g.head_dim, g.q_lora),
           "all", "linear"),
    Family("attn.wkv.weight", "self_attn.kv_proj.weight", "fp8", lambda g, m: (g.head_dim, g.hidden), "all",
           "linear"),
    Family("attn.kv_norm.weight", "self_attn.kv_norm.weight", "float", lambda g, m: (g.head_dim,), "all", "norm"),
    # rows are group-major: o_groups blocks of o_lora rows (keep groups whole when sharding or quantizing)
    Family("attn.wo_a.weight", "self_attn.o_a_proj.weight", "fp8",
           lambda g, m: (g.o_groups * g.o_lora, g.heads * g.head_dim // g.o_groups), "all", "linear"),
    Family("attn.wo_b.weight", "self_attn.o_b_proj.weight", "fp8", lambda g, m: (g.hidden, g.o_groups * g.o_lora),
           "all", "linear"),
    Family("attn.compressor.ape", "self_attn.compressor.position_bias", "float",
           lambda g, m: (m, _c(m) * g.head_dim), "compress", "compressor", dtype="F32"),
    Family("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", "float",
           lambda g, m: (_c(m) * g.head_dim, g.hidden), "compress", "compressor"),
    Family("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", "float",
           lambda g, m: (_c(m) * g.head_dim, g.hidden), "compress", "compressor"),
    Family("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", "float",
           lambda g, m: (g.head_dim,), "compress", "norm"),
    Family("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight", "fp8",
           lambda g, m: (g.index_heads * g.index_dim, g.q_lora), "csa", "indexer"),
    Family("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight", "float",
           lambda g, m: (g.index_heads, g.hidden), "csa", "indexer"),
    Family("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias", "float",
           lambda g, m: (m, 2 * g.index_dim), "csa", "indexer", dtype="F32"),
    Family("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight", "float",
           lambda g, m: (2 * g.index_dim, g.hidden), "csa", "indexer"),
    Family("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight", "float",
           lambda g, m: (2 * g.index_dim, g.hidden), "csa", "indexer"),
    Family("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight", "float",
           lambda g, m: (g.index_dim,), "csa", "norm"),
    Family("ffn.gate.weight", "mlp.gate.weight", "float", lambda g, m: (g.experts, g.hidden), "all", "router"),
    Family("ffn.gate.bias", "mlp.gate.e_score_correction_bias", "float", lambda g, m: (g.experts,), "routed",
           "router", dtype="F32"),
    Family("ffn.gate.tid2eid", "mlp.gate.tid2eid", "index", lambda g, m: (g.vocab, g.experts_per_tok), "hash",
           "hash", dtype="I64"),
    Family("ffn.experts.{e}.w1.weight", None, "expert", lambda g, m: (g.inter, g.hidden), "all", "linear"),
    Family("ffn.experts.{e}.w2.weight", None, "expert", lambda g, m: (g.hidden, g.inter), "all", "linear"),
    Family("ffn.experts.{e}.w3.weight", None, "expert", lambda g, m: (g.inter, g.hidden), "all", "linear"),
    Family("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", "fp8",
           lambda g, m: (g.inter * g.shared, g.hidden), "all", "linear"),
    Family("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", "fp8",
           lambda g, m: (g.hidden, g.inter * g.shared), "all", "linear"),
    Family("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", "fp8",
           lambda g, m: (g.inter * g.shared, g.hidden), "all", "linear"),
    # the MTP block's extras (transformers does not instantiate MTP: no HF names)
    Family("e_proj.weight", None, "fp8", lambda g, m: (g.hidden, g.hidden), "mtp", "linear"),
    Family("h_proj.weight", None, "fp8", lambda g, m: (g.hidden, g.hidden), "mtp", "linear"),
    Family("enorm.weight", None, "float", lambda g, m: (g.hidden,), "mtp", "norm"),
    Family("hnorm.weight", None, "float", lambda g, m: (g.hidden,), "mtp", "norm"),
    Family("norm.weight", None, "float", lambda g, m: (g.hidden,), "mtp", "norm"),
    Family("hc_head_fn", None, "float", lambda g, m: (g.hc, g.hc * g.hidden), "mtp", "hc", dtype="F32"),
    Family("hc_head_base", None, "float", lambda g, m: (g.hc,), "mtp", "hc", dtype="F32"),
    Family("hc_head_scale", None, "float", lambda g, m: (1,), "mtp", "hc", dtype="F32"),
]


@dataclass(frozen=True)
class Expected:
    """One logical tensor the layout requires: release name, logical shape, storage, HF name, layer (-1 global),
    expert index (or None) and its family."""

    name: str
    shape: tuple[int, ...]
    storage: str
    hf: str | None
    layer: int
    expert: int | None
    family: Family


def _present(f: Family, g: V4Geometry, i: int) -> bool:
    m = g.ratios[i]
    mtp = i >= g.layers
    return {"all": True, "compress": m != 0, "csa": m == 4, "hash": g.moe_kind(i) == "hash",
            "routed": g.moe_kind(i) == "routed", "mtp": mtp}[f.when]


def expected_tensors(g: V4Geometry) -> list[Expected]:
    """Every logical tensor of the release layout in file order (globals first, then layers, then MTP).

    Scales are not listed: :func:`scale_shape` gives each quantized weight's partner.
    """
    out = [Expected(f.release, f.shape(g, 0), f.storage, f.hf, -1, None, f) for f in GLOBAL_FAMILIES]
    for i in range(g.layers + g.mtp):
        p = g.layer_prefix(i)
        m = g.ratios[i]
        for f in LAYER_FAMILIES:
            if not _present(f, g, i):
                continue
            hf = None if f.hf is None or i >= g.layers else f"model.layers.{i}.{f.hf}"
            if "{e}" in f.release:
                out += [Expected(p + f.release.format(e=e), f.shape(g, m), f.storage, None, i, e, f)
                        for e in range(g.experts)]
            else:
                out.append(Expected(p + f.release, f.shape(g, m), f.storage, hf, i, None, f))
    return out


def scale_name(weight: str) -> str:
    """``layers.0.attn.wq_a.weight`` -> ``layers.0.attn.wq_a.scale``."""
    return weight[: -len(".weight")] + ".scale"


def stored_dtype(e: Expected, g: V4Geometry) -> str | None:
    """The safetensors dtype the release stores ``e`` in for quantized storage kinds (``F8_E4M3`` / ``I8``);
    None for float/index tensors (several dtypes accepted)."""
    if not g.quantized:
        return None
    if e.storage == "fp8" or (e.storage == "expert" and g.expert_dtype == "fp8"):
        return "F8_E4M3"
    if e.storage == "expert":
        return "I8"
    return None


def stored_shape(e: Expected, g: V4Geometry) -> tuple[int, ...]:
    """The stored weight shape: ``[M, N/2]`` for FP4 experts, else the logical shape."""
    if stored_dtype(e, g) == "I8":
        return (e.shape[0], e.shape[1] // 2)
    return e.shape


def scale_shape(e: Expected, g: V4Geometry) -> tuple[int, int] | None:
    """The ``.scale`` grid of a quantized weight: ``[ceil(M/128), ceil(N/128)]`` (FP8) or ``[M, N/32]`` (FP4);
    None when ``e`` is not stored quantized."""
    dt = stored_dtype(e, g)
    if dt is None:
        return None
    m, n = e.shape
    if dt == "I8":
        return (m, n // FP4_GROUP)
    return (-(-m // FP8_BLOCK[0]), -(-n // FP8_BLOCK[1]))


def layer_schedule(g: V4Geometry) -> list[dict]:
    """Per layer (MTP included): ``{"layer", "name", "attention", "compress_ratio", "moe"}``."""
    return [{"layer": i, "name": g.layer_prefix(i).rstrip("."), "attention": g.attention_kind(i),
             "compress_ratio": g.ratios[i], "moe": g.moe_kind(i)} for i in range(g.layers + g.mtp)]


_LAYER_RE = re.compile(r"^layers\.(\d+)\.")
_BLOCK_RE = re.compile(r"^(layers|mtp)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """``i`` of a main-layer tensor ``layers.{i}.*``, else None (globals, ``mtp.*``)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


#: The 2-D weights ``quantize`` may quantize (release names: ``layers.{i}.`` and the MTP block ``mtp.{j}.``):
#: the FP8 attention linears, the CSA indexer's FP8 query projection, the shared and routed experts (FP4 or
#: FP8).
QUANTIZABLE = re.compile(
    r"^(?:layers|mtp)\.(?P<layer>\d+)\.(?:"
    r"attn\.(?P<attn>wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)"
    r"|ffn\.experts\.(?P<expert>\d+)\.(?P<eproj>w1|w2|w3)"
    r"|ffn\.shared_experts\.(?P<sproj>w1|w2|w3)"
    r")\.weight$")

#: The linears kept in their float dtype, as the release and the engines keep them (ignore-list patterns): the
#: head, the router ``ffn.gate``, the BF16 compressor / indexer projections (no scale in the release), the MTP
#: ``e_proj``/``h_proj`` (as V3's ``eh_proj``).
KEPT_LINEARS = ("head", r"re:.*ffn\.gate$", r"re:.*attn\.compressor\.(wkv|wgate)$",
                r"re:.*attn\.indexer\.(weights_proj|compressor\.wkv|compressor\.wgate)$",
                r"re:^mtp\.\d+\.(e_proj|h_proj)$")


def fused_group(weight_name: str) -> str | None:
    """The fused group of a quantizable weight (its members share one precision), else None: each shared
    expert's {w1, w3} (gate/up, fused by the engines) and all routed experts of a layer (one FusedMoE)."""
    m = QUANTIZABLE.match(weight_name)
    if m is None:
        return None
    where = weight_name.split(".", 2)
    layer = f"{where[0]}.{where[1]}"
    if m.group("expert") is not None:
        return f"{layer}: all routed experts (FusedMoE)"
    if m.group("sproj") in ("w1", "w3"):
        return f"{layer}: shared_experts w1 + w3 (gate_up_proj)"
    return None


def is_routed_expert(name: str) -> bool:
    """True for a routed expert's tensor (``layers.{i}.ffn.experts.{e}.*``; the shared expert is not one)."""
    return ".ffn.experts." in name
