"""Layer-streamed calibration for INT quantization: AWQ (scale search, folds, clip search, RTN) or GPTQ,
one decoder layer at a time, the quantized layers' outputs feeding the next layer.

The quantize pipeline drives it and writes the results; this module writes no files::

    eng = CalibrationEngine(src, policy, "awq", AUTOAWQ, calib_ids)
    for i in range(eng.num_layers):
        res = eng.run_layer(i)        # LayerResult: quantized QTensors, replaced float tensors, stats
        write(res.quantized, res.replaced)

Per layer ``i`` (docs/int-formats.md §5-§7):

1. **Capture.** Run the float layer ``i``'s attention (``ReferenceModel.attention_blocks``) on every
   calibration sequence, its input being the *quantized* layers ``0..i-1``'s output, with an ``on_linear``
   hook caching the input of each attention Linear, and cache the post-attention normed MLP input once
   (a dense layer's MLP runs too, for its down_proj input). Routing is computed once from that input with
   :func:`dsconvert.model.moe.route`, per sequence as the forward does.
2. **Experts in groups.** A MoE layer's routed experts are then taken :attr:`expert_group` at a time: their
   float weights, inputs (routed rows of the cached MLP input; ``down_proj``'s input recomputed from them
   exactly as the per-sequence forward computes it), Hessians and working copies exist only for the group
   in flight, and the group's results are spilled to ``spill_dir`` when one is given.
   **GPTQ:** non-expert linears one by one (:func:`dsconvert.quant.gptq.gptq_quantize`, linears sharing an
   input share one Hessian); each expert group through one batched
   :func:`~dsconvert.quant.gptq.gptq_quantize_batch` per weight shape (gate and up stacked along M).
   **AWQ:** for each mapping of :data:`AWQ_MAPPINGS` (prev op → linears sharing its output) search the
   smoothing scale ``s`` (:func:`dsconvert.quant.awq.awq_search_scale`, inspecting the whole attention
   block / MoE / MLP where AutoAWQ does), fold it (norm ``/= s``, linears' columns ``*= s``, the router's
   columns ``*= s`` so routing does not drift, ``up_proj`` rows ``/= s`` for up→down), then clip-search
   each linear (skipped for ``q_*`` names as in AutoAWQ) and RTN-quantize the clipped folded weight. The
   MoE mapping (every expert's gate/up) is searched streamed (:func:`~dsconvert.quant.awq.awq_search_scale_streamed`):
   ``w_mean`` and the float and candidate MoE outputs are accumulated expert by expert,
   :attr:`awq_candidates` candidate outputs at a time; its column fold is applied when an expert's group
   is processed.
3. **Propagate.** Run layer ``i`` again with the quantized weights (dequantized one expert at a time) and
   the replaced tensors (``ReferenceModel.layer_forward_seqwise``: per-sequence numbers, each expert read
   once); its output is layer ``i+1``'s input. All per-layer caches are dropped before that forward
   (docs/known-failures.md item 27).

Neither the group size nor the candidate chunk changes a byte of the result (each expert's and each
candidate's arithmetic is the same, and sums run in the same order).

**Experts with few tokens** (fewer than ``min_expert_tokens`` routed tokens, docs/known-failures.md item 29):
``expert_policy="all-tokens"`` (default) calibrates that expert on every token of the layer
(llm-compressor's ``moe_calibrate_all_experts``); ``"rtn"`` quantizes it with plain RTN (for AWQ: the
shared gate/up scale is still folded in, no own up→down scale, no clip search); ``"topk"`` calibrates it on
the tokens that would route to it with top-k raised to ``TOPK_FACTOR * k`` over all groups (GPTQModel's
routing override; still all tokens if that leaves it under the minimum). The measured comparison is in
docs/known-failures.md item 29. The choice is reported per
expert in ``stats["experts"]``. No expert is ever zeroed or skipped.

Memory (per layer, :func:`estimate_peak_bytes`): the residual stream, the cached attention inputs (GPTQ:
their streamed Hessians, each dropped after its last linear) and MLP input (token-proportional), the
layer's non-expert weights, and the largest working set: one non-expert linear, one expert group, or AWQ's
MoE-smoothing accumulators; the capture and propagate forwards run :data:`CHUNK_TOKENS` tokens of sequences
at a time (the propagated chunk replacing its input); nothing grows with the number of experts when results
are spilled. The MTP layer is not calibrated.

Same code on CPU and CUDA for the kernels (``device``); the reference forward runs on the CPU.

Sources: AutoAWQ ``awq/quantize/quantizer.py`` (``AwqQuantizer._apply_quant``, ``_search_best_scale``,
``_search_best_clip``) and ``awq/models/deepseek_v3.py`` (mappings); AutoGPTQ
``auto_gptq/modeling/_base.py::quantize`` (layer-sequential loop); llm-compressor
``modifiers/awq`` (router in the balance layers) and ``moe_calibrate_all_experts``.
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UsageError
from ..formats import deepseek_v3 as v3
from ..model import ReferenceModel
from ..model.config import ModelConfig
from ..model.mla import mla_attention
from ..model.moe import route
from ..model.source import WeightSource
from ..quant.awq import (
    apply_clip,
    awq_scale_candidates,
    awq_search_clip,
    awq_search_scale,
    awq_search_scale_streamed,
    awq_weight_sums,
    fold_linear_rows,
    fold_norm,
    pseudo_quantize,
    scale_columns,
)
from ..quant.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batch, output_error
from ..quant.rtn import Convention, QTensor, QuantSpec, dequantize, quantize

__all__ = ["CalibrationEngine", "LayerResult", "Policy", "AWQ_MAPPINGS", "EXPERT_POLICIES", "METHODS"]

#: ``policy(module_name, (out_features, in_features)) -> QuantSpec | None`` (None = keep in float).
#: ``module_name`` is the HF weight name without ``.weight``, e.g. ``model.layers.3.mlp.experts.7.down_proj``.
Policy = Callable[[str, tuple[int, int]], "QuantSpec | None"]

METHODS = ("awq", "gptq", "autoround")
EXPERT_POLICIES = ("all-tokens", "rtn", "topk")

#: ``expert_policy="topk"``: an expert with too few tokens is calibrated on the tokens that route to it when
#: every token picks ``TOPK_FACTOR * num_experts_per_tok`` experts from all groups (GPTQModel's routing
#: override, restricted to the starved experts; the propagated output keeps the model's own routing).
TOPK_FACTOR = 4

#: Default minimum routed tokens for an expert to be calibrated on its own tokens.
MIN_EXPERT_TOKENS = 16

#: Experts per progress stage line ("calibrating experts 64-95").
PROGRESS_EXPERTS = 32

#: Tokens (at most) used for the per-linear output-error statistic of AWQ.
STAT_TOKENS = 512

#: Calibration tokens (at most, whole sequences; at least one sequence) the capture and propagate forwards
#: run at once: their per-sequence intermediates (post-attention residual, MLP input and output) exist for one
#: chunk, not for all T tokens. Each propagate chunk reads (dequantizes) every expert of the layer once.
CHUNK_TOKENS = 16384

#: AutoAWQ skips the clip search for these name fragments (q/k projections: their outputs go through a
#: softmax, where clipping error is amplified). In DeepSeek this skips q_a/q_b/q_proj only.
CLIP_SKIP = ("q_", "k_", "query", "key", "Wqkv")

#: AWQ mappings for DeepSeek V2/V3 (AutoAWQ ``deepseek_v3.py`` + the router fix), as data:
#: ``(prev op, its kind, linears relative to the layer, what the search inspects)``. ``{q}`` is
#: ``q_a_proj`` or ``q_proj`` (``q_lora_rank`` null). ``{mlp_in}`` expands to every expert's and the
#: shared expert's gate/up (MoE) or the dense gate/up; ``{up->down}`` to one mapping per MLP.
AWQ_MAPPINGS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("input_layernorm", "norm", ("self_attn.{q}", "self_attn.kv_a_proj_with_mqa"), "attention"),
    ("self_attn.q_a_layernorm", "norm", ("self_attn.q_b_proj",), "linears"),
    ("self_attn.kv_a_layernorm", "norm", ("self_attn.kv_b_proj",), "linears"),
    ("post_attention_layernorm", "norm", ("{mlp_in}",), "mlp"),
    ("{up}", "linear", ("{down}",), "linears"),
)

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


@dataclass
class LayerResult:
    """What :meth:`CalibrationEngine.run_layer` returns for one decoder layer.

    Attributes:
        layer: the layer index.
        quantized: ``{module name: QTensor}`` for every linear the policy quantizes in this layer
            (``model.layers.3.mlp.experts.7.down_proj``); write these instead of the source weights.
        replaced: ``{HF tensor name: float32 tensor}`` of float tensors AWQ folding changed, to be
            written instead of the source's: norm weights (``…input_layernorm.weight`` etc.) divided by
            ``s``, the router ``…mlp.gate.weight`` with its columns multiplied by ``s``, and any folded
            linear the policy keeps in float (``…up_proj.weight`` rows ``/ s``, columns ``* s``). Empty
            for GPTQ.
        stats: see :meth:`CalibrationEngine.run_layer`.
        folded: only with ``keep_folded=True``: ``{HF weight name: float32}`` every linear after AWQ
            scale folding and before clipping/quantization (with ``replaced`` the float model is
            unchanged; for tests and diagnostics).
    """

    layer: int
    quantized: Mapping[str, QTensor]
    replaced: dict[str, torch.Tensor]
    stats: dict
    folded: dict[str, torch.Tensor] = field(default_factory=dict)

    def close(self) -> None:
        """Delete the spilled expert results (call when they have been written)."""
        if isinstance(self.quantized, LayerResults):
            self.quantized.close()


class _LayerSource:
    """A WeightSource over ``inner`` that caches the non-expert tensors of one layer (dropped by :meth:`reset`)
    and serves ``overrides`` (an :class:`_Overrides` of dequantized QTensors and folded tensors, or a dict)
    instead of the inner tensors. Routed experts' weights are not cached: a MoE layer's experts are read when
    used, a group at a time."""

    def __init__(self, inner: WeightSource):
        self.inner = inner
        self.config = inner.config
        self.overrides: Mapping[str, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.overrides = {}
        self._cache = {}

    def has(self, name: str) -> bool:
        return name in self.overrides or self.inner.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the checkpoint header when the source has one (no read)."""
        ck = getattr(self.inner, "ck", None)
        info = ck.tensors.get(name) if ck is not None else None
        if info is not None and name not in self.overrides and not ck.is_scale(name):
            return tuple(info[1].shape)
        return tuple(self.get(name).shape)

    def get(self, name: str) -> torch.Tensor:
        t = self.overrides.get(name)
        if t is not None:
            return t
        t = self._cache.get(name)
        if t is None:
            t = self.inner.get(name)
            if name.startswith("model.layers.") and ".mlp.experts." not in name:
                # routed experts are fetched when needed, never all held (256 x 3 matrices per layer)
                self._cache[name] = t
        return t


def spill_tensors(items: Mapping[str, QTensor]) -> dict[str, torch.Tensor]:
    """The spill file layout of ``{module: QTensor}``: ``MODULE.q``, ``MODULE.scale`` and ``MODULE.zero`` (when
    the tensor has zero points), contiguous."""
    tensors = {}
    for m, qt in items.items():
        tensors[m + ".q"] = qt.q.contiguous()
        tensors[m + ".scale"] = qt.scale.contiguous()
        if qt.zero is not None:
            tensors[m + ".zero"] = qt.zero.contiguous()
    return tensors


class LayerResults(Mapping):
    """``{module name: QTensor}`` of one layer. Non-expert linears are held in memory; the routed experts'
    results are spilled, one safetensors file per expert group, to ``spill_dir`` when it is set (so a MoE
    layer's results do not grow memory with the number of experts), and read back on access. Iteration
    follows insertion order. :meth:`close` deletes the spill files."""

    def __init__(self, spill_dir: Path | None, tag: str):
        self.spill_dir = spill_dir
        self.tag = tag
        self._mem: dict[str, QTensor] = {}
        self._spilled: dict[str, tuple[Path, QuantSpec, Convention, bool]] = {}
        self._order: list[str] = []
        self._files: list[Path] = []

    def __setitem__(self, module: str, qt: QTensor) -> None:
        self.put({module: qt}, spill=False)

    def put(self, items: dict[str, QTensor], spill: bool = True) -> None:
        """Add ``items``; with ``spill`` and a ``spill_dir``, write them to one new spill file."""
        new = [m for m in items if m not in self._mem and m not in self._spilled]
        if not spill or self.spill_dir is None or not items:
            self._mem.update(items)
        else:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{self.tag}-{len(self._files)}.safetensors"
            self._files.append(path)
            save_file(spill_tensors(items), str(path))
            for m, qt in items.items():
                self._spilled[m] = (path, qt.spec, qt.convention, qt.zero is not None)
        self._order += new

    def adopt(self, path: Path, modules: list[tuple[str, QuantSpec, Convention, bool]]) -> None:
        """Register a spill file written elsewhere (another process, same layout as :meth:`put`): ``modules``
        lists ``(module, spec, convention, has_zero)`` of what it holds, in order; :meth:`close` deletes it."""
        self._files.append(path)
        for m, spec, conv, has_zero in modules:
            self._spilled[m] = (path, spec, conv, has_zero)
            if m not in self._mem:
                self._order.append(m)

    def __getitem__(self, module: str) -> QTensor:
        qt = self._mem.get(module)
        if qt is not None:
            return qt
        path, spec, conv, has_zero = self._spilled[module]
        with safe_open(str(path), "pt") as f:
            return QTensor(f.get_tensor(module + ".q"), f.get_tensor(module + ".scale"),
                           f.get_tensor(module + ".zero") if has_zero else None, spec, conv)

    def __contains__(self, module: object) -> bool:
        return module in self._mem or module in self._spilled

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def close(self) -> None:
        """Delete the spill files (the results are no longer readable from them)."""
        for f in self._files:
            f.unlink(missing_ok=True)
        self._files = []
        self._spilled = {}
        self._order = [m for m in self._order if m in self._mem]


class _Overrides:
    """What the propagate forward reads instead of the source for one layer: ``replaced`` float tensors, and
    each quantized module's weight dequantized when it is fetched (one expert at a time, not the layer)."""

    def __init__(self, quantized: Mapping[str, QTensor], replaced: dict[str, torch.Tensor]):
        self.quantized = quantized
        self.replaced = replaced

    def __contains__(self, name: object) -> bool:
        return name in self.replaced or (isinstance(name, str) and name.endswith(".weight")
                                         and name[: -len(".weight")] in self.quantized)

    def get(self, name: str, default=None):
        t = self.replaced.get(name)
        if t is not None:
            return t
        if name.endswith(".weight") and name[: -len(".weight")] in self.quantized:
            return dequantize(self.quantized[name[: -len(".weight")]])
        return default


class CalibrationEngine:
    """Calibrated INT quantization (AWQ or GPTQ), one decoder layer per :meth:`run_layer` call.

    Args:
        source: the float (or FP8, dequantized on the fly) checkpoint, e.g.
            :class:`dsconvert.convert.weights.CheckpointWeightSource`.
        policy: ``policy(module_name, (M, N)) -> QuantSpec | None`` for every decoder Linear (the router
            ``mlp.gate`` is never offered); see :data:`Policy`.
        method: ``"awq"`` or ``"gptq"``.
        convention: storage convention of the target format (AUTOAWQ, GPTQ, COMPRESSED_TENSORS).
        calib_ids: calibration sequences (token ids), each run from position 0.
        dtype: compute dtype of the reference forward (float32 or bfloat16); the kernels use float32.
        damp: GPTQ relative dampening.
        act_order: GPTQ act-order (with static groups, so no g_idx is needed).
        n_grid: AWQ grid points for the scale and clip searches.
        min_expert_tokens: experts routed fewer tokens use ``expert_policy``.
        expert_policy: ``"all-tokens"`` (calibrate on every token of the layer), ``"rtn"`` or ``"topk"``.
        progress: called as ``progress(layer_idx, stage)`` with stage ``capture``, ``search``,
            ``calibrating experts A-B`` (MoE layers, every :data:`PROGRESS_EXPERTS` experts), ``propagate``.
        device: where the kernels run (Hessians, GPTQ, AWQ searches); default CPU.
        keep_folded: fill :attr:`LayerResult.folded` (AWQ; memory: one layer of float32 linears).
        expert_group: routed experts calibrated at once (GPTQ: one batched core per group); default: the
            most that fit the memory budget (:func:`plan_groups`, at most :data:`PROGRESS_EXPERTS`). The
            group size never changes the result.
        max_memory: the memory budget (bytes) the groups are sized for; default :func:`default_budget`.
        spill_dir: where a MoE layer's expert results are spilled (one safetensors file per group, deleted
            by :meth:`LayerResult.close`); default None keeps them in memory.

    Attributes:
        expert_group, awq_candidates: the planned group size and the AWQ MoE-smoothing candidate outputs
            held at once (both may be set before :meth:`run_layer`; neither changes the result).

    Raises:
        UsageError: unknown method/expert policy, empty calibration set, or ids outside the vocabulary.
    """

    def __init__(
        self,
        source: WeightSource,
        policy: Policy,
        method: str,
        convention: Convention,
        calib_ids: Sequence[Sequence[int]],
        *,
        dtype: torch.dtype = torch.float32,
        damp: float = 0.01,
        act_order: bool = False,
        n_grid: int = 20,
        min_expert_tokens: int = MIN_EXPERT_TOKENS,
        expert_policy: str = "all-tokens",
        progress: Callable[[int, str], None] | None = None,
        device: torch.device | str | None = None,
        keep_folded: bool = False,
        expert_group: int | None = None,
        max_memory: int | None = None,
        spill_dir: Path | None = None,
    ):
        if method not in METHODS:
            raise UsageError(f"unknown calibration method {method!r}", hint="use 'awq', 'gptq' or 'autoround'")
        if expert_policy not in EXPERT_POLICIES:
            raise UsageError(f"unknown expert policy {expert_policy!r}", hint="use 'all-tokens', 'rtn' or 'topk'")
        seqs = [torch.as_tensor(list(s), dtype=torch.long) for s in calib_ids]
        seqs = [s for s in seqs if s.numel()]
        if not seqs:
            raise UsageError("no calibration tokens", hint="pass at least one non-empty token sequence")
        self._src = _LayerSource(source)
        self.model = ReferenceModel(self._src, dtype)
        self.cfg: ModelConfig = self.model.cfg
        vocab = self.cfg.vocab_size
        if any(int(s.min()) < 0 or int(s.max()) >= vocab for s in seqs):
            raise UsageError(f"calibration token id outside 0..{vocab - 1}")
        self.policy = policy
        self.method = method
        self.convention = convention
        self.damp = damp
        self.act_order = act_order
        self.n_grid = n_grid
        self.min_expert_tokens = min_expert_tokens
        self.expert_policy = expert_policy
        self.progress = progress
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.keep_folded = keep_folded
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        #: ``dispatch(layer, groups)``: runs a MoE layer's routed expert groups ``[(e0, e1), ...]`` elsewhere
        #: and merges them into the layer (:mod:`.calib_ray`); None: here, one group after the other.
        self.expert_dispatch: Callable[[_Layer, list[tuple[int, int]]], None] | None = None
        #: ``method="autoround"``: a :class:`~.calib_signround.SignRoundOptions` (None: its defaults), and the
        #: float model's residual stream after the last calibrated layer (its targets' input; None before layer 1).
        self.signround = None
        self.reference_hidden: list[torch.Tensor] | None = None
        self._positions = [torch.arange(s.numel()) for s in seqs]
        with torch.no_grad():
            self._hidden: list[torch.Tensor] = [self.model.embed(s) for s in seqs]  # (T_s, hidden) each
        self._src.reset()
        self.next_layer = 0
        self._torn: int | None = None  # a layer whose propagate forward failed part way (see run_layer)
        self._fixed_group = expert_group
        self.set_budget(max_memory)

    # -- public ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Decoder layers to calibrate (``num_hidden_layers``; the MTP layer is not included)."""
        return self.cfg.num_hidden_layers

    @property
    def hidden_states(self) -> list[torch.Tensor]:
        """The residual stream after the last calibrated layer (quantized model), one ``(T_s, hidden)``
        tensor per calibration sequence."""
        return self._hidden

    def restore(self, hidden: Sequence[torch.Tensor], next_layer: int) -> None:
        """Resume from a saved residual stream: ``hidden`` is :attr:`hidden_states` as it was after layer
        ``next_layer - 1`` (one ``(T_s, hidden)`` tensor per calibration sequence, any float dtype).

        Raises:
            UsageError: the sequence count or shapes differ from this engine's calibration set, or
                ``next_layer`` is outside ``0..num_layers``.
        """
        if len(hidden) != len(self._hidden) or any(tuple(h.shape) != tuple(o.shape)
                                                   for h, o in zip(hidden, self._hidden)):
            raise UsageError("saved calibration state does not match the calibration sequences",
                             hint="rerun without resuming (--overwrite)")
        if not 0 <= next_layer <= self.num_layers:
            raise UsageError(f"saved calibration state names layer {next_layer}, outside 0..{self.num_layers}")
        dtype = self._hidden[0].dtype
        self._hidden = [h.to(dtype) for h in hidden]
        self.next_layer = next_layer
        self._torn = None

    def set_budget(self, budget: int | None) -> None:
        """Plan the expert group size (and AWQ's candidate chunk) for ``budget`` bytes (None:
        :func:`default_budget`) with :func:`plan_groups`; a group size given to the constructor is kept."""
        self.budget = budget if budget is not None else default_budget()
        self.expert_group, self.awq_candidates = plan_groups(self.cfg, self.method, self.num_tokens, self.budget,
                                                             self._fixed_group)

    def peak_memory_estimate(self, spilled: bool | None = None) -> int:
        """:func:`estimate_peak_bytes` for this model, calibration set and planned groups (bytes); ``spilled``
        (default: whether :attr:`spill_dir` is set) says whether expert results go to disk."""
        spilled = self.spill_dir is not None if spilled is None else spilled
        return estimate_peak_bytes(self.cfg, self.method, self.num_tokens, expert_group=self.expert_group,
                                   awq_candidates=self.awq_candidates, spilled=spilled, **self._batch_shape())

    def _batch_shape(self) -> dict:
        """``autoround``: the tokens of its largest iteration batch and longest sequence (else nothing)."""
        if self.method != "autoround":
            return {}
        from .calib_signround import SignRoundOptions

        bs = (self.signround or SignRoundOptions()).batch_size
        lens = sorted((int(p.numel()) for p in self._positions), reverse=True)
        return {"batch_tokens": sum(lens[:bs]), "seq_len": lens[0]}

    @property
    def num_tokens(self) -> int:
        return sum(int(p.numel()) for p in self._positions)

    @torch.no_grad()
    def run_layer(self, layer_idx: int) -> LayerResult:
        """Calibrate and quantize decoder layer ``layer_idx`` (must be called for 0, 1, 2, … in order).

        Returns:
            :class:`LayerResult`. ``stats`` holds ``layer``, ``method``, ``seconds``, ``tokens`` (calibration
            tokens), ``linears`` (``{module: {"tokens", "rel_output_mse", "calibration"}}``: tokens the
            linear was calibrated on, the relative output MSE ``||XWᵀ - XŴᵀ||² / ||XWᵀ||²`` of the
            quantized weight on those tokens (AWQ: up to 512 of them, against the folded float weight),
            and ``"routed"``/``"all-tokens"``/``"rtn"``/``"topk"``/``"dense"``), ``experts`` (MoE layers:
            ``{eid: {"tokens_routed", "policy"}}``, plus ``"tokens_topk"`` under the ``topk`` policy),
            ``smoothing`` (AWQ: ``{prev op: {"best_ratio", "mse_best", "mse_grid", "linears"}}``) and ``clip``
            (AWQ: ``{module: mean shrink of max|w|}``).

        Raises:
            UsageError: out-of-order call, a layer index outside ``0..num_hidden_layers-1``, or an earlier call
                that failed in its propagate forward (the residual stream, replaced a chunk at a time, is then
                partly advanced; :meth:`restore` a saved state).
        """
        if self._torn is not None:
            raise UsageError(f"layer {self._torn}'s propagate forward was interrupted: the residual stream is "
                             "partly advanced", hint="restore() a saved calibration state, or start again")
        if layer_idx != self.next_layer:
            raise UsageError(
                f"run_layer({layer_idx}) called out of order: layer {self.next_layer} is next",
                hint="call run_layer for 0..num_hidden_layers-1 in order, once each")
        if layer_idx >= self.num_layers:
            raise UsageError(f"layer {layer_idx} is not a decoder layer (0..{self.num_layers - 1}); "
                             "the MTP layer is not calibrated")
        t0 = time.perf_counter()
        self._src.reset()
        lay = _Layer(self, layer_idx)
        try:
            stage_s: dict[str, float] = {}
            t1 = time.perf_counter()
            if self.method == "autoround":  # its own forward: convert/calib_signround.py
                from .calib_signround import SignRoundOptions, signround_layer

                t2 = t1
                signround_layer(lay, self.signround or SignRoundOptions())
            else:
                self.report_stage(layer_idx, "capture")
                lay.capture()
                self.report_stage(layer_idx, "search")
                t2 = time.perf_counter()
                stage_s["capture"] = t2 - t1
                if self.method == "awq":
                    lay.awq()
                else:
                    lay.gptq()
            t3 = time.perf_counter()
            stage_s["quantize"] = t3 - t2
            self.report_stage(layer_idx, "propagate")
            self._src.overrides = lay.overrides()
            lay.release()  # the calibration caches go before the propagate forward needs its own
            gc.collect()
            # a chunk of sequences at a time, each output replacing its input (the old and new residual
            # streams are not both held); per-sequence arithmetic, so the chunking changes no number
            self._torn = layer_idx  # until every chunk is through, the stream is part layer i's input, part output
            for c0, c1 in token_chunks(self._positions, CHUNK_TOKENS):
                self._hidden[c0:c1] = self.model.layer_forward_seqwise(layer_idx, self._hidden[c0:c1],
                                                                       self._positions[c0:c1])
            self._torn = None
            stage_s["propagate"] = time.perf_counter() - t3
            lay.stats["stage_seconds"] = {k: round(v, 3) for k, v in stage_s.items()}
            result = LayerResult(layer_idx, lay.quantized, lay.replaced, lay.stats,
                                 lay.folded if self.keep_folded else {})
        except BaseException:
            lay.quantized.close()  # no spill file outlives a failed or interrupted layer
            raise
        finally:
            self._src.reset()
            lay.release()
            del lay
            gc.collect()
        result.stats["seconds"] = time.perf_counter() - t0
        self.next_layer += 1
        return result

    def report_stage(self, layer_idx: int, stage: str) -> None:
        """Pass ``stage`` of layer ``layer_idx`` to the ``progress`` callback (if any)."""
        if self.progress is not None:
            self.progress(layer_idx, stage)


class _Layer:
    """The per-layer working state of :meth:`CalibrationEngine.run_layer` (dropped when it returns)."""

    def __init__(self, eng: CalibrationEngine, idx: int):
        self.eng = eng
        self.cfg = eng.cfg
        self.idx = idx
        self.p = f"{v3.LAYER_PREFIX}{idx}"
        self.moe = self.cfg.is_moe_layer(idx)
        self.dev = eng.device
        self.quantized = LayerResults(eng.spill_dir, f"layer{idx}")
        self.replaced: dict[str, torch.Tensor] = {}
        self.folded: dict[str, torch.Tensor] = {}
        self.stats: dict = {"layer": idx, "method": eng.method, "tokens": eng.num_tokens, "linears": {},
                            "experts": {}, "smoothing": {}, "clip": {}}
        self.cur: dict[str, torch.Tensor] = {}  # module -> float32 working weight (folded for AWQ)
        self._f32: dict[str, torch.Tensor] = {}  # module -> float32 copy of the source weight
        self._col_scale: dict[str, torch.Tensor] = {}  # module -> AWQ scale its columns get when first used
        self._xe: tuple[int, torch.Tensor] | None = None  # (expert, its routed input): one at a time
        self.inputs: dict[str, torch.Tensor] = {}  # key -> (n, N) float32 cached input
        self.streamed: dict[str, _StreamedHessian] = {}  # GPTQ: Linear -> Hessian + token sample, no cache
        self.attn_in: list[torch.Tensor] = []  # per-sequence normed attention input
        self.in_scale: dict[str, torch.Tensor] = {}  # module -> s its cached input must be divided by
        self.linears = self._linear_names()
        self.specs = {n: eng.policy(n, tuple(eng._src.shape(n + ".weight"))) for n in self.linears}
        t0, self.bounds = 0, []  # (start, end) token rows of each calibration sequence
        for pos in eng._positions:
            self.bounds.append((t0, t0 + int(pos.numel())))
            t0 += int(pos.numel())

    # -- names and weights ------------------------------------------------------------------------
    def _linear_names(self) -> list[str]:
        cfg = self.cfg
        names = v3.layer_linears(self.idx, q_lora_rank=cfg.q_lora_rank, moe=self.moe,
                                 n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts)
        return [n for n in names if self.eng._src.has(n + ".weight")]

    def _mlps(self) -> list[str]:
        """MLP prefixes: the experts then the shared experts (MoE), or the dense MLP."""
        return v3.mlp_prefixes(self.idx, moe=self.moe, n_routed_experts=self.cfg.n_routed_experts,
                               n_shared_experts=self.cfg.n_shared_experts)

    def _src_weight(self, module: str) -> torch.Tensor:
        return self.eng._src.get(module + ".weight")

    def w(self, module: str) -> torch.Tensor:
        """The float32 working weight of ``module`` on the kernel device (folded so far, for AWQ)."""
        t = self.cur.get(module)
        if t is None:
            t = self._f32.get(module)
            if t is None:
                t = self._f32[module] = self._src_weight(module).to(device=self.dev, dtype=torch.float32)
            s = self._col_scale.pop(module, None)
            if s is not None:  # the MoE smoothing's column fold, applied when the expert is processed
                t = self.cur[module] = scale_columns(t, s)
        return t

    def _dense(self, name: str) -> torch.Tensor:
        return self.eng._src.get(name).to(device=self.dev, dtype=torch.float32)

    def _drop(self, modules: Sequence[str]) -> None:
        """Free the working copies and cached inputs of ``modules`` (an expert that is done)."""
        for n in modules:
            self.cur.pop(n, None)
            self._f32.pop(n, None)
            self.inputs.pop(n, None)
        self._xe = None

    def _drop_dense_inputs(self) -> None:
        """Free the attention / dense-MLP / shared-expert inputs once their linears are done (the experts
        only need the MLP input)."""
        self.inputs.clear()
        self.attn_in.clear()
        self.streamed.clear()

    # -- 1. capture -----------------------------------------------------------------------------
    def capture(self) -> None:
        """Run the float layer's attention on every sequence (hooking its Linears' inputs) and cache the MLP
        input once; a dense layer's MLP runs too (its down_proj input). A MoE layer's experts are not run
        here: their inputs are recomputed a group at a time from the cached MLP input and the routing."""
        eng = self.eng
        store: dict[str, list[torch.Tensor]] = {}
        skip = (".kv_a_proj_with_mqa", ".up_proj", ".gate_proj")
        attn_key = f"{self.p}.self_attn.{'q_proj' if self.cfg.q_lora_rank is None else 'q_a_proj'}"

        gptq = eng.method == "gptq"
        dense_gate = f"{self.p}.mlp.gate_proj"

        def hook(name: str, x: torch.Tensor) -> None:
            if name.endswith(skip) and name != dense_gate or (self.moe and name == dense_gate):
                return
            if gptq and name != dense_gate:  # GPTQ needs only the Hessian and a token sample: no cache
                st = self.streamed.get(name)
                if st is None:
                    st = self.streamed[name] = _StreamedHessian(x.shape[1], eng.num_tokens, self.dev)
                st.add(x.detach().to(device=self.dev, dtype=torch.float32))
                return
            if name == attn_key:
                self.attn_in.append(x.detach().to(torch.float32))
                return
            store.setdefault(name, []).append(x.detach().to(device=self.dev, dtype=torch.float32))

        xs = []  # the MLP inputs; the post-attention residual h' is dropped a chunk of sequences at a time
        for c0, c1 in token_chunks(eng._positions, CHUNK_TOKENS):
            xs += [x for _, x in eng.model.attention_blocks(self.idx, eng._hidden[c0:c1], eng._positions[c0:c1],
                                                            on_linear=hook)]
        if self.moe:
            store[f"{self.p}.mlp.gate"] = [x.to(device=self.dev, dtype=torch.float32) for x in xs]
        else:
            eng.model.mlp_block(self.idx, xs, on_linear=hook)
        del xs
        self.inputs = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in store.items()}
        del store
        if not gptq:
            self.inputs[attn_key] = torch.cat(self.attn_in).to(self.dev)
        for st in self.streamed.values():
            st.finish()
        mlp_key = f"{self.p}.mlp.gate" if self.moe else f"{self.p}.mlp.gate_proj"
        self.x_mlp = self.inputs.pop(mlp_key)  # (T, hidden) post-attention normed input
        self.attn_key = attn_key
        if self.moe:
            self._route()

    def _route(self) -> None:
        """Routing of the cached MLP input as the forward computes it: per expert the token rows and the
        mixing weights; the per-expert calibration choice."""
        cfg = self.cfg
        gate = f"{self.p}.mlp.gate"
        gate_w = self.eng._src.get(gate + ".weight").to(torch.float32)  # (E, hidden)
        bias_name = gate + ".e_score_correction_bias"
        bias = self.eng._src.get(bias_name) if self.eng._src.has(bias_name) else None
        # per sequence, exactly as the forward computes it (a batched matmul could round differently)
        ws, idx = [], []
        for t0, t1 in self.bounds:
            w_s, i_s = route(cfg, F.linear(self.x_mlp[t0:t1].cpu(), gate_w), bias)  # (T_s, k) each
            ws.append(w_s)
            idx.append(i_s)
        weights, indices = torch.cat(ws).to(self.dev), torch.cat(idx).to(self.dev)  # (T, k)
        self.routes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calib_rows: dict[int, torch.Tensor] = {}  # "topk" experts: rows under the raised top-k
        raised = None
        for e in range(cfg.n_routed_experts):
            tok, kpos = torch.where(indices == e)
            self.routes[e] = (tok, weights[tok, kpos])
            n = int(tok.numel())
            entry = {"tokens_routed": n}
            if n >= self.eng.min_expert_tokens:
                pol = "routed"
            else:
                pol = self.eng.expert_policy
            if pol == "topk":
                if raised is None:
                    raised = self._raised_topk(gate_w, bias)
                rows = torch.where((raised == e).any(dim=1))[0]
                entry["tokens_topk"] = int(rows.numel())
                if rows.numel() >= self.eng.min_expert_tokens:
                    self.calib_rows[e] = rows
                    self.inputs.pop(f"{self.p}.mlp.experts.{e}.down_proj", None)  # recomputed on those rows
                else:
                    pol = "all-tokens"
            entry["policy"] = pol
            self.stats["experts"][e] = entry

    def _raised_topk(self, gate_w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Expert indices ``(T, TOPK_FACTOR * k)`` per token with top-k raised and no group limit."""
        from dataclasses import replace

        cfg = self.cfg
        k = min(cfg.n_routed_experts, TOPK_FACTOR * cfg.num_experts_per_tok)
        wide = replace(cfg, num_experts_per_tok=k, topk_group=cfg.n_group)
        _, idx = route(wide, F.linear(self.x_mlp.cpu(), gate_w), bias)
        return idx.to(self.dev)

    def _forward_down_input(self, pre: str, tok: torch.Tensor | None) -> torch.Tensor:
        """The ``down_proj`` input of MLP ``pre`` exactly as the per-sequence forward computes it:
        ``silu(x Wgᵀ) * (x Wuᵀ)`` in the compute dtype on each sequence's rows of the MLP input (``tok``: the
        routed token rows, ascending; None: every token), concatenated, ``(n, I)`` float32."""
        md = self.eng.model.dtype
        wg = self._src_weight(pre + ".gate_proj").to(md)  # (I, hidden)
        wu = self._src_weight(pre + ".up_proj").to(md)
        parts = []
        for t0, t1 in self.bounds:
            if tok is None:
                rows = self.x_mlp[t0:t1]
            else:
                sel = tok[(tok >= t0) & (tok < t1)]
                if sel.numel() == 0:  # the forward runs an expert only on sequences that route to it
                    continue
                rows = self.x_mlp[sel]
            rows = rows.cpu().to(md)  # (n_s, hidden), the forward's own values
            parts.append((F.silu(F.linear(rows, wg)) * F.linear(rows, wu)).to(device=self.dev, dtype=torch.float32))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def report_group(self, e0: int, e1: int) -> None:
        """Name the stage of the expert group ``e0..e1-1`` in flight."""
        self.eng.report_stage(self.idx, f"calibrating experts {e0}-{e1 - 1}")

    def _expert_of(self, module: str) -> int | None:
        m = _EXPERT.search(module)
        return int(m.group(1)) if m else None

    def calibration_of(self, module: str) -> str:
        e = self._expert_of(module)
        return "dense" if e is None else self.stats["experts"][e]["policy"]

    def x_of(self, module: str) -> torch.Tensor:
        """Calibration input ``(n, N)`` float32 of ``module`` (divided by its AWQ scale if folded)."""
        x = self._raw_x(module)
        s = self.in_scale.get(module)
        return x if s is None else x / s[None, :]

    def _raw_x(self, module: str) -> torch.Tensor:
        """Unscaled calibration input of ``module``: all tokens for attention/dense/shared linears; for an
        expert its routed tokens, or every token of the layer under the ``all-tokens`` policy (its
        ``down_proj``: the routed tokens' forward input when it has any)."""
        if module == f"{self.p}.self_attn.kv_a_proj_with_mqa":
            return self.inputs[self.attn_key]
        mlp_in = module.endswith((".gate_proj", ".up_proj"))
        e = self._expert_of(module)
        pre = module.rsplit(".", 1)[0]
        if e is None:
            if mlp_in:
                return self.x_mlp
            if module not in self.inputs:  # the shared experts' down_proj (the MoE is not run at capture)
                self.inputs[module] = self._forward_down_input(pre, None)
            return self.inputs[module]
        all_tokens = self.stats["experts"][e]["policy"] == "all-tokens"
        if mlp_in:
            return self.x_mlp if all_tokens else self._expert_x(e)
        if module not in self.inputs:
            if self.routes[e][0].numel():  # what the forward feeds down_proj on the routed tokens
                self.inputs[module] = self._forward_down_input(pre, self.routes[e][0])
            else:  # no routed token: from the float gate/up weights
                xs = self.x_mlp if all_tokens else self._expert_x(e)
                g = xs @ self._f32_of(pre + ".gate_proj").T
                u = xs @ self._f32_of(pre + ".up_proj").T
                self.inputs[module] = F.silu(g) * u  # (n, I)
        return self.inputs[module]

    def _expert_x(self, e: int) -> torch.Tensor:
        """The MLP input rows routed to expert ``e`` ``(n_e, hidden)`` (cached for one expert at a time)."""
        if self._xe is None or self._xe[0] != e:
            rows = self.calib_rows.get(e)
            self._xe = (e, self.x_mlp[self.routes[e][0] if rows is None else rows])
        return self._xe[1]

    def _f32_of(self, module: str) -> torch.Tensor:
        """The unfolded source weight in float32."""
        t = self._f32.get(module)
        return t if t is not None else self._src_weight(module).to(device=self.dev, dtype=torch.float32)

    def _groups(self) -> list[tuple[int, int]]:
        E, G = self.cfg.n_routed_experts or 0, max(1, self.eng.expert_group)
        return [(e0, min(e0 + G, E)) for e0 in range(0, E, G)]

    def _expert_groups(self, run_group: Callable[[range], None]) -> None:
        """Run ``run_group`` (:meth:`_gptq_experts` or :meth:`_awq_experts`) on each routed expert group of a
        MoE layer here, or hand the groups to the engine's :attr:`CalibrationEngine.expert_dispatch`, which
        runs the same method elsewhere (:meth:`expert_stage`, :func:`run_expert_group`) and merges the
        results with :meth:`adopt_group`."""
        groups = self._groups() if self.moe else []
        if groups and self.eng.expert_dispatch is not None:
            self.eng.expert_dispatch(self, groups)
            return
        for e0, e1 in groups:
            self.report_group(e0, e1)
            run_group(range(e0, e1))

    def expert_stage(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What the routed expert groups of this MoE layer read from the driver's state, once the layer's
        input and routing are known and the non-expert linears are done: ``(meta, tensors)``.

        ``tensors`` (CPU, safetensors-ready): ``x_mlp`` the post-attention normed MLP input ``(T, hidden)``
        float32; ``tok.E`` the routed token rows of expert ``E`` (int64, ascending); ``rows.E`` the raised-top-k
        rows of a ``topk`` expert; ``scale.J`` (AWQ) the distinct MoE smoothing scales ``(hidden,)``.
        ``meta`` (plain data): ``layer``, ``method``, the expert ``policies``, the routed linears' ``specs``,
        sequence ``bounds``, the kernel settings, and which module's columns/input take which ``scale.J``.
        """
        eng = self.eng
        routed = {n for n in self.specs if self._expert_of(n) is not None}
        if any(n in routed for n in (*self.cur, *self.inputs)) or eng.keep_folded:
            raise RuntimeError("expert groups can only be shipped before any routed expert is processed")
        tensors: dict[str, torch.Tensor] = {"x_mlp": self.x_mlp.to("cpu", torch.float32).contiguous()}
        for e, (tok, _) in self.routes.items():
            tensors[f"tok.{e}"] = tok.cpu().contiguous()
        for e, rows in self.calib_rows.items():
            tensors[f"rows.{e}"] = rows.cpu().contiguous()
        scales: dict[int, int] = {}  # id(tensor) -> J
        refs: dict[str, dict[str, int]] = {"col": {}, "in": {}}
        for kind, table in (("col", self._col_scale), ("in", self.in_scale)):
            for n, s in table.items():
                if n in routed:
                    j = scales.setdefault(id(s), len(scales))
                    tensors.setdefault(f"scale.{j}", s.cpu().contiguous())
                    refs[kind][n] = j
        meta = {"layer": self.idx, "method": eng.method, "convention": eng.convention, "damp": eng.damp,
                "act_order": eng.act_order, "n_grid": eng.n_grid, "dtype": eng.model.dtype, "tokens": eng.num_tokens,
                "device": str(self.dev), "bounds": list(self.bounds),
                "policies": {e: v["policy"] for e, v in self.stats["experts"].items()},
                "specs": {n: self.specs[n] for n in self.specs if n in routed}, "scales": refs}
        return meta, tensors

    def adopt_group(self, path: Path, modules: list[tuple[str, QuantSpec, Convention, bool]], stats: dict,
                    replaced: dict[str, torch.Tensor]) -> None:
        """Merge one expert group run elsewhere (:func:`run_expert_group`): its results, spilled in ``path``
        (the spill layout of :class:`LayerResults`), its ``stats`` (``linears``, ``smoothing``, ``clip``) and
        the folded float tensors it ``replaced``."""
        self.quantized.adopt(path, modules)
        for k in ("linears", "smoothing", "clip"):
            self.stats[k].update(stats.get(k, {}))
        self.replaced.update(replaced)

    def _expert_linears(self, e: int) -> list[str]:
        pre = f"{self.p}.mlp.experts.{e}"
        return [n for n in (f"{pre}.gate_proj", f"{pre}.up_proj", f"{pre}.down_proj") if n in self.specs]

    # -- 2a. AWQ --------------------------------------------------------------------------------
    def awq(self) -> None:
        cfg, p, a = self.cfg, self.p, f"{self.p}.self_attn"
        q = f"{a}.q_proj" if cfg.q_lora_rank is None else f"{a}.q_a_proj"
        self._smooth(f"{p}.input_layernorm", "norm", [q, f"{a}.kv_a_proj_with_mqa"], self._inspect_attention)
        if cfg.q_lora_rank is not None:
            self._smooth(f"{a}.q_a_layernorm", "norm", [f"{a}.q_b_proj"], None)
        self._smooth(f"{a}.kv_a_layernorm", "norm", [f"{a}.kv_b_proj"], None)
        mlps = self._mlps()
        gate_up = [f"{m}.{k}" for m in mlps for k in ("gate_proj", "up_proj")]
        if self.moe:
            self._smooth_moe(gate_up)
        else:
            self._smooth(f"{p}.post_attention_layernorm", "norm", gate_up, self._inspect_mlp)
        for m in mlps:  # the dense MLP or the shared experts; routed experts below, a group at a time
            if self._expert_of(m + ".down_proj") is None:
                self._smooth(f"{m}.up_proj", "linear", [f"{m}.down_proj"], None)
        for n in self.linears:
            if self._expert_of(n) is None:
                self._awq_quantize(n)
        self._drop_dense_inputs()
        self._expert_groups(self._awq_experts)

    def _awq_experts(self, experts: range) -> None:
        """AWQ of a group of routed experts (their MoE scale is already folded lazily): each expert's up->down
        smoothing, clip search and RTN; the group's results are spilled as one file."""
        done: dict[str, QTensor] = {}
        for e in experts:
            pre = f"{self.p}.mlp.experts.{e}"
            if self.stats["experts"][e]["policy"] != "rtn":
                self._smooth(f"{pre}.up_proj", "linear", [f"{pre}.down_proj"], None)
            names = self._expert_linears(e)
            for n in names:
                qt = self._awq_quantize(n, store=False)
                if qt is not None:
                    done[n] = qt
                elif n in self.cur:  # folded, kept in float: written as replaced
                    self.replaced[n + ".weight"] = self.cur[n].cpu()
            self._drop(names)
        self.quantized.put(done)

    def _awq_quantize(self, n: str, store: bool = True) -> QTensor | None:
        """Clip-search (unless skipped) and RTN-quantize the folded weight of ``n``; record its stats."""
        spec = self.specs[n]
        w = self.w(n)
        if self.eng.keep_folded:
            self.folded[n + ".weight"] = w.cpu()
        if spec is None:
            return None
        x = self.x_of(n)
        wq = w
        if not any(f in n.rsplit(".", 1)[-1] for f in CLIP_SKIP) and self.calibration_of(n) != "rtn":
            mv = awq_search_clip(w, x, spec, self.eng.convention, n_grid=self.eng.n_grid)
            wq = apply_clip(w, mv)
            absmax = w.abs().reshape(mv.shape[0], mv.shape[1], -1).amax(-1, keepdim=True)
            self.stats["clip"][n] = float((mv / absmax.clamp_min(1e-30)).mean())
        qt = _to_cpu(quantize(wq, spec, self.eng.convention, name=n))
        xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
        s_in = self.in_scale.get(n)
        w0 = w if s_in is None else w / s_in[None, :]  # the unfolded weight, for the RTN baseline
        x0 = xs if s_in is None else xs * s_in[None, :]
        self.stats["linears"][n] = {
            "tokens": int(x.shape[0]),
            "rel_output_mse": _rel_mse(xs, w, dequantize(qt)),
            "rtn_rel_output_mse": _rel_mse(x0, w0, pseudo_quantize(w0, spec, self.eng.convention)),
            "calibration": self.calibration_of(n)}
        if store:
            self.quantized[n] = qt
            self.cur.pop(n, None)
            self._f32.pop(n, None)
        return qt

    def _smooth(self, prev: str, kind: str, modules: list[str], inspect, router: str | None = None) -> None:
        """Search one AWQ scale for ``modules`` (sharing the output of ``prev``) and fold it."""
        modules = [m for m in modules if m in self.specs]
        quant = [m for m in modules if self.specs[m] is not None]
        if not quant:
            return
        if inspect == self._inspect_attention:
            x = self.inputs[self.attn_key]
        elif inspect == self._inspect_mlp:
            x = self.x_mlp
        else:
            x = self.x_of(quant[0])
        if x.shape[0] == 0:
            return
        spec = self.specs[quant[0]]
        ws = [self.w(m) for m in quant]
        if inspect is None:
            def fwd(cand):
                return torch.cat([x @ c.T for c in cand], dim=1)
        else:
            def fwd(cand):
                return inspect(dict(zip(quant, cand)))
        s, ratio, errors = awq_search_scale(x, ws, fwd, spec, self.eng.convention, n_grid=self.eng.n_grid)
        del ws
        self._fold(prev, kind, modules, s, router)
        self.stats["smoothing"][prev] = {"best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors,
                                         "linears": len(modules)}

    def _fold(self, prev: str, kind: str, modules: list[str], s: torch.Tensor, router: str | None,
              lazy: bool = False) -> None:
        """Fold ``s``: prev op, every linear of the mapping (quantized or not; ``lazy``: when first used),
        router."""
        if kind == "norm":
            self.replaced[prev + ".weight"] = fold_norm(self._dense(prev + ".weight"), s).cpu()
        else:
            self.cur[prev] = fold_linear_rows(self.w(prev), s)
        for m in modules:
            if lazy:
                self._col_scale[m] = s
            else:
                self.cur[m] = scale_columns(self.w(m), s)
            self.in_scale[m] = s
        if router is not None:
            self.replaced[router] = scale_columns(self._dense(router), s).cpu()

    def _smooth_moe(self, gate_up: list[str]) -> None:
        """AWQ's ``post_attention_layernorm`` mapping of a MoE layer (every expert's and the shared expert's
        gate/up), streamed: ``w_mean`` accumulated over the experts one at a time, then the MoE output of the
        float weights and of each grid candidate accumulated expert by expert, :attr:`eng.awq_candidates`
        candidate outputs ``(T, hidden)`` at once (one more pass over the experts per chunk of candidates).
        Same numbers as :meth:`_smooth` with :meth:`_inspect_mlp` on the whole layer; only the experts in
        flight are held in float32. The columns are folded when each expert is processed."""
        eng, p, x = self.eng, self.p, self.x_mlp
        modules = [m for m in gate_up if m in self.specs]
        quant = [m for m in modules if self.specs[m] is not None]
        if not quant or x.shape[0] == 0:
            return
        spec, conv = self.specs[quant[0]], eng.convention
        qset = set(quant)
        x_mean = x.to(torch.float32).abs().mean(dim=0)  # (hidden,)
        total = torch.zeros(x.shape[1], dtype=torch.float32, device=self.dev)
        rows = 0
        for m in quant:
            t, r = awq_weight_sums(self._f32_of(m), spec)
            total += t
            rows += r
        w_mean = total / max(rows, 1)
        cands = list(awq_scale_candidates(x_mean, w_mean, eng.n_grid))
        mlps = [pre for pre in self._mlps()]

        def mlp_out(pre: str, ss: list[torch.Tensor | None], outs: list[torch.Tensor]) -> None:
            """Add MLP ``pre``'s output to ``outs[j]`` with gate/up as candidate ``ss[j]`` (None: float)."""
            e = self._expert_of(pre + ".down_proj")
            if e is not None:
                tok, wts = self.routes[e]
                if tok.numel() == 0:
                    return
                xs = x[tok]
            else:
                xs = x
            ws = {k: self._f32_of(f"{pre}.{k}") for k in ("gate_proj", "up_proj", "down_proj")}
            for s, out in zip(ss, outs):
                def cw(k):
                    w = ws[k]
                    if s is None or f"{pre}.{k}" not in qset:
                        return w
                    return pseudo_quantize(w * s[None, :], spec, conv) / s[None, :]
                y = (F.silu(xs @ cw("gate_proj").T) * (xs @ cw("up_proj").T)) @ ws["down_proj"].T
                if e is not None:
                    out.index_add_(0, tok, y * wts[:, None])
                else:
                    out += y

        ref = None
        errors: list[float] = []
        chunk = max(1, eng.awq_candidates)
        for c0 in range(0, len(cands), chunk):
            ss: list[torch.Tensor | None] = [s for _, s in cands[c0:c0 + chunk]]
            if ref is None:
                ss = [None] + ss
            outs = [torch.zeros_like(x) for _ in ss]
            for pre in mlps:
                mlp_out(pre, ss, outs)
            if ref is None:
                ref = outs.pop(0)
            errors += [float((o - ref).pow(2).mean()) for o in outs]
            del outs
        del ref
        it = iter(errors)
        s, ratio, errors = awq_search_scale_streamed(x_mean, w_mean, lambda _s: next(it), eng.n_grid)
        self._fold(f"{p}.post_attention_layernorm", "norm", modules, s, f"{p}.mlp.gate.weight", lazy=True)
        self.stats["smoothing"][f"{p}.post_attention_layernorm"] = {
            "best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors, "linears": len(modules)}

    def _inspect_attention(self, cand: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention block output ``(T_total, hidden)`` with ``cand`` weights replacing those modules."""
        cfg, eng = self.cfg, self.eng
        model = eng.model

        def get(name: str) -> torch.Tensor:
            mod = name[: -len(".weight")] if name.endswith(".weight") else name
            if mod in cand:
                return cand[mod].to("cpu", model.dtype)
            if mod in self.cur:
                return self.cur[mod].to("cpu", model.dtype)
            if name in self.replaced:
                return self.replaced[name].to(model.dtype)
            return eng._src.get(name).to(model.dtype)

        outs = []
        for x, pos in zip(self.attn_in, eng._positions):
            cos, sin = model.rope(pos)
            outs.append(mla_attention(cfg, x.to(model.dtype), pos, cos, sin, model.softmax_scale, get,
                                      f"{self.p}.self_attn").to(torch.float32))
        return torch.cat(outs)

    def _inspect_mlp(self, cand: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense MLP output ``(T, hidden)`` on the cached input with ``cand`` gate/up weights."""
        x = self.x_mlp
        pre = f"{self.p}.mlp"
        g = x @ cand.get(pre + ".gate_proj", self.w(pre + ".gate_proj")).T
        u = x @ cand.get(pre + ".up_proj", self.w(pre + ".up_proj")).T
        return (F.silu(g) * u) @ self.w(pre + ".down_proj").T

    # -- 2b. GPTQ -------------------------------------------------------------------------------
    def gptq(self) -> None:
        eng = self.eng
        non_expert = [n for n in self.linears if self._expert_of(n) is None]
        h_cache: tuple | None = None  # (input tensor, H): gate/up and q_a/kv_a share one Hessian
        kv_a = f"{self.p}.self_attn.kv_a_proj_with_mqa"

        def key(n: str) -> str:
            return self.attn_key if n == kv_a else n

        # the last quantized linear reading each streamed Hessian: the Hessian is dropped after it (a real
        # o_proj's is 1 GiB; only the Hessian of the linear in flight is held)
        last = {key(n): n for n in non_expert if self.specs[n] is not None}
        for k in [k for k in self.streamed if k not in last]:
            del self.streamed[k]  # kept in float: its Hessian is never used
        for n in non_expert:
            spec = self.specs[n]
            if spec is None:
                continue
            w = self.w(n)
            pol = self.calibration_of(n)
            st = self.streamed.get(key(n))
            if st is not None:  # accumulated at capture
                H, xs, tokens = st.H, st.sample, st.n
                if last[key(n)] == n:
                    del self.streamed[key(n)]
                del st
            else:
                x = self._raw_x(n)
                if h_cache is None or h_cache[0] is not x:
                    h_cache = (x, _hessian(x, self.dev))
                H, xs, tokens = h_cache[1], x[:: max(1, x.shape[0] // STAT_TOKENS)], int(x.shape[0])
            qt = _to_cpu(gptq_quantize(w, H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                       static_groups=eng.act_order, name=n))
            self.quantized[n] = qt
            rtn_rel = _rel_mse(xs, w, pseudo_quantize(w, spec, eng.convention))
            H = H.to(torch.float64)  # output_error's own copy; the float32 one goes unless shared
            rel = output_error(w, dequantize(qt), H)
            del H
            self.stats["linears"][n] = {"tokens": tokens, "rel_output_mse": rel, "rtn_rel_output_mse": rtn_rel,
                                        "calibration": pol}
            self._f32.pop(n, None)
            del w
            if n.endswith(".down_proj"):
                self.inputs.pop(n, None)  # done with this MLP's down input
                h_cache = None
        del h_cache
        self._drop_dense_inputs()
        self._expert_groups(self._gptq_experts)
        self.stats["gptq"] = {"damp": eng.damp, "act_order": eng.act_order}

    def _gptq_experts(self, experts: range) -> None:
        """GPTQ of a group of routed experts: their Hessians, then one batched GPTQ per (shape, spec) bucket
        (gate and up of an expert share a Hessian and are stacked along M), results spilled as one group."""
        eng = self.eng
        done: dict[str, QTensor] = {}
        pending: dict[str, tuple[int, float, str]] = {}  # module -> (tokens, RTN baseline, calibration)
        # (shape, spec) -> [(names, rows of each, w (M, N), H (N, N))]
        buckets: dict[tuple, list[tuple[list[str], list[int], torch.Tensor, torch.Tensor]]] = {}
        for e in experts:
            names = [n for n in self._expert_linears(e) if self.specs[n] is not None]
            pol = self.stats["experts"][e]["policy"]
            by_input: dict[str, list[str]] = {}
            for n in names:
                by_input.setdefault("down" if n.endswith(".down_proj") else "in", []).append(n)
            for kind, ns in by_input.items():
                x = self._raw_x(ns[0])
                ws = [self.w(n) for n in ns]
                if pol == "rtn":
                    for n, w in zip(ns, ws):
                        qt = _to_cpu(quantize(w, self.specs[n], eng.convention, name=n))
                        done[n] = qt
                        self._gptq_stats(n, w, x, qt, _rel_mse(x[:: max(1, x.shape[0] // STAT_TOKENS)], w,
                                                                dequantize(qt)), pol)
                    continue
                H = _hessian(x, self.dev)
                xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
                for n, w in zip(ns, ws):  # tokens and the RTN baseline while the input is at hand
                    pending[n] = (int(x.shape[0]), _rel_mse(xs, w, pseudo_quantize(w, self.specs[n], eng.convention)),
                                  pol)
                same = len({(tuple(w.shape), self.specs[n]) for n, w in zip(ns, ws)}) == 1
                parts = [(ns, ws)] if same else [([n], [w]) for n, w in zip(ns, ws)]
                for gn, gws in parts:
                    gw = torch.cat(gws) if len(gws) > 1 else gws[0]  # (sum M, N): rows are independent given H
                    buckets.setdefault((tuple(gw.shape), self.specs[gn[0]]), []).append(
                        (gn, [int(w.shape[0]) for w in gws], gw, H))
                del x, ws, H
            self._drop(self._expert_linears(e))
        for key in list(buckets):
            items = buckets.pop(key)
            W = torch.stack([w for _, _, w, _ in items])  # (B, M, N)
            Hs = torch.stack([h for _, _, _, h in items])  # (B, N, N)
            res = gptq_quantize_batch(W, Hs, key[1], eng.convention, damp=eng.damp, act_order=eng.act_order,
                                      static_groups=eng.act_order, names=[gn[0] for gn, _, _, _ in items])
            del W, Hs
            for (gn, rows, gw, h), qt in zip(items, res):
                r0 = 0
                for n, r in zip(gn, rows):
                    part = _rows(qt, r0, r0 + r) if len(gn) > 1 else _to_cpu(qt)
                    tokens, rtn_rel, pol = pending.pop(n)
                    self.stats["linears"][n] = {
                        "tokens": tokens, "rel_output_mse": output_error(gw[r0:r0 + r], dequantize(part), h),
                        "rtn_rel_output_mse": rtn_rel, "calibration": pol}
                    done[n] = part
                    r0 += r
            del items, res
        self.quantized.put({n: done[n] for e in experts for n in self._expert_linears(e) if n in done})

    def _gptq_stats(self, n: str, w: torch.Tensor, x: torch.Tensor, qt: QTensor, rel: float, pol: str) -> None:
        xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
        self.stats["linears"][n] = {
            "tokens": int(x.shape[0]), "rel_output_mse": rel,
            "rtn_rel_output_mse": _rel_mse(xs, w, pseudo_quantize(w, self.specs[n], self.eng.convention)),
            "calibration": pol}

    # -- 3. propagate and free ------------------------------------------------------------------
    def overrides(self) -> _Overrides:
        """Tensors the quantized model uses for this layer: each quantized module dequantized when fetched,
        replaced tensors, and folded linears kept in float."""
        for n, t in self.cur.items():  # folded, not quantized (policy None): float, written as replaced
            if n not in self.quantized:
                self.replaced[n + ".weight"] = t.cpu()
        return _Overrides(self.quantized, self.replaced)

    def release(self) -> None:
        self.cur.clear()
        self._f32.clear()
        self._col_scale.clear()
        self._xe = None
        self.inputs.clear()
        self.streamed.clear()
        self.attn_in.clear()
        self.in_scale.clear()
        self.x_mlp = None
        self.routes = {}
        self.calib_rows = {}


class _StageEngine:
    """The engine settings an expert group reads (:meth:`_Layer.expert_stage`'s ``meta``), in a process that
    runs only expert groups (a Ray worker): no calibration sequences, no forward."""

    def __init__(self, source: WeightSource, meta: dict):
        self._src = _LayerSource(source)
        self.cfg = ModelConfig.from_hf(source.config)
        self.model = type("_Dtype", (), {"dtype": meta["dtype"]})()
        self.method = meta["method"]
        self.convention = meta["convention"]
        self.damp = meta["damp"]
        self.act_order = meta["act_order"]
        self.n_grid = meta["n_grid"]
        self.num_tokens = meta["tokens"]
        self.device = torch.device(meta["device"])
        self.keep_folded = False
        self.spill_dir = None
        self.expert_dispatch = None

    def report_stage(self, layer_idx: int, stage: str) -> None:
        pass


@torch.no_grad()
def run_expert_group(source: WeightSource, meta: dict, tensors: Mapping[str, torch.Tensor], e0: int, e1: int
                     ) -> tuple[dict[str, QTensor], dict, dict[str, torch.Tensor]]:
    """Routed experts ``e0..e1-1`` of the MoE layer described by ``(meta, tensors)`` (:meth:`_Layer.expert_stage`),
    through the same :meth:`_Layer._gptq_experts` / :meth:`_Layer._awq_experts` a local run calls; the experts'
    weights are read from ``source`` (the same SRC).

    Returns:
        ``(quantized, stats, replaced)``: ``{module: QTensor}`` in the local run's order, the group's
        ``stats`` entries (``linears``, ``smoothing``, ``clip``), and folded float tensors kept unquantized.
    """
    eng = _StageEngine(source, meta)
    lay = _Layer.__new__(_Layer)
    lay.eng, lay.cfg, lay.idx, lay.dev = eng, eng.cfg, meta["layer"], eng.device
    lay.p = f"{v3.LAYER_PREFIX}{lay.idx}"
    lay.moe = True
    lay.quantized = LayerResults(None, f"layer{lay.idx}")
    lay.replaced, lay.folded = {}, {}
    lay.stats = {"layer": lay.idx, "method": eng.method, "tokens": eng.num_tokens, "linears": {},
                 "experts": {e: {"policy": pol} for e, pol in meta["policies"].items()}, "smoothing": {}, "clip": {}}
    lay.cur, lay._f32, lay.inputs, lay.streamed, lay.attn_in = {}, {}, {}, {}, []
    lay._xe = None
    lay.specs = dict(meta["specs"])
    lay.linears = list(lay.specs)
    lay.bounds = [tuple(b) for b in meta["bounds"]]
    dev = lay.dev
    lay.x_mlp = tensors["x_mlp"].to(dev)
    lay.routes = {e: (tensors[f"tok.{e}"].to(dev), None) for e in meta["policies"]}
    lay.calib_rows = {e: tensors[f"rows.{e}"].to(dev) for e in meta["policies"] if f"rows.{e}" in tensors}
    sc = {int(k.split(".", 1)[1]): t.to(dev) for k, t in tensors.items() if k.startswith("scale.")}
    lay._col_scale = {n: sc[j] for n, j in meta["scales"]["col"].items()}
    lay.in_scale = {n: sc[j] for n, j in meta["scales"]["in"].items()}
    (lay._gptq_experts if eng.method == "gptq" else lay._awq_experts)(range(e0, e1))
    stats = {k: lay.stats[k] for k in ("linears", "smoothing", "clip")}
    return {m: lay.quantized[m] for m in lay.quantized}, stats, lay.replaced


class _StreamedHessian:
    """A Linear's GPTQ Hessian accumulated from its input rows as the forward produces them, in the same
    4096-row chunks of the concatenated input that :func:`_hessian` uses (so the same ``H`` bit for bit), plus
    the statistic's token sample (every ``max(1, total // STAT_TOKENS)``-th row) and the row count; the input
    itself is never cached (a real o_proj input is T x 16384 float32)."""

    def __init__(self, k: int, total: int, device: torch.device):
        self.acc = HessianAccumulator(k, device=device)
        self.step = max(1, int(total) // STAT_TOKENS)
        self.n = 0
        self._buf: list[torch.Tensor] = []
        self._nbuf = 0
        self._sample: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        """Append rows ``x`` ``(n, N)`` float32 (in calibration order)."""
        self._sample.append(x[(-self.n) % self.step:: self.step].clone())
        self.n += int(x.shape[0])
        self._buf.append(x)
        self._nbuf += int(x.shape[0])
        while self._nbuf >= 4096:
            cat = torch.cat(self._buf) if len(self._buf) > 1 else self._buf[0]
            self.acc.add(cat[:4096])
            rest = cat[4096:]
            self._buf, self._nbuf = ([rest] if rest.shape[0] else []), int(rest.shape[0])

    def finish(self) -> None:
        if self._nbuf:
            self.acc.add(torch.cat(self._buf) if len(self._buf) > 1 else self._buf[0])
        self._buf, self._nbuf = [], 0
        self.sample = torch.cat(self._sample) if len(self._sample) > 1 else self._sample[0]
        self._sample = []
        self.H = self.acc.H


def token_chunks(positions: Sequence[torch.Tensor], tokens: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` ranges of sequence indices, each holding at most ``tokens`` tokens (or one
    sequence longer than that), covering every sequence in order."""
    out: list[tuple[int, int]] = []
    c0, n = 0, 0
    for i, p in enumerate(positions):
        t = int(p.numel())
        if i > c0 and n + t > tokens:
            out.append((c0, i))
            c0, n = i, 0
        n += t
    if c0 < len(positions):
        out.append((c0, len(positions)))
    return out


def _hessian(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """GPTQ Hessian ``(N, N)`` float32 of the input rows ``x`` ``(n, N)``, accumulated 4096 rows at a time."""
    acc = HessianAccumulator(x.shape[1], device=device)
    for c0 in range(0, x.shape[0], 4096):
        acc.add(x[c0:c0 + 4096])
    return acc.H


def _rows(qt: QTensor, r0: int, r1: int) -> QTensor:
    """Rows ``r0:r1`` of a QTensor (a linear's part of a gate/up stack), as contiguous CPU copies."""
    return QTensor(qt.q[r0:r1].cpu().clone(), qt.scale[r0:r1].cpu().clone(),
                   None if qt.zero is None else qt.zero[r0:r1].cpu().clone(), qt.spec, qt.convention)


def _to_cpu(qt: QTensor) -> QTensor:
    return QTensor(qt.q.cpu(), qt.scale.cpu(), None if qt.zero is None else qt.zero.cpu(), qt.spec, qt.convention)


def _rel_mse(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||x Wᵀ - x Ŵᵀ||² / ||x Wᵀ||²`` in float64 (0 for no tokens or a zero output)."""
    if x.shape[0] == 0:
        return 0.0
    x64 = x.to(torch.float64)
    ref = x64 @ w.to(x64.device, torch.float64).T
    num = float((ref - x64 @ w_hat.to(x64.device, torch.float64).T).pow(2).sum())
    den = float(ref.pow(2).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


#: Default calibration memory budget when ``--max-memory`` is not given: this share of physical RAM, at most
#: :data:`DEFAULT_BUDGET_CAP` bytes (the expert group size and AWQ candidate chunk follow from it).
DEFAULT_BUDGET_SHARE = 0.6
DEFAULT_BUDGET_CAP = 8 * 2**30


def default_budget() -> int:
    """Bytes the calibration engine plans for without ``--max-memory``: ``min(0.6 x RAM, 8 GiB)``."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_BUDGET_CAP
    return int(min(DEFAULT_BUDGET_SHARE * ram, DEFAULT_BUDGET_CAP))


def plan_groups(cfg: ModelConfig, method: str, n_tokens: int, budget: int, expert_group: int | None = None
                ) -> tuple[int, int]:
    """``(expert_group, awq_candidates)``: the most routed experts in flight (at most
    :data:`PROGRESS_EXPERTS`) and AWQ MoE-smoothing candidate outputs held at once (at most ``n_grid`` = 20)
    whose :func:`estimate_peak_bytes` fits ``budget`` bytes; ``(1, 1)`` when nothing fits (the caller's
    ``--max-memory`` check then refuses the run). ``expert_group`` fixes the first."""
    E = max(1, cfg.n_routed_experts or 1)
    groups = [expert_group] if expert_group else list(range(min(E, PROGRESS_EXPERTS), 0, -1))
    for g in groups:
        for c in range(20, 0, -1) if method == "awq" else [1]:
            if estimate_peak_bytes(cfg, method, n_tokens, expert_group=g, awq_candidates=c) <= budget:
                return g, c
    return groups[-1], 1


def estimate_peak_bytes(cfg: ModelConfig, method: str, n_tokens: int, *, expert_group: int | None = None,
                        awq_candidates: int | None = None, act_bytes: int = 4, weight_bytes: int = 2,
                        spilled: bool = True, batch_tokens: int | None = None, seq_len: int | None = None) -> int:
    """Estimated peak memory (bytes, on top of the interpreter) of :meth:`CalibrationEngine.run_layer` over
    every decoder layer kind of ``cfg``, for ``n_tokens`` (T) calibration tokens in total: the largest of its
    three stages, each the sum of what the engine holds then (``act_bytes`` per activation value,
    ``weight_bytes`` per source weight, float32 working copies):

    * capture: the residual stream, the MLP input (T x hidden) as it accumulates and one
      :data:`CHUNK_TOKENS` chunk's post-attention residual and MLP input; the attention linears' inputs
      (GPTQ: only their Hessians, accumulated as the forward runs, and a 4096-row buffer each; AWQ: the cached
      inputs, the attention input twice), a dense MLP's down input (GPTQ: its Hessian); the layer's
      non-expert weights.
    * kernels: the residual stream, the MLP input, the non-expert weights and results (int8 levels), plus the
      largest working set: a non-expert linear (GPTQ: the core's three ``(N, N)`` and three ``(M, N)``
      float32, or the statistic after it, ``(N, N)`` and two ``(M, N)`` float64 and two ``(M, N)`` float32,
      plus the streamed Hessians still waiting for their linears and, for a down_proj, its cached input; AWQ
      three ``(M, N)``), or the experts in flight (GPTQ: ``expert_group`` experts' routed rows, down inputs,
      float32 weights, two Hessians each and the batched core's copies, and one statistic; AWQ: one expert's,
      with the folded copies and the clip search's; both: the group's int8 results until spilled), or AWQ's
      MoE smoothing (``awq_candidates + 1`` output accumulators ``(T, hidden)`` and one expert's weights and
      candidates).
    * propagate: the residual stream (replaced a chunk at a time), one chunk's post-attention residual, MLP
      input, MLP output and new residual (4 x chunk x hidden), the largest dequantized weight, the
      non-expert weights and results.

    Routed experts' results are spilled to disk (``spilled``); otherwise their int8 levels (one byte per
    weight, all experts) are added. ``expert_group`` / ``awq_candidates`` None: as :func:`plan_groups` picks
    them for :func:`default_budget` (what a run without ``--max-memory`` uses). ``method="autoround"``:
    :func:`~.calib_signround.estimate_signround_bytes` (``batch_tokens`` / ``seq_len``: its iteration batch).

    Returns:
        bytes (int).
    """
    if expert_group is None or awq_candidates is None:
        g, c = plan_groups(cfg, method, n_tokens, default_budget(), expert_group)
        expert_group = g
        awq_candidates = c if awq_candidates is None else awq_candidates
    if method == "autoround":  # its own working set (convert/calib_signround.py)
        from .calib_signround import estimate_signround_bytes

        return estimate_signround_bytes(cfg, n_tokens, expert_group=expert_group, batch_tokens=batch_tokens,
                                        seq_len=seq_len, act_bytes=act_bytes, weight_bytes=weight_bytes,
                                        chunk_tokens=CHUNK_TOKENS)
    T, H = int(n_tokens), cfg.hidden_size
    c = min(T, CHUNK_TOKENS)  # tokens of one capture / propagate chunk
    heads = cfg.num_attention_heads
    q_in = cfg.q_lora_rank or 0
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn_shapes = ([(cfg.q_lora_rank, H), (heads * qk, cfg.q_lora_rank)] if cfg.q_lora_rank
                   else [(heads * qk, H)])
    attn_shapes += [(cfg.kv_lora_rank + cfg.qk_rope_head_dim, H),
                    (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
                    (H, heads * cfg.v_head_dim)]
    attn_params = sum(m * n for m, n in attn_shapes)
    o_in = heads * cfg.v_head_dim
    a = act_bytes
    kv = cfg.kv_lora_rank
    # GPTQ streams the attention Hessians at capture: one (N, N) and a 4096-row buffer per distinct input
    attn_ks = ([H, q_in] if cfg.q_lora_rank else [H]) + [kv, o_in]
    if method == "gptq":
        attn_acts = 4 * sum(4096 * k_ + k_ * k_ for k_ in attn_ks)
    else:  # cached inputs (the attention input also per sequence, for the attention search)
        attn_acts = a * T * (3 * H + q_in + kv + o_in)
    resid = a * T * H

    def gptq_linear(m: int, n: int, h_kept: bool) -> int:
        """One GPTQ linear: the core (its Hessian, the damped copy / Cholesky factors, two of them at once;
        W, its working copy and the float levels) or the statistic after it (W and its dequantized copy in
        float32, H, W and one product in float64, plus the float32 H when it is kept for another linear)."""
        return max(4 * (3 * n * n + 3 * m * n), 8 * n * n + 24 * m * n + (4 * n * n if h_kept else 0))

    def attn_work() -> int:
        """GPTQ: the largest attention linear in flight plus the streamed Hessians still waiting for theirs.
        AWQ: three (M, N) float32 of the largest."""
        if method != "gptq":
            return max(4 * 3 * m * n for m, n in attn_shapes)
        # (shape, its input's Hessian kept for a later linear, Hessians (N) still pending after it)
        order = []
        if cfg.q_lora_rank:
            order += [((q_in, H), True, [q_in, kv, o_in]), ((heads * qk, q_in), False, [kv, o_in])]
        else:
            order += [((heads * qk, H), True, [kv, o_in])]
        order += [((kv + cfg.qk_rope_head_dim, H), False, [kv, o_in]),
                  ((heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), kv), False, [o_in]), ((H, o_in), False, [])]
        return max(gptq_linear(m, n, kept) + 4 * sum(k_ * k_ for k_ in pend) for (m, n), kept, pend in order)

    def mlp_work(inter: int, down_in: int, pending: int) -> int:
        """A dense MLP's (or the shared experts') gate, up and down: GPTQ as :func:`gptq_linear` (gate/up
        share one Hessian, with ``pending`` bytes (down's streamed Hessian) waiting; down with its cached input
        ``down_in`` bytes); AWQ three (M, N) float32."""
        if method != "gptq":
            return max(4 * 3 * inter * H, 4 * 3 * H * inter)
        return max(gptq_linear(inter, H, True) + pending, gptq_linear(H, inter, False) + down_in)

    peaks = []
    kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)}
    for moe in kinds:
        if moe:
            E, I, k = cfg.n_routed_experts or 0, cfg.moe_intermediate_size, cfg.num_experts_per_tok or 0
            Is = I * (cfg.n_shared_experts or 0)
            G = max(1, min(expert_group, E))
            dense_params = attn_params + 3 * Is * H + E * H
            n_e = T * k / max(E, 1)  # routed rows per expert, on average
            mlp_cap = a * T * Is  # the shared experts' down input, computed when their down_proj is due
            capture_mlp = 0
            if method == "gptq":
                per_expert = 4 * (n_e * (H + I) + 3 * I * H + 2 * 3 * I * H + 4 * H * H + 4 * I * I)
                stat = 8 * H * H + 24 * I * H  # one expert linear's statistic (float64 H and products)
                smooth = 0
            else:
                per_expert = 4 * (n_e * (H + I) + 2 * 3 * I * H + 2 * I * H) + _clip_bytes(min(T, 512), H, I)
                stat = 0
                smooth = 4 * ((max(1, awq_candidates) + 1) * T * H + 5 * I * H + 2 * T * I)
            # GPTQ holds the whole group's Hessians and weights for the batched core; AWQ takes the group's
            # experts one after the other. Both hold the group's results (int8 levels) until it is spilled.
            in_flight = (G if method == "gptq" else 1) * per_expert + G * 3 * I * H + stat
            if method == "gptq":  # the shared experts' down input exists only while their down_proj is due
                work = max(attn_work(), mlp_work(Is, mlp_cap, 0) if Is else 0, in_flight)
            else:  # AWQ holds it from the up->down search on
                work = max(attn_work(), mlp_work(Is, 0, 0) if Is else 0, in_flight, smooth) + mlp_cap
            results = attn_params + 3 * Is * H + (0 if spilled else E * 3 * I * H)
            mlp_tmp = 4 * 3 * I * H  # one expert dequantized at a time in the propagate forward
        else:
            I = cfg.intermediate_size
            dense_params = attn_params + 3 * I * H
            # the dense MLP's down input (GPTQ: its streamed Hessian and buffer)
            mlp_cap = 4 * (4096 * I + I * I) if method == "gptq" else a * T * I
            capture_mlp = mlp_cap + a * c * I  # and the chunk's down inputs as the MLP runs
            if method == "gptq":  # down_proj's streamed Hessian waits while attention and gate/up run
                work = max(attn_work() + mlp_cap, mlp_work(I, 0, mlp_cap))
            else:
                work = max(attn_work(), mlp_work(I, 0, 0), 2 * 4 * 2 * I * H + 4 * 2 * T * I) + mlp_cap
            results = attn_params + 3 * I * H
            mlp_tmp = 4 * 3 * I * H
        wts = weight_bytes * dense_params
        # the residual stream, the MLP inputs accumulating, and one chunk's post-attention residual and MLP input
        capture = resid + attn_acts + a * T * H + 2 * a * c * H + capture_mlp + wts
        kernels = resid + a * T * H + wts + results + work
        # the residual stream replaced chunk by chunk: one chunk's h', MLP input, MLP output and new stream,
        # and the largest dequantized weight
        propagate = resid + 4 * a * c * H + wts + results + max(4 * max(m * n for m, n in attn_shapes), mlp_tmp)
        peaks.append(max(capture, kernels, propagate))
    return int(max(peaks)) if peaks else 0


def _clip_bytes(n_tok: int, H: int, I: int) -> int:
    """The AWQ clip search's float32 working set for the largest expert linear (see ``awq_search_clip``):
    per-group partial outputs of a batch of output channels, twice."""
    from ..quant.awq import OC_BATCH

    return 4 * 2 * n_tok * max(H, I) * min(OC_BATCH, max(H, I)) // 128
