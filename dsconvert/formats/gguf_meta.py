"""``deepseek2`` GGUF metadata (KV pairs) from a DeepSeek-V2/V3 ``config.json`` dict.

One function computes the items (:func:`metadata_items`): each is the GGUFWriter typed setter to
call, the exact key it writes and the value. :func:`write_metadata` calls the setters;
:func:`metadata_dict` returns ``{key: value}`` for ``--dry-run`` / ``inspect``. Both therefore
always agree.

Source: llama.cpp ``conversion/base.py::TextModel.set_gguf_parameters`` and
``conversion/deepseek.py::DeepseekV2Model.set_gguf_parameters``; values per
docs/gguf-deepseek2.md §2:

- ``attention.head_count_kv = 1`` (MLA presented as MQA over the latent);
- ``key_length = kv_lora + rope``, ``value_length = kv_lora``; ``key_length_mla = nope + rope``,
  ``value_length_mla = v_head`` (both *_mla keys switch MLA mode on, PR #12801);
- ``rope.scaling.yarn_log_multiplier = 0.1 * mscale_all_dim`` (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX);
- ``expert_gating_func``: softmax = 1, sigmoid = 2 (V3 must say 2);
- ``expert_weights_scale`` only if ``routed_scaling_factor`` is present, ``expert_weights_norm``
  only if ``norm_topk_prob`` is true; no ``nextn_predict_layers`` (MTP is dropped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import gguf
from gguf import ExpertGatingFuncType, Keys, RopeScalingType

from dsconvert.errors import UnsupportedError
from dsconvert.formats.gguf_names import ARCH_NAME


@dataclass(frozen=True)
class MetaItem:
    """One KV pair: ``getattr(writer, setter)(arg)`` writes ``key = value``."""

    setter: str
    key: str
    value: Any  # the value as read back (enum values unwrapped)
    arg: Any  # what the setter takes (e.g. an enum member)


log = logging.getLogger(__name__)

_GATING = {"softmax": ExpertGatingFuncType.SOFTMAX, "sigmoid": ExpertGatingFuncType.SIGMOID}


def _k(template: str) -> str:
    return template.format(arch=ARCH_NAME)


def _rope_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """rope_scaling (transformers 4.x) or rope_parameters (5.x), whichever config.json has."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return dict(rope)


def _req(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise UnsupportedError(f"config.json lacks {key!r}, required for deepseek2 GGUF metadata")
    return cfg[key]


def metadata_items(cfg: Mapping[str, Any], file_type: int, extra: Mapping[str, Any] | None = None) -> list[MetaItem]:
    """Every KV pair ``write_metadata`` writes, in writing order.

    Args:
        cfg: config.json (DeepSeek-V2/V3) as a plain dict; never an ``AutoConfig``.
        file_type: ``general.file_type`` (``LlamaFileType`` value, e.g. 32 BF16, 7 Q8_0, 15 Q4_K_M).
        extra: additional ``general.*`` (or other) keys; str -> string, bool -> bool,
            int -> u32, float -> f32.

    Raises:
        UnsupportedError: ``model_type`` deepseek_v32 (out of scope), a missing required key, an
            unknown ``scoring_func`` or rope scaling type.
    """
    if cfg.get("model_type") == "deepseek_v32":
        raise UnsupportedError("DeepSeek-V3.2 (deepseek_v32) is not supported by the deepseek2 layout",
                               hint="V3.2 needs llama.cpp's deepseek32 arch")
    items: list[MetaItem] = []

    def add(setter: str, key: str, value: Any, arg: Any = None) -> None:
        items.append(MetaItem(setter, key, value, value if arg is None else arg))

    L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
    kv_lora = int(cfg.get("kv_lora_rank", 512))
    rope_dim = int(_req(cfg, "qk_rope_head_dim"))
    has_moe = cfg.get("n_routed_experts") is not None

    # -- TextModel.set_gguf_parameters (base)
    add("add_block_count", _k(L.BLOCK_COUNT), int(_req(cfg, "num_hidden_layers")))
    if cfg.get("max_position_embeddings") is not None:
        add("add_context_length", _k(L.CONTEXT_LENGTH), int(cfg["max_position_embeddings"]))
    add("add_embedding_length", _k(L.EMBEDDING_LENGTH), int(_req(cfg, "hidden_size")))
    if cfg.get("intermediate_size") is not None:
        add("add_feed_forward_length", _k(L.FEED_FORWARD_LENGTH), int(cfg["intermediate_size"]))
    add("add_head_count", _k(A.HEAD_COUNT), int(_req(cfg, "num_attention_heads")))
    add("add_head_count_kv", _k(A.HEAD_COUNT_KV), 1)  # forced: MLA as MQA over the latent

    rope = _rope_params(cfg)
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default"):
        factor = rope.get("factor")
        if rope_type == "yarn" and factor is not None:
            add("add_rope_scaling_type", _k(R.SCALING_TYPE), RopeScalingType.YARN.value, RopeScalingType.YARN)
            add("add_rope_scaling_factor", _k(R.SCALING_FACTOR), float(factor))
            add("add_rope_scaling_orig_ctx_len", _k(R.SCALING_ORIG_CTX_LEN),
                int(rope["original_max_position_embeddings"]))
            if rope.get("extrapolation_factor") is not None:
                add("add_rope_scaling_yarn_ext_factor", _k(R.SCALING_YARN_EXT_FACTOR), float(rope["extrapolation_factor"]))
            attn_factor = rope.get("attention_factor", rope.get("attn_factor"))
            if attn_factor is not None:
                add("add_rope_scaling_yarn_attn_factor", _k(R.SCALING_YARN_ATTN_FACTOR), float(attn_factor))
            if rope.get("beta_fast") is not None:
                add("add_rope_scaling_yarn_beta_fast", _k(R.SCALING_YARN_BETA_FAST), float(rope["beta_fast"]))
            if rope.get("beta_slow") is not None:
                add("add_rope_scaling_yarn_beta_slow", _k(R.SCALING_YARN_BETA_SLOW), float(rope["beta_slow"]))
        elif rope_type == "linear" and factor is not None:
            add("add_rope_scaling_type", _k(R.SCALING_TYPE), RopeScalingType.LINEAR.value, RopeScalingType.LINEAR)
            add("add_rope_scaling_factor", _k(R.SCALING_FACTOR), float(factor))
        else:
            raise UnsupportedError(f"rope scaling type {rope_type!r} is not supported for deepseek2")
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if rope_theta is not None:
        add("add_rope_freq_base", _k(R.FREQ_BASE), float(rope_theta))
    add("add_layer_norm_rms_eps", _k(A.LAYERNORM_RMS_EPS), float(cfg.get("rms_norm_eps", 1e-6)))
    if cfg.get("num_experts_per_tok") is not None:
        add("add_expert_used_count", _k(L.EXPERT_USED_COUNT), int(cfg["num_experts_per_tok"]))
    if cfg.get("n_group") is not None:
        add("add_expert_group_count", _k(L.EXPERT_GROUP_COUNT), int(cfg["n_group"]))
    if cfg.get("topk_group") is not None:
        add("add_expert_group_used_count", _k(L.EXPERT_GROUP_USED_COUNT), int(cfg["topk_group"]))
    score = cfg.get("scoring_func")
    if score is not None:
        if score not in _GATING:
            raise UnsupportedError(f"unsupported scoring_func {score!r} (expected softmax or sigmoid)")
        add("add_expert_gating_func", _k(L.EXPERT_GATING_FUNC), _GATING[score].value, _GATING[score])
    add("add_file_type", Keys.General.FILE_TYPE, int(file_type))

    # -- DeepseekV2Model.set_gguf_parameters
    first_k = cfg.get("first_k_dense_replace")
    if first_k is None:
        first_k = 0 if has_moe else int(cfg["num_hidden_layers"])
    add("add_leading_dense_block_count", _k(L.LEADING_DENSE_BLOCK_COUNT), int(first_k))
    add("add_vocab_size", _k(L.VOCAB_SIZE), int(_req(cfg, "vocab_size")))
    if cfg.get("q_lora_rank") is not None:
        add("add_q_lora_rank", _k(A.Q_LORA_RANK), int(cfg["q_lora_rank"]))
    elif int(cfg["num_hidden_layers"]) not in (26, 27):
        # llama.cpp infers "V2-Lite" (attn_q instead of q_a/q_b) from block_count alone; any other
        # layer count requires attention.q_lora_rank (checked with llama-cpp-python 0.3.36).
        log.warning("q_lora_rank is null but num_hidden_layers=%s: llama.cpp only loads deepseek2 "
                    "without q_lora_rank when block_count is 27 (V2-Lite)", cfg["num_hidden_layers"])
    add("add_kv_lora_rank", _k(A.KV_LORA_RANK), kv_lora)
    add("add_key_length", _k(A.KEY_LENGTH), kv_lora + rope_dim)
    add("add_value_length", _k(A.VALUE_LENGTH), kv_lora)
    add("add_key_length_mla", _k(A.KEY_LENGTH_MLA), int(_req(cfg, "qk_nope_head_dim")) + rope_dim)
    add("add_value_length_mla", _k(A.VALUE_LENGTH_MLA), int(_req(cfg, "v_head_dim")))
    moe_ff = cfg.get("moe_intermediate_size", cfg.get("intermediate_size"))
    if moe_ff is None:
        raise UnsupportedError("config.json lacks moe_intermediate_size / intermediate_size")
    add("add_expert_feed_forward_length", _k(L.EXPERT_FEED_FORWARD_LENGTH), int(moe_ff))
    if has_moe:
        add("add_expert_count", _k(L.EXPERT_COUNT), int(cfg["n_routed_experts"]))
    add("add_expert_shared_count", _k(L.EXPERT_SHARED_COUNT), int(cfg.get("n_shared_experts") or 0))
    if cfg.get("routed_scaling_factor") is not None:
        add("add_expert_weights_scale", _k(L.EXPERT_WEIGHTS_SCALE), float(cfg["routed_scaling_factor"]))
    if cfg.get("norm_topk_prob"):
        add("add_expert_weights_norm", _k(L.EXPERT_WEIGHTS_NORM), True)
    add("add_rope_dimension_count", _k(R.DIMENSION_COUNT), rope_dim)
    if rope.get("mscale_all_dim") is not None:
        # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: the loader divides by 0.1 again (llama.cpp PR #17945)
        add("add_rope_scaling_yarn_log_mul", _k(R.SCALING_YARN_LOG_MUL), 0.1 * float(rope["mscale_all_dim"]))

    # -- prepare_metadata
    add("add_quantization_version", Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)

    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            items.append(MetaItem("add_bool", key, value, value))
        elif isinstance(value, int):
            items.append(MetaItem("add_uint32", key, value, value))
        elif isinstance(value, float):
            items.append(MetaItem("add_float32", key, value, value))
        elif isinstance(value, str):
            items.append(MetaItem("add_string", key, value, value))
        else:
            raise UnsupportedError(f"extra metadata {key!r}: unsupported value type {type(value).__name__}")
    return items


def metadata_dict(cfg: Mapping[str, Any], file_type: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{key: value}`` of everything :func:`write_metadata` writes (plus ``general.architecture``)."""
    out: dict[str, Any] = {Keys.General.ARCHITECTURE: ARCH_NAME}
    for it in metadata_items(cfg, file_type, extra):
        out[it.key] = it.value
    return out


def write_metadata(writer: gguf.GGUFWriter, cfg: Mapping[str, Any], file_type: int,
                   extra: Mapping[str, Any] | None = None) -> None:
    """Write the deepseek2 model KV pairs with GGUFWriter's typed setters.

    ``general.architecture`` is written by ``GGUFWriter(path, "deepseek2")`` itself; the tokenizer
    keys come from :func:`dsconvert.formats.gguf_vocab.write_vocab`.

    Raises:
        UnsupportedError: the writer's arch is not ``deepseek2``, or see :func:`metadata_items`.
    """
    if writer.arch != ARCH_NAME:
        raise UnsupportedError(f"GGUFWriter arch is {writer.arch!r}, expected {ARCH_NAME!r}")
    for it in metadata_items(cfg, file_type, extra):
        getattr(writer, it.setter)(*((it.key, it.arg) if it.setter in _RAW_SETTERS else (it.arg,)))


_RAW_SETTERS = {"add_bool", "add_uint32", "add_float32", "add_string"}
