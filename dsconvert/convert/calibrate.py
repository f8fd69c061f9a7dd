"""Layer-streamed calibration for INT quantization: AWQ (scale search, folds, clip search, RTN) or GPTQ,
one decoder layer at a time, the quantized layers' outputs feeding the next layer.

The quantize pipeline drives it and writes the results; this module writes no files::

    eng = CalibrationEngine(src, policy, "awq", AUTOAWQ, calib_ids)
    for i in range(eng.num_layers):
        res = eng.run_layer(i)        # LayerResult: quantized QTensors, replaced float tensors, stats
        write(res.quantized, res.replaced)

Per layer ``i`` (docs/int-formats.md §5-§7):

1. **Capture.** Run the float layer ``i`` (``ReferenceModel.layer_forward``) on every calibration sequence,
   its input being the *quantized* layers ``0..i-1``'s output, with an ``on_linear`` hook caching the
   input of each Linear (attention, dense MLP, shared experts, every expert's ``down_proj`` with its
   routed tokens) and the post-attention normed input of the MLP. Routing is recomputed from that input
   with :func:`dsconvert.model.moe.route`, so expert inputs are index views, not copies.
2. **AWQ:** for each mapping of :data:`AWQ_MAPPINGS` (prev op → linears sharing its output) search the
   smoothing scale ``s`` (:func:`dsconvert.quant.awq.awq_search_scale`, inspecting the whole attention
   block / MoE / MLP where AutoAWQ does), fold it (norm ``/= s``, linears' columns ``*= s``, the router's
   columns ``*= s`` so routing does not drift, ``up_proj`` rows ``/= s`` for up→down), then clip-search
   each linear (skipped for ``q_*`` names as in AutoAWQ) and RTN-quantize the clipped folded weight.
   **GPTQ:** accumulate each linear's Hessian from its cached inputs and run
   :func:`dsconvert.quant.gptq.gptq_quantize` (linears sharing an input share one Hessian).
3. **Propagate.** Run layer ``i`` again with the dequantized weights and the replaced tensors; its output
   is layer ``i+1``'s input. All per-layer caches are dropped before ``run_layer`` returns
   (docs/known-failures.md item 27).

**Experts with few tokens** (fewer than ``min_expert_tokens`` routed tokens, docs/known-failures.md item 29):
``expert_policy="all-tokens"`` (default) calibrates that expert on every token of the layer
(llm-compressor's ``moe_calibrate_all_experts``); ``"rtn"`` quantizes it with plain RTN (for AWQ: the
shared gate/up scale is still folded in, no own up→down scale, no clip search); ``"topk"`` calibrates it on
the tokens that would route to it with top-k raised to ``TOPK_FACTOR * k`` over all groups (GPTQModel's
routing override; still all tokens if that leaves it under the minimum). The measured comparison is in
docs/known-failures.md item 29. The choice is reported per
expert in ``stats["experts"]``. No expert is ever zeroed or skipped.

Memory (per layer): the layer's weights as the source returns them (cached once, cast to float32 per
use), float32 working copies of the linears AWQ folds, the cached activations (for a MoE layer the
MLP input plus every routed expert's ``down_proj`` input, about ``top_k`` times the tokens at the expert
width), and at most one Hessian group (``(K, K)`` float32) at a time. The MTP layer is not calibrated.

Same code on CPU and CUDA for the kernels (``device``); the reference forward runs on the CPU.

Sources: AutoAWQ ``awq/quantize/quantizer.py`` (``AwqQuantizer._apply_quant``, ``_search_best_scale``,
``_search_best_clip``) and ``awq/models/deepseek_v3.py`` (mappings); AutoGPTQ
``auto_gptq/modeling/_base.py::quantize`` (layer-sequential loop); llm-compressor
``modifiers/awq`` (router in the balance layers) and ``moe_calibrate_all_experts``.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..model import ReferenceModel
from ..model.config import ModelConfig
from ..model.layers import rms_norm
from ..model.mla import mla_attention
from ..model.moe import route
from ..model.source import WeightSource
from ..quant.awq import (
    apply_clip,
    awq_search_clip,
    awq_search_scale,
    fold_linear_rows,
    fold_norm,
    pseudo_quantize,
    scale_columns,
)
from ..quant.gptq import HessianAccumulator, gptq_quantize, output_error
from ..quant.rtn import Convention, QTensor, QuantSpec, dequantize, quantize

__all__ = ["CalibrationEngine", "LayerResult", "Policy", "AWQ_MAPPINGS", "EXPERT_POLICIES", "METHODS"]

#: ``policy(module_name, (out_features, in_features)) -> QuantSpec | None`` (None = keep in float).
#: ``module_name`` is the HF weight name without ``.weight``, e.g. ``model.layers.3.mlp.experts.7.down_proj``.
Policy = Callable[[str, tuple[int, int]], "QuantSpec | None"]

METHODS = ("awq", "gptq")
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
    quantized: dict[str, QTensor]
    replaced: dict[str, torch.Tensor]
    stats: dict
    folded: dict[str, torch.Tensor] = field(default_factory=dict)


class _LayerSource:
    """A WeightSource over ``inner`` that caches the non-expert tensors of one layer (dropped by :meth:`reset`)
    and serves ``overrides`` (dequantized QTensors, folded tensors) instead of the inner tensors. Routed
    experts' weights are not cached: a MoE layer's experts are read when used, one at a time."""

    def __init__(self, inner: WeightSource):
        self.inner = inner
        self.config = inner.config
        self.overrides: dict[str, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.overrides = {}
        self._cache = {}

    def has(self, name: str) -> bool:
        return name in self.overrides or self.inner.has(name)

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


class CalibrationEngine:
    """Calibrated INT quantization (AWQ or GPTQ), one decoder layer per :meth:`run_layer` call.

    Args:
        source: the float (or FP8, dequantized on the fly) checkpoint, e.g.
            :class:`dsconvert.convert.weights.CheckpointWeightSource`.
        policy: ``policy(module_name, (N, K)) -> QuantSpec | None`` for every decoder Linear (the router
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
    ):
        if method not in METHODS:
            raise UsageError(f"unknown calibration method {method!r}", hint="use 'awq' or 'gptq'")
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
        self._positions = [torch.arange(s.numel()) for s in seqs]
        with torch.no_grad():
            self._hidden: list[torch.Tensor] = [self.model.embed(s) for s in seqs]  # (T_s, hidden) each
        self._src.reset()
        self.next_layer = 0

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
            UsageError: out-of-order call, or a layer index outside ``0..num_hidden_layers-1``.
        """
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
            self.report_stage(layer_idx, "capture")
            lay.capture()
            self.report_stage(layer_idx, "search")
            if self.method == "awq":
                lay.awq()
            else:
                lay.gptq()
            self.report_stage(layer_idx, "propagate")
            self._src.overrides = lay.overrides()
            self._hidden = [self.model.layer_forward(layer_idx, h, p)
                            for h, p in zip(self._hidden, self._positions)]
            result = LayerResult(layer_idx, lay.quantized, lay.replaced, lay.stats,
                                 lay.folded if self.keep_folded else {})
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
        self.p = f"model.layers.{idx}"
        self.moe = self.cfg.is_moe_layer(idx)
        self.dev = eng.device
        self.quantized: dict[str, QTensor] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        self.folded: dict[str, torch.Tensor] = {}
        self.stats: dict = {"layer": idx, "method": eng.method, "tokens": eng.num_tokens, "linears": {},
                            "experts": {}, "smoothing": {}, "clip": {}}
        self.cur: dict[str, torch.Tensor] = {}  # module -> float32 working weight (folded for AWQ)
        self._f32: dict[str, torch.Tensor] = {}  # module -> float32 copy of the source weight
        self._xe: tuple[int, torch.Tensor] | None = None  # (expert, its routed input): one at a time
        self.inputs: dict[str, torch.Tensor] = {}  # key -> (n, K) float32 cached input
        self.attn_in: list[torch.Tensor] = []  # per-sequence normed attention input
        self.in_scale: dict[str, torch.Tensor] = {}  # module -> s its cached input must be divided by
        self.linears = self._linear_names()
        self.specs = {n: eng.policy(n, tuple(self._src_weight(n).shape)) for n in self.linears}

    # -- names and weights ------------------------------------------------------------------------
    def _linear_names(self) -> list[str]:
        cfg, p = self.cfg, self.p
        a = f"{p}.self_attn"
        names = [f"{a}.q_proj"] if cfg.q_lora_rank is None else [f"{a}.q_a_proj", f"{a}.q_b_proj"]
        names += [f"{a}.kv_a_proj_with_mqa", f"{a}.kv_b_proj", f"{a}.o_proj"]
        for m in self._mlps():
            names += [f"{m}.gate_proj", f"{m}.up_proj", f"{m}.down_proj"]
        return [n for n in names if self.eng._src.has(n + ".weight")]

    def _mlps(self) -> list[str]:
        """MLP prefixes: the experts then the shared experts (MoE), or the dense MLP."""
        if not self.moe:
            return [f"{self.p}.mlp"]
        out = [f"{self.p}.mlp.experts.{e}" for e in range(self.cfg.n_routed_experts)]
        if self.cfg.n_shared_experts:
            out.append(f"{self.p}.mlp.shared_experts")
        return out

    def _src_weight(self, module: str) -> torch.Tensor:
        return self.eng._src.get(module + ".weight")

    def w(self, module: str) -> torch.Tensor:
        """The float32 working weight of ``module`` on the kernel device (folded so far, for AWQ)."""
        t = self.cur.get(module)
        if t is None:
            t = self._f32.get(module)
            if t is None:
                t = self._f32[module] = self._src_weight(module).to(device=self.dev, dtype=torch.float32)
        return t

    def _dense(self, name: str) -> torch.Tensor:
        return self.eng._src.get(name).to(device=self.dev, dtype=torch.float32)

    # -- 1. capture -----------------------------------------------------------------------------
    def capture(self) -> None:
        eng = self.eng
        store: dict[str, list[torch.Tensor]] = {}
        skip = (".kv_a_proj_with_mqa", ".up_proj", ".gate_proj")
        attn_key = f"{self.p}.self_attn.{'q_proj' if self.cfg.q_lora_rank is None else 'q_a_proj'}"

        def hook(name: str, x: torch.Tensor) -> None:
            if name == attn_key:
                self.attn_in.append(x.detach().to(torch.float32))
                return
            if name.endswith(skip) and not (not self.moe and name == f"{self.p}.mlp.gate_proj"):
                return
            store.setdefault(name, []).append(x.detach().to(device=self.dev, dtype=torch.float32))

        for h, pos in zip(eng._hidden, eng._positions):
            eng.model.layer_forward(self.idx, h, pos, on_linear=hook)
        self.inputs = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in store.items()}
        del store
        self.inputs[attn_key] = torch.cat(self.attn_in).to(self.dev)
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
        ws, idx, t0 = [], [], 0
        for pos in self.eng._positions:
            t1 = t0 + pos.numel()
            w_s, i_s = route(cfg, F.linear(self.x_mlp[t0:t1].cpu(), gate_w), bias)  # (T_s, k) each
            ws.append(w_s)
            idx.append(i_s)
            t0 = t1
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

    def report_experts(self, module: str) -> None:
        """Name the stage when ``module`` opens a new block of :data:`PROGRESS_EXPERTS` routed experts."""
        e = self._expert_of(module)
        if e is None or e % PROGRESS_EXPERTS or not module.endswith(".gate_proj"):
            return
        last = min(e + PROGRESS_EXPERTS, self.cfg.n_routed_experts) - 1
        self.eng.report_stage(self.idx, f"calibrating experts {e}-{last}")

    def _expert_of(self, module: str) -> int | None:
        m = _EXPERT.search(module)
        return int(m.group(1)) if m else None

    def calibration_of(self, module: str) -> str:
        e = self._expert_of(module)
        return "dense" if e is None else self.stats["experts"][e]["policy"]

    def x_of(self, module: str) -> torch.Tensor:
        """Calibration input ``(n, K)`` float32 of ``module`` (divided by its AWQ scale if folded)."""
        x = self._raw_x(module)
        s = self.in_scale.get(module)
        return x if s is None else x / s[None, :]

    def _raw_x(self, module: str) -> torch.Tensor:
        """Unscaled calibration input of ``module``: all tokens for attention/dense/shared linears; for an
        expert its routed tokens, or every token of the layer under the ``all-tokens`` policy."""
        if module == f"{self.p}.self_attn.kv_a_proj_with_mqa":
            return self.inputs[self.attn_key]
        mlp_in = module.endswith((".gate_proj", ".up_proj"))
        e = self._expert_of(module)
        if e is None:
            return self.x_mlp if mlp_in else self.inputs[module]
        all_tokens = self.stats["experts"][e]["policy"] == "all-tokens"
        if mlp_in:
            return self.x_mlp if all_tokens else self._expert_x(e)
        if module not in self.inputs:  # down_proj input not captured: from the float gate/up weights
            pre = module.rsplit(".", 1)[0]
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
        self._smooth(f"{p}.post_attention_layernorm", "norm", gate_up, self._inspect_mlp,
                     router=f"{p}.mlp.gate.weight" if self.moe else None)
        for m in mlps:
            e = self._expert_of(m + ".down_proj")
            if e is not None and self.stats["experts"][e]["policy"] == "rtn":
                continue
            self._smooth(f"{m}.up_proj", "linear", [f"{m}.down_proj"], None)
        # clip, then RTN of the clipped folded weights
        for n in self.linears:
            self.report_experts(n)
            spec = self.specs[n]
            w = self.w(n)
            if self.eng.keep_folded:
                self.folded[n + ".weight"] = w.cpu()
            if spec is None:
                continue
            x = self.x_of(n)
            wq = w
            if not any(f in n.rsplit(".", 1)[-1] for f in CLIP_SKIP) and self.calibration_of(n) != "rtn":
                mv = awq_search_clip(w, x, spec, self.eng.convention, n_grid=self.eng.n_grid)
                wq = apply_clip(w, mv)
                absmax = w.abs().reshape(mv.shape[0], mv.shape[1], -1).amax(-1, keepdim=True)
                self.stats["clip"][n] = float((mv / absmax.clamp_min(1e-30)).mean())
            qt = quantize(wq, spec, self.eng.convention, name=n)
            self.quantized[n] = _to_cpu(qt)
            xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
            s_in = self.in_scale.get(n)
            w0 = w if s_in is None else w / s_in[None, :]  # the unfolded weight, for the RTN baseline
            x0 = xs if s_in is None else xs * s_in[None, :]
            self.stats["linears"][n] = {
                "tokens": int(x.shape[0]),
                "rel_output_mse": _rel_mse(xs, w, dequantize(qt)),
                "rtn_rel_output_mse": _rel_mse(x0, w0, pseudo_quantize(w0, spec, self.eng.convention)),
                "calibration": self.calibration_of(n)}
            self.cur.pop(n, None)
            self._f32.pop(n, None)

    def _smooth(self, prev: str, kind: str, modules: list[str], inspect, router: str | None = None) -> None:
        """Search one AWQ scale for ``modules`` (sharing the output of ``prev``) and fold it."""
        modules = [m for m in modules if m in self.specs]
        quant = [m for m in modules if self.specs[m] is not None]
        if not quant:
            return
        if inspect is self._inspect_attention:
            x = self.inputs[self.attn_key]
        elif inspect is self._inspect_mlp:
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
        # fold: prev op, every linear of the mapping (quantized or not), router
        if kind == "norm":
            self.replaced[prev + ".weight"] = fold_norm(self._dense(prev + ".weight"), s).cpu()
        else:
            self.cur[prev] = fold_linear_rows(self.w(prev), s)
        for m in modules:
            self.cur[m] = scale_columns(self.w(m), s)
            self.in_scale[m] = s
        if router is not None:
            self.replaced[router] = scale_columns(self._dense(router), s).cpu()
        self.stats["smoothing"][prev] = {"best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors,
                                         "linears": len(modules)}

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
        """MLP output ``(T, hidden)`` on the cached input with ``cand`` gate/up weights (routing fixed)."""
        x = self.x_mlp

        def ffn(pre: str, xs: torch.Tensor) -> torch.Tensor:
            g = xs @ cand.get(pre + ".gate_proj", self.w(pre + ".gate_proj")).T
            u = xs @ cand.get(pre + ".up_proj", self.w(pre + ".up_proj")).T
            return (F.silu(g) * u) @ self.w(pre + ".down_proj").T

        if not self.moe:
            return ffn(f"{self.p}.mlp", x)
        out = torch.zeros_like(x)
        for e, (tok, wts) in self.routes.items():
            if tok.numel():
                out.index_add_(0, tok, ffn(f"{self.p}.mlp.experts.{e}", x[tok]) * wts[:, None])
        if self.cfg.n_shared_experts:
            out += ffn(f"{self.p}.mlp.shared_experts", x)
        return out

    # -- 2b. GPTQ -------------------------------------------------------------------------------
    def gptq(self) -> None:
        eng = self.eng
        h_cache: tuple | None = None  # (input tensor, H): gate/up and q_a/kv_a share one Hessian
        for n in self.linears:
            self.report_experts(n)
            spec = self.specs[n]
            if spec is None:
                continue
            w = self.w(n)
            pol = self.calibration_of(n)
            x = self._raw_x(n)
            if pol == "rtn":
                qt = quantize(w, spec, eng.convention, name=n)
                rel = _rel_mse(x[:: max(1, x.shape[0] // STAT_TOKENS)], w, dequantize(qt))
            else:
                if h_cache is None or h_cache[0] is not x:
                    h_cache = None
                    acc = HessianAccumulator(w.shape[1], device=self.dev)
                    for c0 in range(0, x.shape[0], 4096):
                        acc.add(x[c0:c0 + 4096])
                    h_cache = (x, acc.H)
                    del acc
                H = h_cache[1]
                qt = gptq_quantize(w, H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                   static_groups=eng.act_order, name=n)
                rel = output_error(w, dequantize(qt), H)
            self.quantized[n] = _to_cpu(qt)
            xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
            self.stats["linears"][n] = {
                "tokens": int(x.shape[0]), "rel_output_mse": rel,
                "rtn_rel_output_mse": _rel_mse(xs, w, pseudo_quantize(w, spec, eng.convention)),
                "calibration": pol}
            self._f32.pop(n, None)
            if n.endswith(".down_proj"):
                self.inputs.pop(n, None)  # done with this MLP's down input
                h_cache = None
        self.stats["gptq"] = {"damp": eng.damp, "act_order": eng.act_order}

    # -- 3. propagate and free ------------------------------------------------------------------
    def overrides(self) -> dict[str, torch.Tensor]:
        """Tensors the quantized model uses for this layer: dequantized QTensors, replaced tensors, and
        folded linears kept in float."""
        out = {n + ".weight": dequantize(qt) for n, qt in self.quantized.items()}
        for n, t in self.cur.items():  # folded, not quantized (policy None): float, written as replaced
            if n not in self.quantized:
                self.replaced[n + ".weight"] = t.cpu()
        out.update(self.replaced)
        return out

    def release(self) -> None:
        self.cur.clear()
        self._f32.clear()
        self._xe = None
        self.inputs.clear()
        self.attn_in.clear()
        self.in_scale.clear()
        self.x_mlp = None
        self.routes = {}
        self.calib_rows = {}


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


def estimate_peak_bytes(cfg: ModelConfig, method: str, n_tokens: int, *, act_bytes: int = 4,
                        weight_bytes: int = 2) -> int:
    """Estimated peak memory (bytes, on top of the interpreter) of :meth:`CalibrationEngine.run_layer` over
    every decoder layer kind of ``cfg``, for ``n_tokens`` calibration tokens in total. The terms follow the
    engine's memory notes: the residual stream twice (old and new, ``act_bytes`` per value), the cached
    activations (attention input, q_b/kv_b/o_proj inputs, MLP input, every routed expert's ``down_proj``
    input: ``top_k`` rows per token), the layer's non-expert weights as the source returns them
    (``weight_bytes``), one layer's results (int8 levels, one byte per weight), and the kernel's working
    set: GPTQ one Hessian group and its Cholesky temporaries (about five ``(K, K)`` float32) plus the linear
    in float32; AWQ two float32 copies (source and candidate, or source and folded) of every gate/up weight the MLP mapping
    searches at once (for a MoE layer: all experts).

    Returns:
        bytes (int).
    """
    T, H = int(n_tokens), cfg.hidden_size
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
    attn_acts = act_bytes * T * (2 * H + q_in + cfg.kv_lora_rank + o_in)  # attn_in twice (list + cat)
    resid = 2 * act_bytes * T * H

    def kernel(shapes: list[tuple[int, int]]) -> int:
        if method == "gptq":
            return max(4 * (5 * n * n + 3 * m * n) for m, n in shapes)
        return max(4 * 3 * m * n for m, n in shapes)

    peaks = []
    kinds = {cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)}
    for moe in kinds:
        if moe:
            E, I, k = cfg.n_routed_experts or 0, cfg.moe_intermediate_size, cfg.num_experts_per_tok or 0
            Is = I * (cfg.n_shared_experts or 0)
            mlp_shapes = [(I, H)] * 2 + [(H, I)]
            mlp_params = E * 3 * I * H + 3 * Is * H
            mlp_acts = act_bytes * T * (H + k * I + Is)
            dense_params = attn_params + 3 * Is * H + (E * H)
            awq_mlp = 2 * 4 * 2 * (E * I + Is) * H  # every gate/up at once: float copy + candidate (or folded)
        else:
            I = cfg.intermediate_size
            mlp_shapes = [(I, H)] * 2 + [(H, I)]
            mlp_params = 3 * I * H
            mlp_acts = act_bytes * T * (H + I)
            dense_params = attn_params + mlp_params
            awq_mlp = 2 * 4 * 2 * I * H
        work = kernel(attn_shapes + mlp_shapes)
        if method == "awq":
            work = max(work, awq_mlp)
        results = attn_params + mlp_params  # int8 levels
        peaks.append(resid + attn_acts + mlp_acts + weight_bytes * dense_params + results + work)
    return max(peaks) if peaks else 0
