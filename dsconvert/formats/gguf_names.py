"""HF -> GGUF tensor names for llama.cpp's ``deepseek2`` architecture (DeepSeek-V2/V3/R1).

The mapping is data: one table from HF module suffix to gguf-py's ``MODEL_TENSOR``; the name
strings themselves come from ``gguf.constants.TENSOR_NAMES`` so they can never drift from the
loader's ``LLM_TN`` table.

Source: ggml-org/llama.cpp ``conversion/deepseek.py::DeepseekV2Model.modify_tensors`` and
``gguf-py/gguf/tensor_mapping.py``; layout docs/gguf-deepseek2.md §3.

Three things are not a plain rename and are resolved by the plan (``gguf_deepseek2.plan_tensors``):

- ``self_attn.kv_b_proj`` -> two outputs ``attn_k_b`` and ``attn_v_b`` (mainline MLA layout,
  llama.cpp PR #12801). :func:`gguf_name` returns the legacy fused name ``attn_kv_b`` for it (as
  gguf-py's tensor map does); :func:`gguf_outputs` returns the two real outputs.
- ``mlp.experts.{eid}.{gate,up,down}_proj`` -> one stacked ``ffn_{gate,up,down}_exps`` per layer.
- ``mlp.gate.e_score_correction_bias`` -> ``exp_probs_b.bias`` (the converter renames it to
  ``e_score_correction.bias`` first, hence ``.bias``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from dsconvert.errors import UnsupportedError
from dsconvert.formats.deepseek_v3 import layer_index as layer_of  # re-exported: gguf_deepseek2 lists it

ARCH = MODEL_ARCH.DEEPSEEK2
ARCH_NAME: str = MODEL_ARCH_NAMES[ARCH]  # "deepseek2"

T = MODEL_TENSOR

# Global (non-layer) tensors: HF name -> (MODEL_TENSOR, suffix).
GLOBAL_TENSORS: dict[str, tuple[MODEL_TENSOR, str]] = {
    "model.embed_tokens.weight": (T.TOKEN_EMBD, "weight"),
    "model.norm.weight": (T.OUTPUT_NORM, "weight"),
    "lm_head.weight": (T.OUTPUT, "weight"),
}

# Per-layer tensors: HF suffix after ``model.layers.{bid}.`` -> (MODEL_TENSOR, gguf suffix).
LAYER_TENSORS: dict[str, tuple[MODEL_TENSOR, str]] = {
    "input_layernorm.weight": (T.ATTN_NORM, "weight"),
    "self_attn.q_proj.weight": (T.ATTN_Q, "weight"),  # V2-Lite (q_lora_rank: null)
    "self_attn.q_a_proj.weight": (T.ATTN_Q_A, "weight"),
    "self_attn.q_a_layernorm.weight": (T.ATTN_Q_A_NORM, "weight"),
    "self_attn.q_b_proj.weight": (T.ATTN_Q_B, "weight"),
    "self_attn.kv_a_proj_with_mqa.weight": (T.ATTN_KV_A_MQA, "weight"),
    "self_attn.kv_a_layernorm.weight": (T.ATTN_KV_A_NORM, "weight"),
    "self_attn.kv_b_proj.weight": (T.ATTN_KV_B, "weight"),  # split by the plan, see module doc
    "self_attn.o_proj.weight": (T.ATTN_OUT, "weight"),
    "post_attention_layernorm.weight": (T.FFN_NORM, "weight"),
    "mlp.gate_proj.weight": (T.FFN_GATE, "weight"),  # dense layers (bid < first_k_dense_replace)
    "mlp.up_proj.weight": (T.FFN_UP, "weight"),
    "mlp.down_proj.weight": (T.FFN_DOWN, "weight"),
    "mlp.gate.weight": (T.FFN_GATE_INP, "weight"),
    "mlp.gate.e_score_correction_bias": (T.FFN_EXP_PROBS_B, "bias"),
    "mlp.shared_experts.gate_proj.weight": (T.FFN_GATE_SHEXP, "weight"),
    "mlp.shared_experts.up_proj.weight": (T.FFN_UP_SHEXP, "weight"),
    "mlp.shared_experts.down_proj.weight": (T.FFN_DOWN_SHEXP, "weight"),
}

# Routed experts: projection -> stacked MODEL_TENSOR.
EXPERT_TENSORS: dict[str, MODEL_TENSOR] = {
    "gate_proj": T.FFN_GATE_EXP,
    "up_proj": T.FFN_UP_EXP,
    "down_proj": T.FFN_DOWN_EXP,
}

# kv_b_proj -> (k_b, v_b) in the mainline MLA layout.
KV_B_OUTPUTS: tuple[MODEL_TENSOR, MODEL_TENSOR] = (T.ATTN_K_B, T.ATTN_V_B)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# HF buffers some V2 checkpoints carry; llama.cpp recomputes them (base ModelBase skips them too).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_SCALE_HINT = (
    "FP8 '*_scale_inv' tensors are consumed by the FP8 dequant step; the GGUF name layer only "
    "sees dequantized weights"
)


def _check_arch_tensor(t: MODEL_TENSOR) -> None:
    # Guard against a gguf-py version whose deepseek2 tensor list lacks one of ours.
    if t not in MODEL_TENSORS[ARCH]:  # pragma: no cover - depends on the installed gguf
        raise UnsupportedError(f"gguf-py lists no {t.name} for {ARCH_NAME}", hint="pin gguf==0.19.0")


def tensor_name(t: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """``TENSOR_NAMES[t].format(bid=bid) + "." + suffix``, e.g. ``blk.3.attn_k_b.weight``."""
    _check_arch_tensor(t)
    base = TENSOR_NAMES[t].format(bid=bid) if bid is not None else TENSOR_NAMES[t]
    return f"{base}.{suffix}"


def _n_layer(cfg: Mapping[str, Any]) -> int:
    try:
        return int(cfg["num_hidden_layers"])
    except KeyError:
        raise UnsupportedError("config.json has no 'num_hidden_layers'") from None


def expert_of(hf_name: str) -> tuple[int, int, str] | None:
    """``(bid, eid, proj)`` for ``model.layers.{bid}.mlp.experts.{eid}.{proj}.weight``, else None."""
    m = _LAYER_RE.match(hf_name)
    if not m:
        return None
    e = _EXPERT_RE.match(m.group(2))
    if not e:
        return None
    return int(m.group(1)), int(e.group(1)), e.group(2)


def drop_reason(hf_name: str, cfg: Mapping[str, Any]) -> str | None:
    """Why ``hf_name`` is deliberately left out of the GGUF, or None if it is kept.

    - MTP layers (``model.layers.N.*`` with N >= ``num_hidden_layers``): llama.cpp's converter sets
      ``skip_mtp = True`` for deepseek2 and writes no ``nextn_predict_layers`` key for V3.
    - ``lm_head.weight`` when ``tie_word_embeddings`` is true (the loader reuses token_embd).
    - ``*.rotary_emb.inv_freq`` buffers (recomputed by llama.cpp).

    Raises:
        UnsupportedError: for ``*_scale_inv`` (must never reach the GGUF layer).
    """
    if hf_name.endswith("_scale_inv"):
        raise UnsupportedError(f"Can not map tensor {hf_name!r}", hint=_SCALE_HINT)
    bid = layer_of(hf_name)
    n_layer = _n_layer(cfg)
    if bid is not None and bid >= n_layer:
        return (
            f"MTP layer {bid} (>= num_hidden_layers={n_layer}): llama.cpp deepseek2 does not load "
            "V3 MTP weights (converter skip_mtp=True, no nextn_predict_layers key)"
        )
    if hf_name in ("lm_head.weight", "model.lm_head.weight") and cfg.get("tie_word_embeddings", False):
        return "tie_word_embeddings: llama.cpp reuses token_embd.weight as the output"
    if hf_name.endswith(_IGNORED_SUFFIXES):
        return "rotary inv_freq buffer: recomputed by llama.cpp"
    return None


def hf_tensor_kind(hf_name: str) -> tuple[MODEL_TENSOR, int | None, str]:
    """(MODEL_TENSOR, bid, suffix) of a kept HF tensor (experts: the stacked tensor).

    Raises:
        UnsupportedError: ``Can not map tensor`` for unknown names.
    """
    if hf_name in GLOBAL_TENSORS:
        t, suffix = GLOBAL_TENSORS[hf_name]
        return t, None, suffix
    m = _LAYER_RE.match(hf_name)
    if m:
        bid, rest = int(m.group(1)), m.group(2)
        if rest in LAYER_TENSORS:
            t, suffix = LAYER_TENSORS[rest]
            return t, bid, suffix
        e = _EXPERT_RE.match(rest)
        if e:
            return EXPERT_TENSORS[e.group(2)], bid, "weight"
    raise UnsupportedError(
        f"Can not map tensor {hf_name!r}",
        hint="not a DeepSeek-V2/V3 tensor known to llama.cpp's deepseek2 layout",
    )


def gguf_name(hf_name: str, cfg: Mapping[str, Any]) -> str | None:
    """GGUF name of HF tensor ``hf_name``, or None when it is deliberately dropped.

    Routed experts map to their stacked tensor (``blk.N.ffn_gate_exps.weight``);
    ``kv_b_proj`` maps to the legacy fused ``blk.N.attn_kv_b.weight`` (use :func:`gguf_outputs`
    for the mainline ``attn_k_b``/``attn_v_b`` pair). See :func:`drop_reason` for dropped names.

    Raises:
        UnsupportedError: ``Can not map tensor '<name>'`` for any unknown tensor, including every
            ``*_scale_inv``.
    """
    if drop_reason(hf_name, cfg) is not None:
        return None
    t, bid, suffix = hf_tensor_kind(hf_name)
    return tensor_name(t, bid, suffix)


def gguf_outputs(hf_name: str, cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The GGUF tensors built from ``hf_name`` in the mainline layout (empty when dropped).

    ``kv_b_proj`` gives ``(attn_k_b, attn_v_b)``; every other tensor gives one name.
    """
    if drop_reason(hf_name, cfg) is not None:
        return ()
    t, bid, suffix = hf_tensor_kind(hf_name)
    if t is T.ATTN_KV_B:
        return tuple(tensor_name(o, bid, suffix) for o in KV_B_OUTPUTS)
    return (tensor_name(t, bid, suffix),)


def is_forced_f32(gguf_tensor_name: str, ndim: int) -> bool:
    """Tensors the converter always stores as F32 and llama-quantize never touches.

    Every 1-D tensor, every ``*_norm.weight``, ``ffn_gate_inp.weight`` and ``exp_probs_b.bias``
    (Source: convert_hf_to_gguf ``prepare_tensors`` / ``tensor_force_quant``).
    """
    return (
        ndim <= 1
        or gguf_tensor_name.endswith("_norm.weight")
        or gguf_tensor_name.endswith("ffn_gate_inp.weight")
        or not gguf_tensor_name.endswith(".weight")
    )
