"""The ``deepseek2`` GGUF layout: output-tensor plan and the two tensor transforms.

Pure functions on config dicts, shapes and tensors; no file I/O. The streaming pipeline reads the
HF sources each :class:`GGUFTensorPlan` lists (in order), applies its ``kind`` and hands the result
to the writer; the per-tensor ggml type comes from :mod:`dsconvert.formats.gguf_types`.

Layout (mainline llama.cpp >= PR #12801, docs/gguf-deepseek2.md §3):

- ``kv_b_proj`` (numpy ``(n_head*(nope+v), kv_lora)``) is split into ``attn_k_b``
  ``(n_head, kv_lora, nope)`` and ``attn_v_b`` ``(n_head, v, kv_lora)``;
- routed experts are stacked in expert-id order, numpy ``(n_expert, M, N)``;
- MTP layers (>= ``num_hidden_layers``) are dropped and reported.

Re-exports the public API of the sibling modules, so ``from dsconvert.formats.gguf_deepseek2
import ...`` is the single entry point for the GGUF exporter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

import torch

from dsconvert.errors import BadInputError, ShapeError, UnsupportedError
from dsconvert.formats.gguf_meta import metadata_dict, write_metadata  # noqa: F401  (re-export)
from dsconvert.formats.gguf_names import (  # noqa: F401  (re-export)
    ARCH_NAME,
    EXPERT_TENSORS,
    KV_B_OUTPUTS,
    T,
    drop_reason,
    expert_of,
    gguf_name,
    gguf_outputs,
    hf_tensor_kind,
    is_forced_f32,
    layer_of,
    tensor_name,
)
from dsconvert.formats.gguf_types import (  # noqa: F401  (re-export)
    choose_type,
    file_type_id,
    plan_types,
    tensor_nbytes,
)
from dsconvert.formats.gguf_vocab import read_vocab, write_vocab  # noqa: F401  (re-export)

__all__ = [
    # names (gguf_names)
    "ARCH_NAME", "gguf_name", "gguf_outputs", "drop_reason", "hf_tensor_kind", "is_forced_f32", "tensor_name",
    "layer_of", "expert_of",
    # plan + transforms (this module)
    "GGUFTensorPlan", "GGUFPlan", "DroppedTensor", "plan_tensors", "split_kv_b", "fuse_kv_b", "stack_experts",
    "build_tensor",
    # metadata (gguf_meta), vocab (gguf_vocab), types (gguf_types)
    "write_metadata", "metadata_dict", "write_vocab", "read_vocab",
    "choose_type", "plan_types", "file_type_id", "tensor_nbytes",
]

#: ``experts_mxfp4`` / ``tid2eid``: deepseek4 only (:mod:`dsconvert.formats.gguf_deepseek4`)
PlanKind = Literal["copy", "stack_experts", "kv_b_k", "kv_b_v", "experts_mxfp4", "tid2eid"]

# Bytes per element of safetensors dtypes (names as in the safetensors header).
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}

# Order of a layer's outputs in the file (streaming-friendly, attention first, like the HF order).
_LAYER_ORDER: tuple = (
    T.ATTN_NORM, T.ATTN_Q, T.ATTN_Q_A, T.ATTN_Q_A_NORM, T.ATTN_Q_B, T.ATTN_KV_A_MQA,
    T.ATTN_KV_A_NORM, T.ATTN_K_B, T.ATTN_V_B, T.ATTN_OUT, T.FFN_NORM,
    T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, T.FFN_GATE_INP, T.FFN_EXP_PROBS_B,
    T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP,
)
_GLOBAL_FIRST = (T.TOKEN_EMBD,)
_GLOBAL_LAST = (T.OUTPUT_NORM, T.OUTPUT)


@dataclass(frozen=True)
class GGUFTensorPlan:
    """One output tensor of the GGUF file.

    Attributes:
        name: GGUF tensor name, e.g. ``blk.3.ffn_down_exps.weight``.
        shape: numpy-order shape it is written with (ggml ``ne`` is the reverse).
        sources: HF tensor names it is built from, in order (experts in expert-id order).
        kind: ``copy`` (1 source, unchanged), ``stack_experts`` (``torch.stack(sources, 0)``),
            ``kv_b_k`` / ``kv_b_v`` (``split_kv_b(source)[0]`` / ``[1]``); deepseek4 adds ``experts_mxfp4``
            (FP4 experts stacked, as MXFP4 blocks) and ``tid2eid`` (an int table written as I32).
        force_f32: stored as F32 whatever the output type (1-D, ``*_norm``, ``ffn_gate_inp``,
            ``exp_probs_b``); llama-quantize leaves these alone too.
        bid: layer index, None for global tensors.
        src_dtype: safetensors dtype of the sources (``BF16``, ``F8_E4M3``, ...).
        src_nbytes: bytes read from the checkpoint for this output (for kv_b halves, half of
            kv_b's bytes each).
    """

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    kind: PlanKind
    force_f32: bool
    bid: int | None = None
    src_dtype: str = "BF16"
    src_nbytes: int = 0

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def ne(self) -> tuple[int, ...]:
        """ggml-order shape (``ne0`` first)."""
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class DroppedTensor:
    """An HF tensor deliberately left out of the GGUF, with why and how many bytes."""

    hf_name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    reason: str


@dataclass
class GGUFPlan:
    """``tensors`` in file order plus ``dropped`` HF tensors. Iterates/indexes like ``tensors``."""

    tensors: list[GGUFTensorPlan]
    dropped: list[DroppedTensor] = field(default_factory=list)

    def __iter__(self) -> Iterator[GGUFTensorPlan]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, i):
        return self.tensors[i]

    def by_name(self) -> dict[str, GGUFTensorPlan]:
        return {t.name: t for t in self.tensors}

    @property
    def dropped_nbytes(self) -> int:
        return sum(d.nbytes for d in self.dropped)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def nbytes(self, types: Mapping[str, str]) -> int:
        """Tensor-data bytes of the file when tensor ``name`` is stored as ``types[name]``
        (e.g. from :func:`plan_types`); excludes header/KV and alignment padding."""
        return sum(tensor_nbytes(t.shape, types[t.name]) for t in self.tensors)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    try:
        return math.prod(shape) * DTYPE_BYTES[dtype]
    except KeyError:
        raise UnsupportedError(f"unknown safetensors dtype {dtype!r}") from None


def _mla_dims(cfg: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(n_head, qk_nope, v_head, kv_lora) from config.json (real head count, not head_count_kv)."""
    try:
        return (int(cfg["num_attention_heads"]), int(cfg["qk_nope_head_dim"]),
                int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"]))
    except KeyError as e:
        raise UnsupportedError(f"config.json lacks {e.args[0]!r}, needed for the MLA split") from None


def plan_tensors(hf_tensors: Mapping[str, tuple[tuple[int, ...], str]], cfg: Mapping[str, Any]) -> GGUFPlan:
    """Plan every GGUF output tensor from HF names, shapes and dtypes alone (no data read).

    Args:
        hf_tensors: ``{hf_name: (shape, safetensors_dtype)}`` of the *dequantized* checkpoint view
            (no ``*_scale_inv``; FP8 weights may still say ``F8_E4M3``).
        cfg: config.json as a dict.

    Returns:
        :class:`GGUFPlan`: outputs in file order (token_embd, blk.0 .. blk.{n-1}, output_norm,
        output) and the dropped tensors (MTP layers ...) with reasons and byte counts.

    Raises:
        UnsupportedError: an unmappable tensor (``Can not map tensor ...``), including
            ``*_scale_inv``.
        BadInputError: ``Unprocessed experts`` when a MoE layer lacks some expert ids (names the
            layer, projection and the missing ids), or an expert id >= ``n_routed_experts``.
        ShapeError: kv_b_proj or expert shapes inconsistent with the config.
    """
    n_expert = cfg.get("n_routed_experts")
    dropped: list[DroppedTensor] = []
    outputs: dict[str, GGUFTensorPlan] = {}
    order_key: dict[str, tuple] = {}
    # experts[(bid, proj)] = {eid: hf_name}
    experts: dict[tuple[int, str], dict[int, str]] = {}

    def add(p: GGUFTensorPlan, t) -> None:
        if p.name in outputs:
            raise BadInputError(f"two HF tensors map to GGUF tensor {p.name!r}: "
                                f"{outputs[p.name].sources} and {p.sources}")
        outputs[p.name] = p
        if p.bid is None:
            order_key[p.name] = (0,) if t in _GLOBAL_FIRST else (2, _GLOBAL_LAST.index(t))
        else:
            order_key[p.name] = (1, p.bid, _LAYER_ORDER.index(t))

    for hf_name, (shape, dtype) in hf_tensors.items():
        shape = tuple(int(s) for s in shape)
        reason = drop_reason(hf_name, cfg)  # raises on *_scale_inv
        if reason is not None:
            dropped.append(DroppedTensor(hf_name, shape, dtype, _nbytes(shape, dtype), reason))
            continue
        ex = expert_of(hf_name)
        if ex is not None:
            bid, eid, proj = ex
            experts.setdefault((bid, proj), {})[eid] = hf_name
            continue
        names = gguf_outputs(hf_name, cfg)  # raises "Can not map tensor"
        t, bid, _ = hf_tensor_kind(hf_name)
        if t is T.ATTN_KV_B:
            n_head, nope, v, kv_lora = _mla_dims(cfg)
            if shape != (n_head * (nope + v), kv_lora):
                raise BadInputError(
                    f"{hf_name}: shape {shape} != (n_head*(qk_nope+v_head), kv_lora) = "
                    f"({n_head}*({nope}+{v}), {kv_lora}) from config.json",
                    hint="config.json and the shards disagree: is config.json from another model?")
            half = _nbytes(shape, dtype) // 2
            add(GGUFTensorPlan(names[0], (n_head, kv_lora, nope), (hf_name,), "kv_b_k", False, bid,
                               dtype, half), KV_B_OUTPUTS[0])
            add(GGUFTensorPlan(names[1], (n_head, v, kv_lora), (hf_name,), "kv_b_v", False, bid,
                               dtype, _nbytes(shape, dtype) - half), KV_B_OUTPUTS[1])
            continue
        add(GGUFTensorPlan(names[0], shape, (hf_name,), "copy", is_forced_f32(names[0], len(shape)),
                           bid, dtype, _nbytes(shape, dtype)), t)

    # Stack experts, in expert-id order; every layer must have all ids for all three projections.
    moe_layers = sorted({bid for bid, _ in experts})
    for bid in moe_layers:
        if n_expert is None:
            raise UnsupportedError(f"layer {bid} has routed experts but config.json has no n_routed_experts")
        want = set(range(int(n_expert)))
        for proj, t in EXPERT_TENSORS.items():
            have = experts.get((bid, proj), {})
            missing = sorted(want - set(have))
            extra = sorted(set(have) - want)
            if missing or extra:
                what = []
                if missing:
                    what.append(f"missing expert ids {_ranges(missing)}")
                if extra:
                    what.append(f"expert ids {_ranges(extra)} >= n_routed_experts={n_expert}")
                raise BadInputError(
                    f"Unprocessed experts: layer {bid} mlp.experts.*.{proj}: " + "; ".join(what),
                    hint="the checkpoint is incomplete; re-download the shards holding these experts")
            srcs = tuple(have[e] for e in range(int(n_expert)))
            shapes = {tuple(hf_tensors[s][0]) for s in srcs}
            dtypes = {hf_tensors[s][1] for s in srcs}
            if len(shapes) != 1 or len(dtypes) != 1:
                raise BadInputError(f"layer {bid} mlp.experts.*.{proj}: experts differ in shape/dtype: {sorted(shapes)} "
                                    f"{sorted(dtypes)}",
                                    hint="the routed experts of a layer are stacked into one GGUF tensor and must "
                                         "agree; the checkpoint is inconsistent (a wrong or mixed shard?)")
            (eshape,), (edtype,) = shapes, dtypes
            eshape = tuple(int(s) for s in eshape)
            name = tensor_name(t, bid)
            add(GGUFTensorPlan(name, (int(n_expert), *eshape), srcs, "stack_experts", False, bid, edtype,
                               _nbytes(eshape, edtype) * int(n_expert)), t)

    tensors = sorted(outputs.values(), key=lambda p: order_key[p.name])
    return GGUFPlan(tensors=tensors, dropped=dropped)


def _ranges(ids: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5' (short messages for 256 experts)."""
    out, start, prev = [], None, None
    for i in ids:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


# --------------------------------------------------------------------------------------------
# Transforms (pure torch)
# --------------------------------------------------------------------------------------------


def split_kv_b(kv_b: torch.Tensor, n_head: int, qk_nope: int, v_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_b_proj`` -> ``(attn_k_b, attn_v_b)`` exactly as llama.cpp's converter (MLA absorption).

    ``kv_b.view(n_head, qk_nope + v_head, kv_lora)``, split dim 1 at ``qk_nope``; k_b gets its last
    two axes transposed, v_b is unchanged. Any dtype; no arithmetic, so the split is bit-exact.

    Args:
        kv_b: ``(n_head*(qk_nope+v_head), kv_lora)``.
        n_head: the real head count (``num_attention_heads``), not ``head_count_kv = 1``.

    Returns:
        k_b ``(n_head, kv_lora, qk_nope)`` and v_b ``(n_head, v_head, kv_lora)``, both contiguous.

    Raises:
        ShapeError: if ``kv_b`` is not 2-D with ``n_head*(qk_nope+v_head)`` rows.

    Source: llama.cpp ``conversion/deepseek.py::DeepseekV2Model.modify_tensors`` (kv_b_proj).
    """
    if kv_b.dim() != 2 or kv_b.shape[0] != n_head * (qk_nope + v_head):
        raise ShapeError(f"kv_b_proj shape {tuple(kv_b.shape)} != (n_head*(qk_nope+v_head), kv_lora) "
                         f"with n_head={n_head}, qk_nope={qk_nope}, v_head={v_head}")
    kv_lora = kv_b.shape[1]
    kv = kv_b.view(n_head, qk_nope + v_head, kv_lora)  # (n_head, nope+v, kv_lora)
    k_b, v_b = torch.split(kv, [qk_nope, v_head], dim=1)  # (n_head, nope, kv_lora), (n_head, v, kv_lora)
    k_b = k_b.transpose(1, 2)  # (n_head, kv_lora, nope)
    return k_b.contiguous(), v_b.contiguous()


def fuse_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`split_kv_b`: ``(attn_k_b, attn_v_b)`` -> ``kv_b_proj``.

    Args:
        k_b: ``(n_head, kv_lora, qk_nope)``.
        v_b: ``(n_head, v_head, kv_lora)``.

    Returns:
        ``(n_head*(qk_nope+v_head), kv_lora)``, same dtype; bit-identical to the original kv_b.

    Raises:
        ShapeError: if head counts or kv_lora disagree.
    """
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise ShapeError(f"k_b {tuple(k_b.shape)} and v_b {tuple(v_b.shape)} are not a split kv_b "
                         "((n_head, kv_lora, nope) and (n_head, v, kv_lora))")
    n_head, kv_lora, nope = k_b.shape
    kv = torch.cat([k_b.transpose(1, 2), v_b], dim=1)  # (n_head, nope+v, kv_lora)
    return kv.reshape(n_head * (nope + v_b.shape[1]), kv_lora).contiguous()


def stack_experts(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` in the given (expert-id) order: ``E x (M, N)`` -> ``(E, M, N)``."""
    if not tensors:
        raise ShapeError("no experts to stack")
    return torch.stack(tensors, dim=0)


def build_tensor(plan: GGUFTensorPlan, sources: list[torch.Tensor], cfg: Mapping[str, Any]) -> torch.Tensor:
    """Apply ``plan.kind`` to the loaded ``sources`` (same order as ``plan.sources``).

    Raises:
        ShapeError: if the result's shape differs from ``plan.shape``.
    """
    if len(sources) != len(plan.sources):
        raise ShapeError(f"{plan.name}: got {len(sources)} sources, plan lists {len(plan.sources)}")
    if plan.kind == "copy":
        out = sources[0]
    elif plan.kind == "stack_experts":
        out = stack_experts(list(sources))
    elif plan.kind in ("kv_b_k", "kv_b_v"):
        n_head, nope, v, _ = _mla_dims(cfg)
        out = split_kv_b(sources[0], n_head, nope, v)[0 if plan.kind == "kv_b_k" else 1]
    else:  # pragma: no cover
        raise ValueError(f"unknown plan kind {plan.kind!r}")
    if tuple(out.shape) != plan.shape:
        raise ShapeError(f"{plan.name}: built shape {tuple(out.shape)} != planned {plan.shape}")
    return out
