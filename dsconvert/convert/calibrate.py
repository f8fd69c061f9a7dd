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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import UsageError
from ..model import ReferenceModel
from ..model.config import ModelConfig
from ..model.source import WeightSource
from ..quant.rtn import Convention, QTensor
from .calib_awq import AWQ_MAPPINGS, AwqStage
from .calib_base import (
    MIN_EXPERT_TOKENS,
    PROGRESS_EXPERTS,
    CalibrationEngineBase,
    LayerResult,
    LayerSource,
    Overrides,
    Policy,
    default_budget,
    token_chunks,
)
from .calib_capture import CalibStage, LayerCapture
from .calib_gptq import GptqStage
from .calib_signround import SignRoundOptions, SignRoundStage, estimate_signround_bytes

__all__ = ["CalibrationEngine", "LayerResult", "Policy", "AWQ_MAPPINGS", "EXPERT_POLICIES", "METHODS"]

METHODS = ("awq", "gptq", "autoround")
#: The stage of each method (:class:`~.calib_capture.CalibStage`): one per layer, captured first when it asks.
STAGES: dict[str, type[CalibStage]] = {"awq": AwqStage, "gptq": GptqStage, "autoround": SignRoundStage}
EXPERT_POLICIES = ("all-tokens", "rtn", "topk")

#: Calibration tokens (at most, whole sequences; at least one sequence) the capture and propagate forwards
#: run at once: their per-sequence intermediates (post-attention residual, MLP input and output) exist for one
#: chunk, not for all T tokens. Each propagate chunk reads (dequantizes) every expert of the layer once.
CHUNK_TOKENS = 16384



class CalibrationEngine(CalibrationEngineBase):
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

    model_class = ReferenceModel

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
        super().__init__(source, policy, method, convention, calib_ids, dtype=dtype, damp=damp,
                         act_order=act_order, n_grid=n_grid, min_expert_tokens=min_expert_tokens,
                         expert_policy=expert_policy, progress=progress, device=device, keep_folded=keep_folded,
                         expert_group=expert_group, max_memory=max_memory, spill_dir=spill_dir)
        #: ``dispatch(stage, groups)``: runs a MoE layer's routed expert groups ``[(e0, e1), ...]`` elsewhere
        #: and merges them into the layer (:mod:`.calib_ray`); None: here, one group after the other.
        self.expert_dispatch: Callable[[object, list[tuple[int, int]]], None] | None = None
        #: ``method="autoround"``: a :class:`~.calib_signround.SignRoundOptions` (None: its defaults), and the
        #: float model's residual stream after the last calibrated layer (its targets' input; None before layer 1).
        self.signround = None
        self.reference_hidden: list[torch.Tensor] | None = None
        self._torn: int | None = None  # a layer whose propagate forward failed part way (see run_layer)

    def restore(self, hidden: Sequence[torch.Tensor], next_layer: int) -> None:
        """:meth:`CalibrationEngineBase.restore`; also clears an interrupted propagate forward."""
        super().restore(hidden, next_layer)
        self._torn = None

    def _plan_groups(self) -> None:
        """:func:`plan_groups` for :attr:`budget` (a group size given to the constructor is kept)."""
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
        bs = (self.signround or SignRoundOptions()).batch_size
        lens = sorted((int(p.numel()) for p in self.positions), reverse=True)
        return {"batch_tokens": sum(lens[:bs]), "seq_len": lens[0]}


    @torch.no_grad()
    def run_layer(self, layer_idx: int) -> LayerResult:
        """Calibrate and quantize decoder layer ``layer_idx`` (must be called for 0, 1, 2, … in order).

        Returns:
            :class:`LayerResult`. ``stats`` holds ``layer``, ``method``, ``seconds``, ``tokens`` (calibration
            tokens), ``linears`` (``{module: {"tokens", "rel_output_mse", "calibration"}}``: tokens the
            linear was calibrated on, the relative output MSE ``||XWᵀ - XŴᵀ||² / ||XWᵀ||²`` of the
            quantized weight on those tokens (a sample of up to 512 of them, except GPTQ's routed experts:
            all, through their Hessian; AWQ: against the folded float weight), and
            ``"routed"``/``"all-tokens"``/``"rtn"``/``"topk"``/``"dense"``), ``experts`` (MoE layers:
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
        self._check_next(layer_idx, "layer")
        t0 = time.perf_counter()
        self.source.reset()
        cap = LayerCapture(self, layer_idx)
        stage: CalibStage = STAGES[self.method](cap)
        try:
            stage_s: dict[str, float] = {}
            t1 = t2 = time.perf_counter()
            if stage.needs_capture:  # autoround runs its own forward (convert/calib_signround.py)
                self.report_stage(layer_idx, "capture")
                cap.capture(CHUNK_TOKENS)
                self.report_stage(layer_idx, "search")
                t2 = time.perf_counter()
                stage_s["capture"] = t2 - t1
            stage.run()
            t3 = time.perf_counter()
            stage_s["quantize"] = t3 - t2
            self.report_stage(layer_idx, "propagate")
            self.source.overrides = Overrides(cap.quantized, cap.replaced)
            stage.release()  # the calibration caches go before the propagate forward needs its own
            cap.release()
            gc.collect()
            # a chunk of sequences at a time, each output replacing its input (the old and new residual
            # streams are not both held); per-sequence arithmetic, so the chunking changes no number
            self._torn = layer_idx  # until every chunk is through, the stream is part layer i's input, part output
            for c0, c1 in token_chunks(self.positions, CHUNK_TOKENS):
                self._hidden[c0:c1] = self.model.layer_forward_seqwise(layer_idx, self._hidden[c0:c1],
                                                                       self.positions[c0:c1])
            self._torn = None
            stage_s["propagate"] = time.perf_counter() - t3
            cap.stats["stage_seconds"] = {k: round(v, 3) for k, v in stage_s.items()}
            result = LayerResult(layer_idx, cap.quantized, cap.replaced, cap.stats,
                                 cap.folded if self.keep_folded else {})
        except BaseException:
            cap.quantized.close()  # no spill file outlives a failed or interrupted layer
            raise
        finally:
            self.source.reset()
            stage.release()
            cap.release()
            del cap, stage
            gc.collect()
        result.stats["seconds"] = time.perf_counter() - t0
        self.next_layer += 1
        return result


class _StageEngine:
    """The engine settings an expert group reads (:meth:`~.calib_capture.CalibStage.expert_stage`'s ``meta``),
    in a process that runs only expert groups (a Ray worker): no calibration sequences, no forward."""

    def __init__(self, source: WeightSource, meta: dict):
        self.source = LayerSource(source)
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
    """Routed experts ``e0..e1-1`` of the MoE layer described by ``(meta, tensors)``
    (:meth:`~.calib_capture.CalibStage.expert_stage`), through the same
    :meth:`~.calib_gptq.GptqStage.run_experts` / :meth:`~.calib_awq.AwqStage.run_experts` a local run calls; the
    experts' weights are read from ``source`` (the same SRC).

    Returns:
        ``(quantized, stats, replaced)``: ``{module: QTensor}`` in the local run's order, the group's
        ``stats`` entries (``linears``, ``smoothing``, ``clip``), and folded float tensors kept unquantized.
    """
    eng = _StageEngine(source, meta)
    cap = LayerCapture.from_stage(eng, meta, tensors)
    stage = GptqStage(cap) if eng.method == "gptq" else AwqStage.from_stage(cap, meta, tensors)
    stage.run_experts(range(e0, e1))
    stats = {k: cap.stats[k] for k in ("linears", "smoothing", "clip")}
    return {m: cap.quantized[m] for m in cap.quantized}, stats, cap.replaced


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
