"""The ``deepseek4`` GGUF layout (DeepSeek-V4 release checkpoints), as data.

The installed ``gguf`` package has no DEEPSEEK4 architecture, so the tensor names and KV keys that
llama.cpp's loader reads for ``deepseek4`` (``src/llama-model.cpp``, ``gguf-py/gguf/constants.py``
``MODEL_ARCH.DEEPSEEK4``) are written out here. Pure functions on config dicts, shapes and tensors;
no file I/O. It is the ``deepseek4`` entry of the exporter's architecture registry
(:mod:`dsconvert.formats.gguf_arch`): ``convert/gguf_export.py`` writes, splits, resumes and reports a V4
file with the same machinery as a V3 one.

Tensor rules (llama.cpp's DeepSeek-V4 converter, ``conversion/deepseek.py`` ``DeepseekV4Model``):

- routed experts (FP4 e2m1 two per byte + E8M0 per 32) are repacked without requantization into
  ggml ``block_mxfp4`` and stacked ``[E, out, in]`` (:func:`repack_mxfp4`);
- ``ffn.gate.tid2eid`` (hash layers) is written as I32; the hash layers' ``ffn.gate.bias`` is dropped;
- 1-D tensors and F32 sources stay F32; ``mtp.*`` is dropped (reported).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

from dsconvert.errors import UnsupportedError
from dsconvert.formats import gguf_deepseek2 as g2
from dsconvert.formats import gguf_types as gt

ARCH_NAME = "deepseek4"
#: llama.cpp ``LLAMA_FTYPE_MOSTLY_MXFP4_MOE``: the file type its converter writes for V4
FILE_TYPE_MXFP4_MOE = 38
#: ``LLAMA_EXPERT_GATING_FUNC_TYPE_SQRTSOFTPLUS``
GATING_SQRTSOFTPLUS = 4

#: why the release tensors left out are left out (reported with each)
DROP_REASON = "mtp.* (no MTP head exported) and the hash layers' unused ffn.gate.bias, as llama.cpp's converter"

#: release root tensor -> GGUF name
ROOT_NAMES: dict[str, str] = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "head.weight": "output.weight",
    "hc_head_fn": "output_hc_fn.weight",
    "hc_head_base": "output_hc_base.weight",
    "hc_head_scale": "output_hc_scale.weight",
}

#: release ``layers.N.<suffix>`` -> GGUF ``blk.N.<name>``
LAYER_NAMES: dict[str, str] = {
    "hc_attn_fn": "hc_attn_fn.weight",
    "hc_attn_base": "hc_attn_base.weight",
    "hc_attn_scale": "hc_attn_scale.weight",
    "hc_ffn_fn": "hc_ffn_fn.weight",
    "hc_ffn_base": "hc_ffn_base.weight",
    "hc_ffn_scale": "hc_ffn_scale.weight",
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn.attn_sink": "attn_sinks.weight",
    "attn.wq_a.weight": "attn_q_a.weight",
    "attn.wq_b.weight": "attn_q_b.weight",
    "attn.q_norm.weight": "attn_q_a_norm.weight",
    "attn.wkv.weight": "attn_kv.weight",
    "attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "attn.wo_a.weight": "attn_output_a.weight",
    "attn.wo_b.weight": "attn_output_b.weight",
    "attn.compressor.ape": "attn_compressor_ape.weight",
    "attn.compressor.wkv.weight": "attn_compressor_kv.weight",
    "attn.compressor.wgate.weight": "attn_compressor_gate.weight",
    "attn.compressor.norm.weight": "attn_compressor_norm.weight",
    "attn.indexer.wq_b.weight": "indexer.attn_q_b.weight",
    "attn.indexer.weights_proj.weight": "indexer.proj.weight",
    "attn.indexer.compressor.ape": "indexer_compressor_ape.weight",
    "attn.indexer.compressor.wkv.weight": "indexer_compressor_kv.weight",
    "attn.indexer.compressor.wgate.weight": "indexer_compressor_gate.weight",
    "attn.indexer.compressor.norm.weight": "indexer_compressor_norm.weight",
    "ffn.gate.weight": "ffn_gate_inp.weight",
    "ffn.gate.bias": "exp_probs_b.bias",
    "ffn.gate.bias_vl": "exp_probs_b_vl.bias",
    "ffn.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "ffn.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "ffn.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "ffn.shared_experts.w3.weight": "ffn_up_shexp.weight",
}

#: routed expert projection -> GGUF stacked tensor
EXPERT_NAMES: dict[str, str] = {"w1": "ffn_gate_exps.weight", "w2": "ffn_down_exps.weight",
                                "w3": "ffn_up_exps.weight"}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")

def _req(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise UnsupportedError(f"config.json lacks {key!r}, needed for a deepseek4 GGUF")
    return cfg[key]


def check_config(cfg: Mapping[str, Any]) -> None:
    """Refuse what llama.cpp's ``deepseek4`` loader rejects.

    Raises:
        UnsupportedError: scoring_func other than sqrtsoftplus, compress ratios outside {0, 4, 128} or
            shorter than the layer count.
    """
    if cfg.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise UnsupportedError(f"scoring_func {cfg.get('scoring_func')!r}: llama.cpp's deepseek4 needs sqrtsoftplus")
    ratios = list(_req(cfg, "compress_ratios"))
    if len(ratios) < int(_req(cfg, "num_hidden_layers")) or any(int(r) not in (0, 4, 128) for r in ratios):
        raise UnsupportedError(f"compress_ratios {ratios}: llama.cpp's deepseek4 loader needs one of 0/4/128 "
                               "per layer")


def metadata_items(cfg: Mapping[str, Any], file_type: int) -> list[tuple[str, str, Any]]:
    """The ``deepseek4.*`` / ``general.*`` KV pairs llama.cpp's loader reads, as ``(key, gguf-py type, value)``.

    Types are GGUFValueType names (``UINT32``, ``FLOAT32``, ``BOOL``, ``STRING``) or ``ARRAY_FLOAT32`` /
    ``ARRAY_INT32``. The tokenizer keys are written separately (``gguf_vocab``).

    Raises:
        UnsupportedError: a required config.json key is missing.
    """
    a = ARCH_NAME
    n_layer = int(_req(cfg, "num_hidden_layers"))
    rope = cfg.get("rope_scaling") or {}
    items: list[tuple[str, str, Any]] = [
        ("general.architecture", "STRING", a),
        ("general.file_type", "UINT32", file_type),
        ("general.quantization_version", "UINT32", 2),
        (f"{a}.block_count", "UINT32", n_layer),
        (f"{a}.context_length", "UINT32", int(_req(cfg, "max_position_embeddings"))),
        (f"{a}.embedding_length", "UINT32", int(_req(cfg, "hidden_size"))),
        (f"{a}.attention.head_count", "UINT32", int(_req(cfg, "num_attention_heads"))),
        (f"{a}.attention.head_count_kv", "UINT32", int(cfg.get("num_key_value_heads", 1))),
    ]
    if rope.get("type", rope.get("rope_type")) == "yarn":
        items += [
            (f"{a}.rope.scaling.type", "STRING", "yarn"),
            (f"{a}.rope.scaling.factor", "FLOAT32", float(rope["factor"])),
            (f"{a}.rope.scaling.original_context_length", "UINT32", int(rope["original_max_position_embeddings"])),
            (f"{a}.rope.scaling.yarn_beta_fast", "FLOAT32", float(rope.get("beta_fast", 32))),
            (f"{a}.rope.scaling.yarn_beta_slow", "FLOAT32", float(rope.get("beta_slow", 1))),
        ]
    swiglu = float(_req(cfg, "swiglu_limit"))
    items += [
        (f"{a}.rope.freq_base", "FLOAT32", float(_req(cfg, "rope_theta"))),
        (f"{a}.attention.layer_norm_rms_epsilon", "FLOAT32", float(_req(cfg, "rms_norm_eps"))),
        (f"{a}.expert_count", "UINT32", int(_req(cfg, "n_routed_experts"))),
        (f"{a}.expert_used_count", "UINT32", int(_req(cfg, "num_experts_per_tok"))),
        (f"{a}.expert_gating_func", "UINT32", GATING_SQRTSOFTPLUS),
        (f"{a}.attention.key_length", "UINT32", int(_req(cfg, "head_dim"))),
        (f"{a}.attention.value_length", "UINT32", int(_req(cfg, "head_dim"))),
        (f"{a}.rope.dimension_count", "UINT32", int(_req(cfg, "qk_rope_head_dim"))),
        (f"{a}.attention.q_lora_rank", "UINT32", int(_req(cfg, "q_lora_rank"))),
        (f"{a}.attention.sliding_window", "UINT32", int(_req(cfg, "sliding_window"))),
        (f"{a}.expert_feed_forward_length", "UINT32", int(_req(cfg, "moe_intermediate_size"))),
        (f"{a}.expert_shared_count", "UINT32", int(_req(cfg, "n_shared_experts"))),
        (f"{a}.expert_weights_scale", "FLOAT32", float(_req(cfg, "routed_scaling_factor"))),
        (f"{a}.expert_weights_norm", "BOOL", bool(_req(cfg, "norm_topk_prob"))),
        (f"{a}.swiglu_clamp_exp", "ARRAY_FLOAT32", [swiglu] * n_layer),
        (f"{a}.swiglu_clamp_shexp", "ARRAY_FLOAT32", [swiglu] * n_layer),
        (f"{a}.attention.indexer.head_count", "UINT32", int(_req(cfg, "index_n_heads"))),
        (f"{a}.attention.indexer.key_length", "UINT32", int(_req(cfg, "index_head_dim"))),
        (f"{a}.attention.indexer.top_k", "UINT32", int(_req(cfg, "index_topk"))),
        (f"{a}.attention.output_group_count", "UINT32", int(_req(cfg, "o_groups"))),
        (f"{a}.attention.output_lora_rank", "UINT32", int(_req(cfg, "o_lora_rank"))),
        (f"{a}.attention.compress_ratios", "ARRAY_INT32", [int(r) for r in _req(cfg, "compress_ratios")]),
        (f"{a}.attention.compress_rope_freq_base", "FLOAT32", float(_req(cfg, "compress_rope_theta"))),
        (f"{a}.hyper_connection.count", "UINT32", int(_req(cfg, "hc_mult"))),
        (f"{a}.hyper_connection.sinkhorn_iterations", "UINT32", int(_req(cfg, "hc_sinkhorn_iters"))),
        (f"{a}.hyper_connection.epsilon", "FLOAT32", float(_req(cfg, "hc_eps"))),
        (f"{a}.hash_layer_count", "UINT32", int(_req(cfg, "num_hash_layers"))),
        (f"{a}.embedding_length_out", "UINT32", int(cfg["hidden_size"]) * int(cfg["hc_mult"])),
    ]
    return items


def gguf_name(release_name: str) -> str | None:
    """GGUF name of a non-expert release tensor; None for ``mtp.*`` (dropped).

    Raises:
        UnsupportedError: a tensor the ``deepseek4`` layout has no place for.
    """
    if release_name.startswith("mtp."):
        return None
    if release_name in ROOT_NAMES:
        return ROOT_NAMES[release_name]
    m = _LAYER_RE.match(release_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    raise UnsupportedError(f"{release_name}: no deepseek4 GGUF tensor for it")


def plan_tensors(tensors: Mapping[str, tuple[tuple[int, ...], str]], cfg: Mapping[str, Any]) -> g2.GGUFPlan:
    """Plan every output tensor from release names, shapes and dtypes (``.scale`` partners included).

    Kinds (:class:`~dsconvert.formats.gguf_deepseek2.GGUFTensorPlan`): ``copy`` (BF16/F16/F32 as stored, or an
    FP8 e4m3 weight with its E8M0 ``.scale``: ``src_dtype`` ``F8_E4M3``, dequantized exactly), ``experts_mxfp4``
    (the FP4 experts of one projection, in expert-id order) and ``tid2eid`` (int -> I32). ``force_f32``: the
    converter stores it F32 (1-D, F32 sources); ``bid``: the layer.

    Returns:
        the plan (globals, then per layer, in llama.cpp's converter order) and the dropped release tensors.
    Raises:
        UnsupportedError: unmappable tensors, FP8 routed experts (V4 Flash-Base), incomplete experts.
    """
    n_hash = int(cfg.get("num_hash_layers", 0))
    n_exp = int(_req(cfg, "n_routed_experts"))
    plans: list[g2.GGUFTensorPlan] = []
    dropped: list[g2.DroppedTensor] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}

    def nbytes(shape, dtype) -> int:
        return math.prod(shape) * g2.DTYPE_BYTES[dtype]

    for name, (shape, dtype) in tensors.items():
        if name.endswith(".scale") and name[:-len(".scale")] + ".weight" in tensors:
            continue  # consumed with its weight
        e = _EXPERT_RE.match(name)
        if e:
            if dtype != "I8":
                raise UnsupportedError(f"{name}: routed experts stored as {dtype}; only the FP4 (I8 + E8M0) "
                                       "release experts go into a deepseek4 GGUF")
            experts.setdefault((int(e.group(1)), e.group(3)), {})[int(e.group(2))] = name
            continue
        gname = gguf_name(name)
        m = _LAYER_RE.match(name)
        if gname is None or (m and m.group(2) == "ffn.gate.bias" and int(m.group(1)) < n_hash):
            dropped.append(g2.DroppedTensor(name, tuple(shape), dtype, nbytes(shape, dtype), DROP_REASON))
            continue
        if name.endswith("ffn.gate.tid2eid"):
            kind = "tid2eid"
        elif dtype in ("F8_E4M3", "BF16", "F16", "F32"):
            kind = "copy"
        else:
            raise UnsupportedError(f"{name}: dtype {dtype} cannot go into a deepseek4 GGUF")
        plans.append(g2.GGUFTensorPlan(gname, tuple(shape), (name,), kind, len(shape) < 2 or dtype == "F32",
                                       int(m.group(1)) if m else None, dtype, nbytes(shape, dtype)))
    for (layer, proj), ids in sorted(experts.items()):
        if sorted(ids) != list(range(n_exp)):
            raise UnsupportedError(f"layer {layer} {proj}: experts {sorted(ids)} present, {n_exp} expected")
        srcs = tuple(ids[i] for i in range(n_exp))
        m_rows, half = tensors[srcs[0]][0]
        plans.append(g2.GGUFTensorPlan(f"blk.{layer}.{EXPERT_NAMES[proj]}", (n_exp, m_rows, 2 * half), srcs,
                                       "experts_mxfp4", False, layer, "I8", n_exp * m_rows * half))

    def key(p: g2.GGUFTensorPlan):
        return (0 if p.name.startswith("token_embd") else 2 if p.bid is None else 1, p.bid or 0)
    plans.sort(key=key)
    return g2.GGUFPlan(plans, dropped)


#: the routed experts (``--tensor-type`` rules for a mix end with ``EXPERTS_PATTERN=MXFP4``: as released)
EXPERTS_PATTERN = r"ffn_(gate|up|down)_exps\.weight$"
#: ``--type`` values written as llama.cpp's converter writes them (file type MXFP4_MOE)
CONVERTER_TYPES = ("BF16", "Q8_0")


def default_type(p: g2.GGUFTensorPlan, ftype: str) -> str:
    """ggml type of ``p`` in a ``--type ftype`` (``BF16`` | ``Q8_0``) file, as llama.cpp's converter writes it.

    F32-stored tensors (``force_f32``: 1-D, F32 sources) stay F32, tid2eid I32, experts MXFP4 (as released),
    BF16 sources BF16. FP8-sourced 2-D tensors: ``BF16`` keeps them exactly (e4m3 times a power of two is a
    BF16 value); ``Q8_0`` stores them Q8_0, as llama.cpp's converter forces them (whatever its ``--outtype``).

    Raises:
        UnsupportedError: another ``ftype``.
    """
    if ftype not in CONVERTER_TYPES:
        raise UnsupportedError(f"--type {ftype}: the converter's deepseek4 types are BF16 or Q8_0")
    if p.kind == "experts_mxfp4":
        return "MXFP4"
    if p.kind == "tid2eid":
        return "I32"
    if p.force_f32:
        return "F32"
    if p.src_dtype == "F8_E4M3" and ftype == "Q8_0":
        return "Q8_0"
    return "BF16"


def file_type(ftype: str) -> int:
    """``general.file_type``: MXFP4_MOE (38) for the converter's BF16/Q8_0 files, as llama.cpp's converter
    writes it; the llama-quantize mix's id otherwise (Q4_K_M 15), as ``llama_model_quantize`` writes it."""
    return FILE_TYPE_MXFP4_MOE if ftype in CONVERTER_TYPES else gt.file_type_id(ftype)


def plan_types(plan: g2.GGUFPlan, ftype: str, cfg: Mapping[str, Any], *, overrides=(), output_type=None,
               embd_type=None, pure: bool = False, has_imatrix: bool = False) -> dict[str, str]:
    """``{gguf name: ggml type}`` of a deepseek4 file of ``--type ftype``.

    ``BF16`` / ``Q8_0``: the converter's types (:func:`default_type`); ``--tensor-type`` rules (first match),
    ``--output-tensor-type`` and ``--token-embedding-type`` then replace the type of the tensors llama-quantize
    would quantize (:func:`~dsconvert.formats.gguf_types.tensor_allows_quantization`), with its shape fallback.

    A llama-quantize mix (``Q4_K_M``, ``Q2_K``, ``Q4_0``, ...): exactly the types ``llama_model_quantize`` gives
    the ``--type BF16`` file (:func:`~dsconvert.formats.gguf_types.plan_types` on it: F32-stored tensors count as
    F32 inputs, ``ffn_gate_inp`` stays BF16, tid2eid I32), with the rule ``EXPERTS_PATTERN=MXFP4`` after the
    user's: the FP4 experts stay MXFP4 byte for byte unless a user rule names them (source: llama.cpp
    ``src/llama-quant.cpp`` ``llama_tensor_get_type``; a rule whose type equals the tensor's is a copy there).

    Raises:
        ShapeError / UsageError: see :func:`~dsconvert.formats.gguf_types.choose_type`.
    """
    native = {t.name: default_type(t, "BF16") for t in plan}
    ovr = [gt.parse_tensor_type_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    n_layer = int(_req(cfg, "num_hidden_layers"))
    n_expert = int(_req(cfg, "n_routed_experts"))
    n_gqa = int(_req(cfg, "num_attention_heads")) // max(1, int(cfg.get("num_key_value_heads", 1)))
    if ftype not in CONVERTER_TYPES:
        return gt.plan_types(plan, ftype, n_layer=n_layer, n_expert=n_expert, n_gqa=n_gqa,
                             overrides=[*ovr, (EXPERTS_PATTERN, "MXFP4")], output_type=output_type,
                             embd_type=embd_type, pure=pure, src_types=native, fallback_f16=True,
                             has_imatrix=has_imatrix)
    out = {t.name: default_type(t, ftype) for t in plan}
    st = gt.QuantState()
    for t in plan:
        if not gt.tensor_allows_quantization(t.name, t.shape):
            continue
        cat = gt.tensor_category(t.name)
        want = (embd_type if cat == "TOKEN_EMBD" and embd_type else output_type if cat == "OUTPUT" and output_type
                else next((typ for pat, typ in ovr if re.search(pat, t.name)), None))
        if want is not None:
            out[t.name] = gt.tensor_type_fallback(t.name, t.shape[-1], gt.ggml_type(want).name, st)
    return out


def repack_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Release FP4 experts -> ggml ``block_mxfp4`` bytes, without requantization.

    Args:
        packed: ``[M, N/2]`` int8/uint8, two e2m1 codes a byte, element ``2j`` in the low nibble.
        scale: ``[M, N/32]`` E8M0 bytes (``float8_e8m0fnu`` or uint8).
    Returns:
        ``[M, N/32 * 17]`` uint8: per 32 elements the scale byte, then 16 bytes where byte ``j`` holds
        element ``j`` (low nibble) and ``j + 16`` (high). The codes and the exponent byte carry over
        unchanged: ggml's ``kvalues_mxfp4`` are twice the e2m1 values and ``ggml_e8m0_to_fp32_half`` is
        half of 2^(e-127) (``ggml-common.h`` ``block_mxfp4``; llama.cpp's ``repack_mxfp4_blocks``).
    Raises:
        ValueError: shapes that do not pair.
    """
    m, half = packed.shape
    n = 2 * half
    if n % 32 or tuple(scale.shape) != (m, n // 32):
        raise ValueError(f"FP4 scale {tuple(scale.shape)} does not match weight [{m}, {n}]")
    u8 = packed.contiguous().view(torch.uint8)
    codes = torch.stack((u8 & 0x0F, u8 >> 4), dim=-1).reshape(m, n // 32, 32)  # element order
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    sb = scale.contiguous().view(torch.uint8).reshape(m, n // 32, 1)
    return torch.cat((sb, qs), dim=-1).reshape(m, n // 32 * 17)
