"""The ``deepseek4`` GGUF layout (DeepSeek-V4 release checkpoints), as data.

The installed ``gguf`` package has no DEEPSEEK4 architecture, so the tensor names and KV keys that
llama.cpp's loader reads for ``deepseek4`` (``src/llama-model.cpp``, ``gguf-py/gguf/constants.py``
``MODEL_ARCH.DEEPSEEK4``) are written out here. Pure functions on config dicts, shapes and tensors;
no file I/O. The exporter (``convert/gguf_v4.py``) reads the release tensors each
:class:`V4TensorPlan` names and writes them.

Tensor rules (llama.cpp's DeepSeek-V4 converter, ``conversion/deepseek.py`` ``DeepseekV4Model``):

- routed experts (FP4 e2m1 two per byte + E8M0 per 32) are repacked without requantization into
  ggml ``block_mxfp4`` and stacked ``[E, out, in]`` (:func:`repack_mxfp4`);
- ``ffn.gate.tid2eid`` (hash layers) is written as I32; the hash layers' ``ffn.gate.bias`` is dropped;
- 1-D tensors and F32 sources stay F32; ``mtp.*`` is dropped (reported).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from dsconvert.errors import UnsupportedError

ARCH_NAME = "deepseek4"
#: llama.cpp ``LLAMA_FTYPE_MOSTLY_MXFP4_MOE``: the file type its converter writes for V4
FILE_TYPE_MXFP4_MOE = 38
#: ``LLAMA_EXPERT_GATING_FUNC_TYPE_SQRTSOFTPLUS``
GATING_SQRTSOFTPLUS = 4

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

V4Kind = Literal["copy", "fp8", "experts_mxfp4", "tid2eid"]


@dataclass(frozen=True)
class V4TensorPlan:
    """One output tensor of a ``deepseek4`` GGUF.

    Attributes:
        name: GGUF name (``blk.0.ffn_gate_exps.weight``).
        shape: numpy-order shape (ggml ``ne`` reversed), in elements.
        sources: release tensor names (experts: ``w`` weights in expert-id order).
        kind: ``copy`` (BF16/F32 as stored), ``fp8`` (e4m3 + E8M0 ``.scale``, dequantized to float32),
            ``experts_mxfp4`` (FP4 experts repacked to MXFP4), ``tid2eid`` (int -> I32).
        src_dtype: safetensors dtype of the (first) source.
    """

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    kind: V4Kind
    src_dtype: str

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


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


def plan_tensors(tensors: Mapping[str, tuple[tuple[int, ...], str]], cfg: Mapping[str, Any]
                 ) -> tuple[list[V4TensorPlan], list[str]]:
    """Plan every output tensor from release names, shapes and dtypes (``.scale`` partners included).

    Returns:
        (plans in file order: globals, then per layer; dropped release names).
    Raises:
        UnsupportedError: unmappable tensors, FP8 routed experts (V4 Flash-Base), incomplete experts.
    """
    n_hash = int(cfg.get("num_hash_layers", 0))
    n_exp = int(_req(cfg, "n_routed_experts"))
    plans: list[V4TensorPlan] = []
    dropped: list[str] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}
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
            dropped.append(name)
            continue
        if name.endswith("ffn.gate.tid2eid"):
            kind: V4Kind = "tid2eid"
        elif dtype == "F8_E4M3":
            kind = "fp8"
        elif dtype in ("BF16", "F16", "F32"):
            kind = "copy"
        else:
            raise UnsupportedError(f"{name}: dtype {dtype} cannot go into a deepseek4 GGUF")
        plans.append(V4TensorPlan(gname, tuple(shape), (name,), kind, dtype))
    for (layer, proj), ids in sorted(experts.items()):
        if sorted(ids) != list(range(n_exp)):
            raise UnsupportedError(f"layer {layer} {proj}: experts {sorted(ids)} present, {n_exp} expected")
        srcs = tuple(ids[i] for i in range(n_exp))
        m_rows, half = tensors[srcs[0]][0]
        plans.append(V4TensorPlan(f"blk.{layer}.{EXPERT_NAMES[proj]}", (n_exp, m_rows, 2 * half), srcs,
                                  "experts_mxfp4", "I8"))

    def key(p: V4TensorPlan):
        b = re.match(r"^blk\.(\d+)\.", p.name)
        return (0 if p.name.startswith("token_embd") else 2 if b is None else 1, int(b.group(1)) if b else 0)
    plans.sort(key=key)
    return plans, dropped


def default_type(p: V4TensorPlan, ftype: str) -> str:
    """ggml type of ``p`` in a ``--type ftype`` (``BF16`` | ``Q8_0``) file.

    1-D and F32 sources stay F32, tid2eid I32, experts MXFP4 (as released), BF16 sources BF16.
    FP8-sourced 2-D tensors: ``BF16`` keeps them exactly (e4m3 times a power of two is a BF16 value);
    ``Q8_0`` stores them Q8_0, as llama.cpp's converter forces them (whatever its ``--outtype``).

    Raises:
        UnsupportedError: another ``ftype``.
    """
    if ftype not in ("BF16", "Q8_0"):
        raise UnsupportedError(f"--type {ftype}: a deepseek4 GGUF is written as BF16 or Q8_0")
    if p.kind == "experts_mxfp4":
        return "MXFP4"
    if p.kind == "tid2eid":
        return "I32"
    if len(p.shape) < 2 or p.src_dtype == "F32":
        return "F32"
    if p.kind == "fp8" and ftype == "Q8_0":
        return "Q8_0"
    return "BF16"


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
