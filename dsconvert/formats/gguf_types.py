"""Per-tensor ggml type choice for ``deepseek2``: llama.cpp's ``llama_tensor_get_type`` in Python.

Reproduces, for one tensor name + shape, what ``llama_model_quantize`` (``llama-quantize``) picks
for a file-type mix (``Q4_K_M``, ``Q5_K_M``, ``Q6_K``, ``Q8_0``, ``Q4_0``, ``Q2_K``, ``Q3_K_M``, ...),
including ``--tensor-type PATTERN=TYPE`` overrides, ``--output-tensor-type``,
``--token-embedding-type``, ``--pure`` and the shape fallbacks. Checked tensor-by-tensor against
the real ``llama_model_quantize`` of llama-cpp-python 0.3.36 in ``tests/formats/test_gguf_layout.py``.

Source: ggml-org/llama.cpp ``src/llama-quant.cpp``: ``tensor_allows_quantization``,
``tensor_get_category``, ``llama_tensor_get_type_impl``, ``llama_tensor_get_type``,
``tensor_type_fallback``, ``llama_ftype_get_default_type``.

deepseek2 specifics that fall out of those rules (docs/gguf-deepseek2.md §6):

- ``output.weight`` -> Q6_K for every K mix (Q8_0 stays Q8_0; Q8_0 if ne0 % block != 0);
- ``ffn_down``/``ffn_down_exps``/``ffn_down_shexp`` -> Q6_K under Q4_K_M/Q5_K_M on layers where
  ``use_more_bits(i, n_layer)``; the layer comes from the name since deepseek2 has experts;
- ``attn_k_b``/``attn_v_b`` are category OTHER (only ``attn_v.weight``, ``attn_qkv.weight`` and
  legacy ``attn_kv_b.weight`` are "attn_v-like"), so they get the default type, then the shape
  fallback: V3's ``attn_k_b`` (ne0 = qk_nope = 128) -> Q5_0 under Q4_K_M;
- norms, ``ffn_gate_inp`` and ``exp_probs_b`` are never quantized (keep F32).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from dsconvert.errors import ShapeError, UsageError

Q = GGMLQuantizationType

# ftype name -> (LlamaFileType, default ggml type); llama_ftype_get_default_type.
_DEFAULT: dict[str, tuple[LlamaFileType, Q]] = {
    "F32": (LlamaFileType.ALL_F32, Q.F32),
    "F16": (LlamaFileType.MOSTLY_F16, Q.F16),
    "BF16": (LlamaFileType.MOSTLY_BF16, Q.BF16),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "Q4_1": (LlamaFileType.MOSTLY_Q4_1, Q.Q4_1),
    "Q5_0": (LlamaFileType.MOSTLY_Q5_0, Q.Q5_0),
    "Q5_1": (LlamaFileType.MOSTLY_Q5_1, Q.Q5_1),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, Q.Q2_K),
    "Q2_K_S": (LlamaFileType.MOSTLY_Q2_K_S, Q.Q2_K),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, Q.Q3_K),
    "Q4_K_S": (LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    "Q5_K_S": (LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    "IQ2_XXS": (LlamaFileType.MOSTLY_IQ2_XXS, Q.IQ2_XXS),
    "IQ2_XS": (LlamaFileType.MOSTLY_IQ2_XS, Q.IQ2_XS),
    "IQ2_S": (LlamaFileType.MOSTLY_IQ2_S, Q.IQ2_XS),
    "IQ2_M": (LlamaFileType.MOSTLY_IQ2_M, Q.IQ2_S),
    "IQ3_XS": (LlamaFileType.MOSTLY_IQ3_XS, Q.IQ3_S),
    "IQ3_XXS": (LlamaFileType.MOSTLY_IQ3_XXS, Q.IQ3_XXS),
    "IQ3_S": (LlamaFileType.MOSTLY_IQ3_S, Q.IQ3_S),
    "IQ3_M": (LlamaFileType.MOSTLY_IQ3_M, Q.IQ3_S),
    "IQ1_S": (LlamaFileType.MOSTLY_IQ1_S, Q.IQ1_S),
    "IQ1_M": (LlamaFileType.MOSTLY_IQ1_M, Q.IQ1_M),
    "IQ4_NL": (LlamaFileType.MOSTLY_IQ4_NL, Q.IQ4_NL),
    "IQ4_XS": (LlamaFileType.MOSTLY_IQ4_XS, Q.IQ4_XS),
    "TQ1_0": (LlamaFileType.MOSTLY_TQ1_0, Q.TQ1_0),
    "TQ2_0": (LlamaFileType.MOSTLY_TQ2_0, Q.TQ2_0),
    "MXFP4_MOE": (LlamaFileType.MOSTLY_MXFP4_MOE, Q.MXFP4),
}
FTYPE_NAMES: tuple[str, ...] = tuple(_DEFAULT)

# Types that are not block-quantized (ggml_is_quantized is false).
_FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64}

_IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


def normalize_ftype(ftype: str) -> str:
    """``q4_k_m`` / ``Q4_K_M`` / ``MOSTLY_Q4_K_M`` -> ``Q4_K_M``; raises UsageError listing choices."""
    key = ftype.strip().upper().replace("-", "_")
    key = key.removeprefix("MOSTLY_").removeprefix("LLAMA_FTYPE_")
    if key == "ALL_F32":
        key = "F32"
    if key not in _DEFAULT:
        raise UsageError(f"unknown GGUF file type {ftype!r}", hint="choose one of " + ", ".join(FTYPE_NAMES))
    return key


def file_type_id(ftype: str) -> int:
    """``general.file_type`` (``LlamaFileType``) for an ftype name: BF16 32, Q8_0 7, Q4_K_M 15, F32 0."""
    return int(_DEFAULT[normalize_ftype(ftype)][0])


def default_type(ftype: str) -> str:
    """The ggml type an ftype mix starts every quantizable tensor from (Q4_K_M -> Q4_K)."""
    return _DEFAULT[normalize_ftype(ftype)][1].name


def ggml_type(name: str | Q) -> Q:
    """ggml type by (case-insensitive) name, as llama-quantize's ``parse_ggml_type``."""
    if isinstance(name, Q):
        return name
    try:
        return Q[name.strip().upper()]
    except KeyError:
        raise UsageError(f"invalid ggml_type {name!r}",
                         hint="e.g. Q8_0, Q6_K, Q5_K, Q4_K, Q5_0, Q4_0, BF16, F16, F32") from None


def block_size(t: str | Q) -> int:
    return GGML_QUANT_SIZES[ggml_type(t)][0]


def tensor_nbytes(shape: Sequence[int], t: str | Q) -> int:
    """Bytes of a tensor of numpy ``shape`` stored as ggml type ``t`` (rows of ne0 = shape[-1]).

    Raises:
        ShapeError: if ne0 is not a multiple of the type's block size.
    """
    bs, ts = GGML_QUANT_SIZES[ggml_type(t)]
    ne0 = int(shape[-1]) if len(shape) else 1
    if ne0 % bs:
        raise ShapeError(f"ne0={ne0} is not a multiple of the {ggml_type(t).name} block size {bs}")
    return math.prod(int(s) for s in shape) // bs * ts


def parse_tensor_type_override(spec: str) -> tuple[str, str]:
    """``"PATTERN=TYPE"`` -> ``(pattern, TYPE)``; the pattern is lower-cased as llama-quantize does.

    Raises:
        UsageError: malformed spec, empty pattern/type, unknown type or invalid regex.
    """
    if "=" not in spec:
        raise UsageError(f"malformed tensor type {spec!r}", hint="use --tensor-type PATTERN=TYPE, e.g. 'attn_k_b=q8_0'")
    pat, _, typ = spec.partition("=")
    if not pat:
        raise UsageError(f"missing tensor name in {spec!r}")
    if not typ:
        raise UsageError(f"missing quantization type in {spec!r}")
    pat = pat.lower()
    try:
        re.compile(pat)
    except re.error as e:
        raise UsageError(f"invalid tensor-type regex {pat!r}: {e}") from None
    return pat, ggml_type(typ).name


# --------------------------------------------------------------------------------------------
# llama-quant.cpp rules
# --------------------------------------------------------------------------------------------


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims of a numpy shape: 1 + index of the last ggml dim (ne) > 1."""
    ne = list(reversed([int(s) for s in shape])) or [1]
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def tensor_allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama-quant ``tensor_allows_quantization`` restricted to what deepseek2 and deepseek4 files contain
    (deepseek4: the I32 ``ffn_gate_tid2eid`` routing table is never quantized)."""
    if ggml_n_dims(shape) < 2:
        return False
    return (
        name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and "ffn_gate_tid2eid.weight" not in name
    )


def tensor_category(name: str) -> str:
    """llama-quant ``tensor_get_category`` (substring tests, first match wins)."""
    if name == "output.weight":
        return "OUTPUT"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "TOKEN_EMBD"
    for needle, cat in (
        ("attn_qkv.weight", "ATTENTION_QKV"),
        ("attn_kv_b.weight", "ATTENTION_KV_B"),
        ("attn_v.weight", "ATTENTION_V"),
        ("attn_k.weight", "ATTENTION_K"),
        ("attn_q.weight", "ATTENTION_Q"),
        ("attn_output.weight", "ATTENTION_OUTPUT"),
        ("ffn_up", "FFN_UP"),
        ("ffn_gate", "FFN_GATE"),
        ("ffn_down", "FFN_DOWN"),
    ):
        if needle in name:
            return cat
    return "OTHER"


def _is_attn_v(cat: str) -> bool:
    return cat in ("ATTENTION_V", "ATTENTION_QKV", "ATTENTION_KV_B")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """``i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`` with C integer division (V3: 30 of 61)."""
    n8 = n_layers // 8
    return i_layer < n8 or i_layer >= (7 * n_layers) // 8 or _cmod(i_layer - n8, 3) == 2


def _cmod(a: int, b: int) -> int:
    """C ``%`` (sign follows the dividend)."""
    return int(math.fmod(a, b))


def _layer_from_name(name: str, n_layer: int) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    if not m:
        raise ShapeError(f"Failed to determine layer for tensor {name}")
    i = int(m.group(1))
    if i >= n_layer:
        raise ShapeError(f"Bad layer {i} for tensor {name}. Must be in [0, {n_layer})")
    return i


@dataclass
class QuantState:
    """The counters ``quantize_state_impl`` carries between tensors (in llama.cpp's tensor order)."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0


def _fallback(name: str, ne0: int, t: Q, st: QuantState, *, fallback_f16: bool) -> Q:
    """llama-quant ``tensor_type_fallback``: ne0 not a multiple of the block size."""
    bs = GGML_QUANT_SIZES[t][0]
    if ne0 % bs == 0:
        return t
    st.n_fallback += 1
    if t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS):
        r = Q.IQ4_NL
    elif t in (Q.Q2_K, Q.Q3_K, Q.TQ1_0, Q.TQ2_0):
        r = Q.Q4_0
    elif t is Q.Q4_K:
        r = Q.Q5_0
    elif t is Q.Q5_K:
        r = Q.Q5_1
    elif t is Q.Q6_K:
        r = Q.Q8_0
    elif fallback_f16:
        return Q.F16  # convert_hf_to_gguf's behaviour for --outtype q8_0 (QuantError -> F16)
    else:
        raise ShapeError(f"no tensor type fallback is defined for type {t.name}: {name} has ne0={ne0}, "
                         f"not a multiple of {bs}",
                         hint="choose another type for this tensor with --tensor-type")
    if ne0 % GGML_QUANT_SIZES[r][0] != 0:
        r = Q.F16  # "must use F16 due to unusual shape"
    return r


def tensor_type_fallback(name: str, ne0: int, qtype: str, state: QuantState | None = None) -> str:
    """:func:`_fallback` by type name (llama-quant ``tensor_type_fallback``; F16 where llama.cpp has none).
    Not block-quantized types are returned unchanged."""
    t = ggml_type(qtype)
    if t in _FLOAT_TYPES:
        return t.name
    return _fallback(name, int(ne0), t, state or QuantState(), fallback_f16=True).name


def _impl(name: str, shape: Sequence[int], new: Q, ftype: str, cat: str, st: QuantState, *,
          n_layer: int, n_expert: int, n_gqa: int, tied_embeddings: bool, has_imatrix: bool,
          output_type: Q | None) -> Q:
    """llama-quant ``llama_tensor_get_type_impl`` (LLM_ARCH_DEEPSEEK2: never FALCON, never 70B)."""
    ne = list(reversed([int(s) for s in shape]))
    is_q2_iq = ftype in _IQ_LOW

    if cat == "OUTPUT" or (tied_embeddings and cat == "TOKEN_EMBD"):
        if output_type is not None:
            return output_type
        if ftype == "MXFP4_MOE":
            return Q.Q8_0
        if ne[0] % GGML_QUANT_SIZES[new][0] != 0:
            return Q.Q8_0
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return Q.Q5_K
        if new is not Q.Q8_0:
            return Q.Q6_K
        return new
    if ftype == "MXFP4_MOE":
        return Q.MXFP4 if len(ne) > 2 and ne[2] > 1 else Q.Q8_0
    if cat == "TOKEN_EMBD":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return Q.Q2_K
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return Q.IQ3_S
        if ftype in ("TQ1_0", "TQ2_0"):
            return Q.Q4_K
        return new
    if is_q2_iq:
        if _is_attn_v(cat):
            new = Q.Q4_K if (n_gqa >= 4 or n_expert >= 4) else (Q.IQ3_S if ftype in ("IQ2_S", "IQ2_M") else Q.Q2_K)
            st.i_attention_wv += 1
        elif n_expert == 8 and cat == "ATTENTION_K":
            new = Q.Q4_K
        elif cat == "FFN_DOWN":
            # note: this branch uses the raw counter, not the layer from the name
            if st.i_ffn_down < n_layer // 8:
                new = Q.IQ3_S if ftype in ("IQ2_S", "IQ2_M") else Q.Q2_K
            st.i_ffn_down += 1
        elif cat == "ATTENTION_OUTPUT":
            if n_expert == 8:
                new = Q.Q5_K
            elif ftype in ("IQ1_S", "IQ1_M"):
                new = Q.IQ2_XXS
            elif ftype in ("IQ2_S", "IQ2_M"):
                new = Q.IQ3_S
        return new
    if _is_attn_v(cat):
        if ftype == "Q2_K":
            new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif ftype == "Q2_K_S" and n_gqa >= 4:
            new = Q.Q4_K
        elif ftype == "IQ3_XXS":
            new = Q.Q4_K if n_gqa >= 4 else (Q.IQ3_S if not has_imatrix else Q.IQ3_XXS)
        elif ftype in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
            new = Q.Q4_K
        elif ftype == "IQ3_M":
            new = Q.Q4_K
        elif ftype == "Q3_K_M":
            new = Q.Q5_K if st.i_attention_wv < 2 else Q.Q4_K
        elif ftype == "Q3_K_L":
            new = Q.Q5_K
        elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new = Q.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = Q.Q6_K
        elif ftype == "Q4_K_S" and st.i_attention_wv < 4:
            new = Q.Q5_K
        if n_expert == 8:
            new = Q.Q8_0
        st.i_attention_wv += 1
        return new
    if cat == "ATTENTION_K":
        if n_expert == 8:
            return Q.Q8_0
        if ftype == "IQ3_XS":
            return Q.IQ3_XXS
        if ftype == "IQ3_XXS":
            return Q.IQ2_S
        return new
    if cat == "ATTENTION_Q":
        if ftype == "IQ3_XS":
            return Q.IQ3_XXS
        if ftype == "IQ3_XXS":
            return Q.IQ2_S
        return new
    if cat == "FFN_DOWN":
        i_layer = _layer_from_name(name, n_layer) if n_expert > 1 else st.i_ffn_down
        if ftype == "Q2_K":
            new = Q.Q3_K
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new = Q.Q4_K
        elif ftype == "IQ3_XXS" and not has_imatrix:
            new = Q.Q4_K if i_layer < n_layer // 8 else Q.Q3_K
        elif ftype == "Q3_K_M":
            new = Q.Q5_K if i_layer < n_layer // 16 else Q.Q4_K  # arch != FALCON -> Q4_K
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8 or (n_expert == 8 and use_more_bits(i_layer, n_layer))):
            new = Q.Q4_K
        elif ftype == "Q3_K_L":
            new = Q.Q5_K
        elif ftype == "Q4_K_M":
            if use_more_bits(i_layer, n_layer):
                new = Q.Q6_K
        elif i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
            new = Q.Q5_K
        elif ftype == "Q5_K_M" and use_more_bits(i_layer, n_layer):
            new = Q.Q6_K
        elif ftype == "Q4_K_S" and i_layer < n_layer // 8:
            new = Q.Q5_K
        elif ftype in ("Q4_0", "Q5_0") and has_imatrix and i_layer < n_layer // 8:
            new = Q.Q4_1 if ftype == "Q4_0" else Q.Q5_1
        st.i_ffn_down += 1
        return new
    if cat == "ATTENTION_OUTPUT":
        if n_expert == 8:
            if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                         "IQ3_S", "IQ3_M", "IQ4_XS"):
                new = Q.Q5_K
        else:
            new = {"Q2_K": Q.Q3_K, "IQ3_XXS": Q.IQ3_S, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K,
                   "IQ3_M": Q.Q4_K}.get(ftype, new)
        return new
    if cat == "ATTENTION_QKV":
        if ftype in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
            return Q.Q4_K
        if ftype == "Q4_K_M":
            return Q.Q5_K
        if ftype == "Q5_K_M":
            return Q.Q6_K
        return new
    if cat in ("FFN_GATE", "FFN_UP"):
        i_layer = _layer_from_name(name, n_layer) if n_expert > 1 else (
            st.i_ffn_gate if cat == "FFN_GATE" else st.i_ffn_up)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < (7 * n_layer) // 8:
            new = Q.IQ3_XXS
        if cat == "FFN_GATE":
            st.i_ffn_gate += 1
        else:
            st.i_ffn_up += 1
        return new
    return new


def choose_type(
    gguf_name: str,
    shape: Sequence[int],
    ftype: str,
    *,
    n_layer: int,
    n_expert: int = 0,
    n_gqa: int = 1,
    overrides: Iterable[tuple[str, str]] = (),
    output_type: str | None = None,
    embd_type: str | None = None,
    pure: bool = False,
    tied_embeddings: bool = False,
    src_type: str = "F32",
    has_imatrix: bool = False,
    fallback_f16: bool = False,
    state: QuantState | None = None,
) -> str:
    """The ggml type name llama.cpp's ``llama_tensor_get_type`` gives one tensor.

    Args:
        gguf_name: e.g. ``blk.3.ffn_down_exps.weight``.
        shape: numpy-order shape (ne0 = ``shape[-1]``).
        ftype: mix name (``Q4_K_M``, ``Q8_0``, ``BF16``, ... see ``FTYPE_NAMES``).
        n_layer: ``block_count`` (61 for V3); ``use_more_bits`` and the name-derived layer use it.
        n_expert: ``expert_count`` (deepseek2 always > 1; == 8 triggers llama.cpp's 8-expert rules).
        n_gqa: ``head_count / head_count_kv`` as the loader sees it (deepseek2: = n_head).
        overrides: ``[(regex, TYPE), ...]`` from ``--tensor-type``; first ``re.search`` match wins.
        output_type / embd_type: ``--output-tensor-type`` / ``--token-embedding-type``.
        pure: ``--pure``: no mix rules, only the default type (still shape fallbacks).
        tied_embeddings: the file has no ``output.weight`` (token_embd is then treated as output).
        src_type: the type the tensor has in the input file; kept for non-quantizable tensors.
        fallback_f16: instead of raising where llama.cpp has no fallback (e.g. Q8_0 with
            ne0 % 32 != 0), return F16 like convert_hf_to_gguf does.
        state: counters shared across the tensors of one file (``plan_types`` passes one;
            only legacy ``attn_kv_b`` and dense ``ffn_down`` counting depend on it).

    Returns:
        ggml type name (``Q4_K``, ``Q6_K``, ``Q5_0``, ``F32``, ...).

    Raises:
        ShapeError: where llama.cpp itself fails (no fallback for the type; bad layer index).
        UsageError: unknown ftype / type names.
    """
    ftype = normalize_ftype(ftype)
    st = state if state is not None else QuantState()
    out_t = ggml_type(output_type) if output_type else None
    emb_t = ggml_type(embd_type) if embd_type else None
    if not tensor_allows_quantization(gguf_name, shape):
        return ggml_type(src_type).name
    cat = tensor_category(gguf_name)
    if emb_t is not None and cat == "TOKEN_EMBD":
        return emb_t.name
    if out_t is not None and cat == "OUTPUT":
        return out_t.name
    new = _DEFAULT[ftype][1]
    if new in _FLOAT_TYPES:
        return new.name
    manual = False
    for pat, typ in overrides:
        if re.search(pat, gguf_name):
            new = ggml_type(typ)
            manual = True
            break
    if not manual and not pure:
        new = _impl(gguf_name, shape, new, ftype, cat, st, n_layer=n_layer, n_expert=n_expert, n_gqa=n_gqa,
                    tied_embeddings=tied_embeddings, has_imatrix=has_imatrix, output_type=out_t)
    return _fallback(gguf_name, int(shape[-1]), new, st, fallback_f16=fallback_f16).name


def llama_tensor_order(names: Iterable[str]) -> list[str]:
    """The order llama.cpp's loader iterates tensors (``weight_name_comparer``: layer, then name)."""
    def key(n: str):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n.encode())
    return sorted(names, key=key)


def plan_types(
    tensors: Iterable[Any],
    ftype: str,
    cfg: Mapping[str, Any] | None = None,
    *,
    n_layer: int | None = None,
    n_expert: int | None = None,
    n_gqa: int | None = None,
    overrides: Iterable[tuple[str, str] | str] = (),
    output_type: str | None = None,
    embd_type: str | None = None,
    pure: bool = False,
    src_type: str = "F32",
    fallback_f16: bool = False,
    has_imatrix: bool = False,
    src_types: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``{gguf_name: ggml type}`` for a whole file, with llama.cpp's counters and tensor order.

    Args:
        tensors: ``GGUFTensorPlan``s (anything with ``.name``, ``.shape``, optional ``.force_f32``)
            or ``(name, numpy_shape)`` pairs.
        cfg: config.json; supplies ``n_layer`` (num_hidden_layers), ``n_expert`` (n_routed_experts)
            and ``n_gqa`` (num_attention_heads, since head_count_kv = 1) unless given explicitly.
        overrides: ``(pattern, TYPE)`` pairs or ``"PATTERN=TYPE"`` strings.
        src_type: type of the quantizable tensors in the source (forced-F32 tensors are F32).
        src_types: ``{name: type}`` per tensor in the source (wins over ``src_type`` / ``force_f32``): what a
            tensor llama.cpp does not quantize keeps.
        has_imatrix: an importance matrix is given (llama.cpp's ``qs.has_imatrix``; it changes some choices,
            e.g. the first ``n_layer/8`` ffn_down of Q4_0/Q5_0 files become Q4_1/Q5_1).

    Raises:
        see :func:`choose_type`.
    """
    items: list[tuple[str, tuple[int, ...], bool]] = []
    for t in tensors:
        if isinstance(t, tuple):
            name, shape = t[0], tuple(t[1])
            forced = False
        else:
            name, shape, forced = t.name, tuple(t.shape), bool(getattr(t, "force_f32", False))
        items.append((name, shape, forced))
    cfg = cfg or {}
    n_layer = int(n_layer if n_layer is not None else cfg["num_hidden_layers"])
    n_expert = int(n_expert if n_expert is not None else (cfg.get("n_routed_experts") or 0))
    n_gqa = int(n_gqa if n_gqa is not None else cfg.get("num_attention_heads", 1))
    ovr = [parse_tensor_type_override(o) if isinstance(o, str) else (o[0], ggml_type(o[1]).name) for o in overrides]
    names = [n for n, _, _ in items]
    tied = "output.weight" not in names
    st = QuantState(n_attention_wv=sum(1 for n in names if _is_attn_v(tensor_category(n))))
    by_name = {n: (s, f) for n, s, f in items}
    out: dict[str, str] = {}
    for name in llama_tensor_order(names):
        shape, forced = by_name[name]
        out[name] = choose_type(
            name, shape, ftype, n_layer=n_layer, n_expert=n_expert, n_gqa=n_gqa, overrides=ovr,
            output_type=output_type, embd_type=embd_type, pure=pure, tied_embeddings=tied,
            src_type=(src_types or {}).get(name) or ("F32" if forced else src_type), fallback_f16=fallback_f16,
            has_imatrix=has_imatrix, state=st)
    return {n: out[n] for n in names}


#: Types llama.cpp never quantizes without importance weights (``tensor_requires_imatrix``).
_NEED_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}


def requires_imatrix(gguf_name: str, qtype: str, ftype: str) -> bool:
    """Whether ``llama_model_quantize`` refuses to write tensor ``gguf_name`` as ``qtype`` in an ``ftype`` file
    without an imatrix: the IQ1/IQ2 types and IQ3_XXS, and Q2_K inside a Q2_K_S file; never ``token_embd`` or
    ``output`` (source: llama.cpp ``src/llama-quant.cpp`` ``tensor_requires_imatrix``)."""
    if gguf_name.startswith(("token_embd.", "output.")):
        return False
    return qtype in _NEED_IMATRIX or (qtype == "Q2_K" and ftype.upper() == "Q2_K_S")
