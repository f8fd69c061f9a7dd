"""Calibration on DeepSeek-V4: input capture on the V4 reference forward, layer-sequential GPTQ and AWQ.

The V4 forward (:class:`~dsconvert.model.v4.V4ReferenceModel`) calls its ``on_linear`` hook with the input of
every Linear it runs; routed experts are run only on the tokens routed to them, so an expert's hook sees exactly
those rows. :func:`capture_hook` narrows that hook to the linears ``quantize`` quantizes on V4
(:data:`~dsconvert.formats.deepseek_v4.QUANTIZABLE`: ``attn.wq_a``, ``attn.wq_b``, ``attn.wkv``, ``attn.wo_a``,
``attn.wo_b``, ``attn.indexer.wq_b``, shared and routed ``w1``/``w2``/``w3``) and hands each input on as a
float32 ``(n, K)`` matrix. ``wo_a`` is block diagonal over ``o_groups``: its hook input is the flattened
``(n, o_groups * K_g)`` attention output, group ``g``'s rows of the weight read columns ``g*K_g:(g+1)*K_g``.

:class:`V4CalibrationEngine` is GPTQ for V4 with the interface of
:class:`~dsconvert.convert.calibrate.CalibrationEngine` that :mod:`dsconvert.convert.calibrated` drives, one
decoder layer per :meth:`~V4CalibrationEngine.run_layer`:

1. **Capture.** The float layer ``i`` runs on every calibration sequence (its input: the *quantized* layers
   ``0..i-1``'s output). Every non-expert quantizable linear's GPTQ Hessian is accumulated as the forward
   produces its input (never cached; ``wo_a``: one Hessian per group); the routed experts' input rows (their
   routed tokens only: ``T * top_k`` rows in all, proportional to the calibration tokens, not to the experts)
   and the MoE input are kept for step 2.
2. **GPTQ** per linear (:func:`dsconvert.quant.gptq.gptq_quantize`; ``w1``/``w3`` of one MLP share one
   Hessian, ``wo_a`` is quantized group by group and the groups' rows stacked). Routed experts are taken
   :attr:`~V4CalibrationEngine.expert_group` at a time, their Hessians built from the kept rows, and each
   group's results spilled (:class:`~dsconvert.convert.calibrate.LayerResults`). An expert routed fewer than
   ``min_expert_tokens`` tokens is calibrated on every token of the layer (``expert_policy="all-tokens"``,
   llm-compressor's ``moe_calibrate_all_experts``; its ``w2`` input is ``silu(clamp(x W1ᵀ)) * clamp(x W3ᵀ)``
   as the forward computes it) or quantized by plain RTN (``"rtn"``).
   **AWQ** (``method="awq"``; the inputs are cached instead of their Hessians): four smoothing mappings, each
   scale searched on the output MSE of the quantized linears it feeds (each on its own rows; AutoAWQ's grid
   and ``w_mean``/``x_mean`` statistics, :func:`dsconvert.quant.awq.awq_search_scale`) and folded exactly in
   float32: ``attn_norm`` -> ``wq_a``, ``wkv`` (and the kept readers of the same input: the compressor's and
   indexer's ``wkv``/``wgate``, ``indexer.weights_proj``); ``q_norm`` -> ``wq_b``, ``indexer.wq_b``;
   ``wo_a``'s output rows -> ``wo_b``; ``ffn_norm`` -> every expert's and the shared expert's ``w1``/``w3``
   and the router ``ffn.gate`` (so routing does not move). No ``w3`` -> ``w2`` fold: the SwiGLU clamp makes
   it inexact. Then a clip search per linear (not for ``wq_*``, as AutoAWQ skips ``q_*``; ``wo_a`` per group)
   and RTN of the clipped folded weight. The folded norms and kept linears are returned as ``replaced``.
   The searches stream their linears one float32 weight at a time (the ``ffn_norm`` mapping reads every
   routed expert's ``w1``/``w3`` twice from the source: once for ``w_mean``, once for the grid's losses).
3. **Propagate.** Layer ``i`` runs again with its quantized weights (dequantized when fetched) and, for AWQ,
   the replaced tensors; its output is layer ``i+1``'s input.

Source weights are what the V4 forward reads: FP8 and FP4 (e2m1 + E8M0) blocks dequantized exactly first. The
MTP block is not calibrated (the quantize pipeline quantizes it with RTN).

Sources: GPTQ (Frantar et al. 2022) and AutoGPTQ ``auto_gptq/modeling/_base.py::quantize`` (the
layer-sequential loop, inputs of layer ``i+1`` from the quantized layer ``i``); AWQ (Lin et al. 2023) and
AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_search_best_clip``, the folds of ``scale.py``).
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..model.layers import LinearHook
from ..model.source import WeightSource
from ..model.v4 import V4ReferenceModel
from ..quant.awq import (apply_clip, awq_scale_candidates, awq_search_clip, awq_search_scale_streamed,
                         awq_weight_sums, fold_linear_rows, fold_norm, pseudo_quantize, scale_columns)
from ..quant.gptq import HessianAccumulator, gptq_quantize
from ..quant.rtn import Convention, QTensor, dequantize, quantize
from .calib_base import (
    CLIP_SKIP,
    MIN_EXPERT_TOKENS,
    PROGRESS_EXPERTS,
    STAT_TOKENS,
    CalibrationEngineBase,
    LayerResult,
    LayerResults,
    Overrides,
    Policy,
    hessian,
    rel_mse,
    to_cpu,
)
from ..formats.deepseek_v4 import QUANTIZABLE as V4_QUANTIZABLE

__all__ = ["capture_hook", "is_quantizable", "V4CalibrationEngine", "V4_EXPERT_POLICIES"]

V4_EXPERT_POLICIES = ("all-tokens", "rtn")

_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])$")


def is_quantizable(module: str) -> bool:
    """Whether release module ``module`` (``layers.3.attn.wq_a``, no ``.weight``) is a linear V4 quantize
    quantizes (:data:`~dsconvert.formats.deepseek_v4.QUANTIZABLE`)."""
    return V4_QUANTIZABLE.match(module + ".weight") is not None


def capture_hook(sink: Callable[[str, torch.Tensor], None],
                 keep: Callable[[str], bool] = is_quantizable) -> LinearHook:
    """An ``on_linear`` hook for :meth:`V4ReferenceModel.layer_forward_many` / ``forward`` that calls
    ``sink(module, x)`` for each module ``keep`` accepts, with ``x`` its input ``(n, K)`` float32 (a detached
    copy; ``n`` = the tokens of the call: all tokens for dense linears, the routed tokens for a routed
    expert). The forward's own input is not replaced."""

    def hook(name: str, x: torch.Tensor) -> None:
        if keep(name):
            sink(name, x.detach().reshape(-1, x.shape[-1]).to(torch.float32))
        return None

    return hook


def _cat_rows(parts: Sequence[QTensor]) -> QTensor:
    """Stack QTensors of row blocks of one weight (quantization groups run along K, so rows are independent)."""
    if len(parts) == 1:
        return parts[0]
    z = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QTensor(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), z, parts[0].spec,
                   parts[0].convention)


class V4CalibrationEngine(CalibrationEngineBase):
    """GPTQ or AWQ on a DeepSeek-V4 release checkpoint, one decoder layer per :meth:`run_layer` (module notes).

    Args:
        source: tensors by release name (FP8 / FP4 dequantized when read), ``source.config`` the release
            config.json; e.g. :class:`dsconvert.convert.weights.CheckpointWeightSource`.
        policy: ``policy(module, (N, K)) -> QuantSpec | None`` (module without ``.weight``).
        method: ``"gptq"`` or ``"awq"``.
        n_grid: AWQ grid points for the scale and clip searches.
        keep_folded: AWQ: fill :attr:`LayerResult.folded` with every quantized linear's folded float32 weight.
        convention: storage convention of the target format (compressed-tensors).
        calib_ids: calibration sequences (token ids), each run from position 0.
        dtype: compute dtype of the reference forward; the kernels use float32.
        damp, act_order: GPTQ dampening and act-order (with static groups).
        min_expert_tokens, expert_policy: experts routed fewer tokens use ``expert_policy``
            (``"all-tokens"`` or ``"rtn"``).
        progress: ``progress(layer_idx, stage)``.
        device: where Hessians and GPTQ run (default CPU); the forward runs on the CPU.
        expert_group: routed experts whose Hessians exist at once (default :data:`PROGRESS_EXPERTS`).
        spill_dir: where expert results are spilled per group (None: kept in memory).

    Raises:
        UsageError: another method or expert policy, no calibration tokens, ids outside the vocabulary.
    """

    model_class = V4ReferenceModel

    def __init__(self, source: WeightSource, policy: Policy, method: str, convention: Convention,
                 calib_ids: Sequence[Sequence[int]], *, dtype: torch.dtype = torch.float32, damp: float = 0.01,
                 act_order: bool = False, min_expert_tokens: int = MIN_EXPERT_TOKENS,
                 expert_policy: str = "all-tokens", progress: Callable[[int, str], None] | None = None,
                 device: torch.device | str | None = None, expert_group: int | None = None,
                 max_memory: int | None = None, spill_dir: Path | None = None, n_grid: int = 20,
                 keep_folded: bool = False):
        if method not in ("gptq", "awq"):
            raise UsageError(f"calibration method {method!r} on DeepSeek-V4", hint="use 'gptq' or 'awq'")
        if expert_policy not in V4_EXPERT_POLICIES:
            raise UsageError(f"expert policy {expert_policy!r} on DeepSeek-V4",
                             hint="V4 takes " + " or ".join(V4_EXPERT_POLICIES))
        super().__init__(source, policy, method, convention, calib_ids, dtype=dtype, damp=damp,
                         act_order=act_order, n_grid=n_grid, min_expert_tokens=min_expert_tokens,
                         expert_policy=expert_policy, progress=progress, device=device, keep_folded=keep_folded,
                         expert_group=expert_group, max_memory=max_memory, spill_dir=spill_dir)

    def _plan_groups(self) -> None:
        """The expert group: the one given, or the largest (at most :data:`PROGRESS_EXPERTS`) whose
        :meth:`peak_memory_estimate` fits :attr:`budget`."""
        if self._fixed_group:
            self.expert_group = self._fixed_group
            return
        for g in range(min(self.cfg.geo.experts, PROGRESS_EXPERTS), 0, -1):
            self.expert_group = g
            if self.peak_memory_estimate() <= self.budget:
                return

    def peak_memory_estimate(self, spilled: bool | None = None) -> int:
        """Estimated peak bytes of :meth:`run_layer` on top of the interpreter: the mHC streams (in and out),
        the kept MoE input and routed expert rows (``T * top_k * (hidden + inter)``), the layer's non-expert
        weights in float32, the non-expert Hessians (accumulated at capture; AWQ: the cached inputs), the
        working set of the largest step, and the non-expert int8 levels (plus every expert's when results are
        not ``spilled``).

        The working set is the larger of one linear's GPTQ on the widest Hessian (two ``K x K`` float32
        copies; AWQ: the clip search's folded weight and candidate) and one routed expert in flight (its
        Hessians and three float32 weights; AWQ: the three weights, the smoothing search streams them one at a
        time) with the int8 levels of the :attr:`expert_group` experts held until they are spilled. Measured
        at V4-Flash's dimensions (1 layer, 8 and 32 experts, 256 tokens): 0.85-1.12x the kernel's peak RSS
        (README); GPTQ's peak is the dense phase, AWQ's the expert loop (grows with the group up to 32)."""
        g = self.cfg.geo
        T, D, I, E, k = self.num_tokens, g.hidden, g.inter, g.experts, g.experts_per_tok
        hd, heads, kg = g.head_dim, g.heads, g.heads * g.head_dim // g.o_groups
        streams = 2 * 4 * T * g.hc * D
        moe_rows = 4 * (T * D + T * k * (D + I))
        dense = (D * g.q_lora + g.q_lora * heads * hd + D * hd + g.o_groups * g.o_lora * kg
                 + g.o_groups * g.o_lora * D + g.q_lora * g.index_heads * g.index_dim + 3 * g.shared * I * D)
        hess = 4 * (2 * D * D + g.q_lora * g.q_lora + g.o_groups * kg * kg + (g.o_groups * g.o_lora) ** 2
                    + g.shared * I * I)
        k_max = max(D, g.q_lora, kg, g.o_groups * g.o_lora, I)
        in_flight = self.expert_group * 3 * I * D
        work = max(2 * 4 * k_max * k_max, 4 * (D * D + I * I + 3 * I * D) + in_flight)
        spilled = self.spill_dir is not None if spilled is None else spilled
        results = dense + (0 if spilled else E * 3 * I * D)
        if self.method == "awq":  # cached inputs instead of Hessians; no Hessians in the working set
            hess = 4 * T * (2 * D + g.q_lora + heads * hd + g.o_groups * g.o_lora + g.shared * I)
            work = 4 * 3 * I * D + in_flight
        return int(streams + moe_rows + 4 * dense + hess + work + results)

    @torch.no_grad()
    def run_layer(self, layer_idx: int) -> LayerResult:
        """Calibrate and quantize decoder layer ``layer_idx`` (call for 0, 1, 2, ... in order).

        Returns:
            :class:`~dsconvert.convert.calibrate.LayerResult` (``replaced``: AWQ's folded tensors, float32)
            whose ``stats`` holds
            ``layer``, ``method``, ``tokens``, ``seconds``, ``linears`` (``{module: {"tokens", "rel_output_mse",
            "rtn_rel_output_mse", "calibration"}}``: the GPTQ and RTN relative output MSE
            ``||XWᵀ - XŴᵀ||² / ||XWᵀ||²`` on the calibration rows) and ``experts``
            (``{eid: {"tokens_routed", "policy"}}``); for AWQ also ``smoothing`` (``{prev op: {"best_ratio",
            "mse_best", "mse_grid", "linears"}}``) and ``clip`` (``{module: mean shrink of max|w|}``).

        Raises:
            UsageError: out-of-order call or an index outside the main layers.
        """
        self._check_next(layer_idx, "block")
        t0 = time.perf_counter()
        self.source.reset()
        lay = _V4Layer(self, layer_idx)
        try:
            self.report_stage(layer_idx, "capture")
            lay.capture()
            self.report_stage(layer_idx, "search")
            lay.awq() if self.method == "awq" else lay.gptq()
            self.report_stage(layer_idx, "propagate")
            self.source.overrides = Overrides(lay.quantized, lay.replaced)
            lay.release()
            gc.collect()
            self._hidden = self.model.layer_forward_many(layer_idx, self._hidden, self.positions,
                                                         token_ids=self.ids)
            result = LayerResult(layer_idx, lay.quantized, lay.replaced, lay.stats, lay.folded)
        except BaseException:
            lay.quantized.close()
            raise
        finally:
            self.source.reset()
            lay.release()
            gc.collect()
        result.stats["seconds"] = time.perf_counter() - t0
        self.next_layer += 1
        return result


class _V4Layer:
    """Working state of one :meth:`V4CalibrationEngine.run_layer` call."""

    def __init__(self, eng: V4CalibrationEngine, idx: int):
        self.eng, self.idx, self.dev = eng, idx, eng.device
        self.p = f"layers.{idx}."
        self.quantized = LayerResults(eng.spill_dir, f"layer{idx}")
        self.stats: dict = {"layer": idx, "method": eng.method, "tokens": eng.num_tokens, "linears": {},
                            "experts": {}, "smoothing": {}, "clip": {}}
        self.replaced: dict[str, torch.Tensor] = {}  # AWQ: folded norms and kept linears, float32
        self.folded: dict[str, torch.Tensor] = {}  # keep_folded: every folded weight before clip/quantization
        self.inputs: dict[str, list[torch.Tensor]] = {}  # AWQ: cached inputs of the non-expert linears
        self.cur: dict[str, torch.Tensor] = {}  # AWQ: folded working weights
        self.in_scale: dict[str, torch.Tensor] = {}  # AWQ: the s each module's input is divided by
        self.hess: dict[str, HessianAccumulator] = {}  # Hessian key -> accumulator (non-expert linears)
        self.sample: dict[str, list[torch.Tensor]] = {}  # Hessian key -> input rows for the RTN statistic
        self.rows: dict[str, list[torch.Tensor]] = {}  # routed expert "e.in" / "e.w2" -> input rows
        self.moe_in: list[torch.Tensor] = []
        self._spec_cache: dict[str, object] = {}
        self._shape_probe: dict[str, torch.Tensor] = {}

    # -- names --------------------------------------------------------------------------------------------
    def spec(self, module: str, w: torch.Tensor):
        if module not in self._spec_cache:
            self._spec_cache[module] = self.eng.policy(module, tuple(w.shape))
        return self._spec_cache[module]

    def _key(self, module: str) -> str:
        """Hessian key: ``w1`` and ``w3`` of an MLP read the same input."""
        return module[:-2] + "w1" if module.endswith(".w3") else module

    def _weight(self, module: str) -> torch.Tensor:
        return self.eng.source.get(module + ".weight").to(device=self.dev, dtype=torch.float32)

    # -- 1. capture ---------------------------------------------------------------------------------------
    def capture(self) -> None:
        eng, g = self.eng, self.eng.cfg.geo
        kg = g.heads * g.head_dim // g.o_groups
        step = max(1, eng.num_tokens // STAT_TOKENS)

        awq = eng.method == "awq"

        def add(key: str, x: torch.Tensor) -> None:
            if awq:
                self.inputs.setdefault(key, []).append(x.to(self.dev))
                return
            acc = self.hess.get(key)
            if acc is None:
                acc = self.hess[key] = HessianAccumulator(x.shape[1], device=self.dev)
            acc.add(x.to(self.dev))
            self.sample.setdefault(key, []).append(x[::step])

        def sink(name: str, x: torch.Tensor) -> None:
            if name == self.p + "ffn.gate":
                self.moe_in.append(x.clone())
                return
            m = _EXPERT.match(name)
            if m is not None:
                if m.group(3) != "w3":  # w3 sees w1's rows
                    self.rows.setdefault(f"{m.group(2)}.{'in' if m.group(3) == 'w1' else 'w2'}", []).append(x)
                return
            if name.endswith(".w3"):
                return
            if name == self.p + "attn.wo_a" and not awq:
                for j in range(g.o_groups):
                    add(f"{name}#{j}", x[:, j * kg:(j + 1) * kg])
                return
            add(name, x)

        keep = lambda n: n == self.p + "ffn.gate" or is_quantizable(n)  # noqa: E731
        eng.model.layer_forward_many(self.idx, eng._hidden, eng.positions, capture_hook(sink, keep),
                                     token_ids=eng.ids)

    # -- 2. GPTQ ------------------------------------------------------------------------------------------
    def _gptq(self, module: str, w: torch.Tensor, H: torch.Tensor, xs: torch.Tensor, tokens: int,
              calibration: str) -> QTensor | None:
        spec = self.spec(module, w)
        if spec is None:
            return None
        eng = self.eng
        if calibration == "rtn":
            qt = to_cpu(quantize(w, spec, eng.convention, name=module))
        else:
            qt = to_cpu(gptq_quantize(w, H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                       static_groups=eng.act_order, name=module))
        self.stats["linears"][module] = {
            "tokens": tokens, "rel_output_mse": rel_mse(xs, w, dequantize(qt)),
            "rtn_rel_output_mse": rel_mse(xs, w, pseudo_quantize(w, spec, eng.convention)),
            "calibration": calibration}
        return qt

    def gptq(self) -> None:
        eng, g = self.eng, self.eng.cfg.geo
        for key in list(self.hess):
            if "#" in key:
                continue
            acc = self.hess[key]
            xs = torch.cat(self.sample[key])
            for m in ([key, key[:-2] + "w3"] if key.endswith("shared_experts.w1") else [key]):
                w = self._weight(m)
                qt = self._gptq(m, w, acc.H, xs, acc.n, "dense")
                if qt is not None:
                    self.quantized[m] = qt
        wo_a = self.p + "attn.wo_a"
        if f"{wo_a}#0" in self.hess:
            w = self._weight(wo_a)
            spec = self.spec(wo_a, w)
            if spec is not None:
                self._gptq_grouped(wo_a, w, g.o_groups)
        self.hess.clear()
        self.sample.clear()
        x_moe = torch.cat(self.moe_in) if self.moe_in else None
        self.moe_in = []
        E = g.experts
        grp = max(1, eng.expert_group)
        for e0 in range(0, E, grp):
            e1 = min(E, e0 + grp)
            eng.report_stage(self.idx, f"calibrating experts {e0}-{e1 - 1}")
            done: dict[str, QTensor] = {}
            for e in range(e0, e1):
                done.update(self._expert(e, x_moe))
            self.quantized.put(done)

    def _gptq_grouped(self, module: str, w: torch.Tensor, groups: int) -> None:
        """``wo_a``: group ``j``'s rows against group ``j``'s Hessian; the statistic over the whole output."""
        eng = self.eng
        spec = self.spec(module, w)
        rows = w.shape[0] // groups
        parts, num, den, rnum = [], 0.0, 0.0, 0.0
        tokens = 0
        for j in range(groups):
            acc = self.hess[f"{module}#{j}"]
            wj = w[j * rows:(j + 1) * rows]
            qt = to_cpu(gptq_quantize(wj, acc.H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                       static_groups=eng.act_order, name=module))
            parts.append(qt)
            xs = torch.cat(self.sample[f"{module}#{j}"]).to(torch.float64)
            ref = xs @ wj.to(torch.float64).T
            den += float(ref.pow(2).sum())
            num += float((ref - xs @ dequantize(qt).to(torch.float64).T).pow(2).sum())
            rtn = pseudo_quantize(wj, spec, eng.convention).to(torch.float64)
            rnum += float((ref - xs @ rtn.T).pow(2).sum())
            tokens = acc.n
        self.quantized[module] = _cat_rows(parts)
        self.stats["linears"][module] = {"tokens": tokens, "rel_output_mse": num / den if den else 0.0,
                                         "rtn_rel_output_mse": rnum / den if den else 0.0, "calibration": "dense"}

    def _expert(self, e: int, x_moe: torch.Tensor | None) -> dict[str, QTensor]:
        """GPTQ (or the fallback) of routed expert ``e``'s three linears."""
        eng = self.eng
        pre = f"{self.p}ffn.experts.{e}."
        x_in = self.rows.pop(f"{e}.in", [])
        x_down = self.rows.pop(f"{e}.w2", [])
        n = sum(int(x.shape[0]) for x in x_in)
        pol = "routed" if n >= eng.min_expert_tokens else eng.expert_policy
        self.stats["experts"][e] = {"tokens_routed": n, "policy": pol}
        w1, w3, w2 = (self._weight(pre + k) for k in ("w1", "w3", "w2"))
        if pol == "all-tokens" and x_moe is not None:
            xi = x_moe.to(self.dev)
            lim, md = eng.cfg.swiglu_limit, eng.model.dtype
            xm = x_moe.to(md)
            a = F.linear(xm, w1.to("cpu", md)).clamp(max=lim)
            b = F.linear(xm, w3.to("cpu", md)).clamp(min=-lim, max=lim)
            xd = (F.silu(a) * b).to(device=self.dev, dtype=torch.float32)
        else:
            xi = torch.cat(x_in).to(self.dev) if x_in else w1.new_zeros((0, w1.shape[1]))
            xd = torch.cat(x_down).to(self.dev) if x_down else w2.new_zeros((0, w2.shape[1]))
        del x_in, x_down
        out: dict[str, QTensor] = {}
        step_i, step_d = max(1, xi.shape[0] // STAT_TOKENS), max(1, xd.shape[0] // STAT_TOKENS)
        Hi = hessian(xi, self.dev) if pol != "rtn" else None
        for k, w in (("w1", w1), ("w3", w3)):
            qt = self._gptq(pre + k, w, Hi, xi[::step_i], int(xi.shape[0]), pol)
            if qt is not None:
                out[pre + k] = qt
        del Hi
        Hd = hessian(xd, self.dev) if pol != "rtn" else None
        qt = self._gptq(pre + "w2", w2, Hd, xd[::step_d], int(xd.shape[0]), pol)
        if qt is not None:
            out[pre + "w2"] = qt
        return out

    # -- 2b. AWQ -------------------------------------------------------------------------------------------
    def _x(self, key: str) -> torch.Tensor:
        xs = self.inputs[key]
        return torch.cat(xs) if len(xs) > 1 else xs[0]

    def _w(self, module: str) -> torch.Tensor:
        """The working float32 weight: folded so far (a routed expert's column fold applied when first used)."""
        if module not in self.cur:
            w = self._weight(module)
            if _EXPERT.match(module) and module in self.in_scale:
                w = scale_columns(w, self.in_scale[module])
            self.cur[module] = w
        return self.cur[module]

    def _smooth(self, prev: str, kind: str, x: torch.Tensor, members: list[tuple[str, torch.Tensor]],
                extra: list[str]) -> None:
        """Search one AWQ scale for the linears ``members`` ``[(module, its input rows)]`` (all fed by
        ``prev``'s output; ``x`` the rows of the ``|x|`` statistic), the loss being the output MSE of the
        quantized ones on their own rows, and fold it: ``prev`` (a norm weight, ``kind="norm"``, or a linear's
        output rows, ``"linear"``) ``/= s``, every member's and every kept linear of ``extra``'s columns
        ``*= s`` (routed experts' when they are processed).

        Streamed over the members, one float32 weight at a time (the ``ffn_norm`` mapping has every routed
        expert's ``w1``/``w3``): a first pass accumulates ``w_mean`` (:func:`~dsconvert.quant.awq.awq_weight_sums`,
        in member order, the sum :func:`~dsconvert.quant.awq.awq_search_scale` forms), a second computes each
        member's float output once and adds its squared error under every grid candidate to that candidate's
        float64 sum. The loss is separable (each linear on its own rows), so the sums over all members divided
        by the output elements are the MSE of the concatenated outputs that ``awq_search_scale`` takes, up to
        summation order. Routed experts are read from the source in both passes (never kept)."""
        eng = self.eng
        quant = [(m, xm) for m, xm in members if self.spec(m, self._weight_shape(m)) is not None]
        if not quant or x.shape[0] == 0:
            return
        spec = self.spec(quant[0][0], self._weight_shape(quant[0][0]))
        conv = eng.convention

        def weight(m: str) -> torch.Tensor:
            return self._weight(m) if _EXPERT.match(m) else self._w(m)

        x_mean = x.to(torch.float32).abs().mean(dim=0)  # (N,)
        total = torch.zeros(x.shape[1], dtype=torch.float32, device=self.dev)
        rows = 0
        for m, _ in quant:
            t, r = awq_weight_sums(weight(m), spec)
            total += t
            rows += r
        w_mean = total / max(rows, 1)
        cands = [s for _, s in awq_scale_candidates(x_mean, w_mean, eng.n_grid)]
        sse = [0.0] * len(cands)
        numel = 0
        for m, xm in quant:
            if xm.shape[0] == 0:
                continue
            w = weight(m)
            ref = xm @ w.T  # (n_m, M_m)
            numel += ref.numel()
            for j, s in enumerate(cands):
                c = pseudo_quantize(w * s[None, :], spec, conv) / s[None, :]
                sse[j] += float((xm @ c.T - ref).pow(2).sum(dtype=torch.float64))
            del w, ref
        it = iter([v / numel if numel else float("nan") for v in sse])
        s, ratio, errors = awq_search_scale_streamed(x_mean, w_mean, lambda _s: next(it), eng.n_grid)
        self._fold_smoothing(prev, kind, members, extra, s, ratio, errors)

    def _fold_smoothing(self, prev: str, kind: str, members: list[tuple[str, torch.Tensor]], extra: list[str],
                        s: torch.Tensor, ratio: float, errors: list[float]) -> None:
        """Fold the scale ``s`` ``(N,)`` :meth:`_smooth` found (see there) and record its statistics."""
        eng = self.eng
        if kind == "norm":
            self.replaced[prev + ".weight"] = fold_norm(eng.source.get(prev + ".weight"), s.cpu()).cpu()
        else:
            self.cur[prev] = fold_linear_rows(self._w(prev), s)
        for m, _ in members:
            if not _EXPERT.match(m):
                self.cur[m] = scale_columns(self._w(m), s)
            self.in_scale[m] = s
        for m in extra:
            self.replaced[m + ".weight"] = scale_columns(self._weight(m), s).cpu()
        self.stats["smoothing"][prev] = {"best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors,
                                         "linears": len(members) + len(extra)}

    def _weight_shape(self, module: str) -> torch.Tensor:
        """A stand-in with the weight's shape for the policy (which reads only the shape)."""
        if module not in self._shape_probe:
            self._shape_probe[module] = torch.empty(tuple(self._weight(module).shape), device="meta")
        return self._shape_probe[module]

    def _awq_quantize(self, module: str, x: torch.Tensor, calibration: str) -> QTensor | None:
        """Clip-search (not for ``q_*`` names, as AutoAWQ) and RTN-quantize the folded weight of ``module``;
        ``x`` its input rows before the fold. A module the policy keeps is written folded (``replaced``)."""
        eng = self.eng
        w = self._w(module)
        if eng.keep_folded:
            self.folded[module + ".weight"] = w.cpu()
        spec = self.spec(module, w)
        if spec is None:
            if module in self.in_scale or module in self.cur:
                self.replaced[module + ".weight"] = w.cpu()
            return None
        s = self.in_scale.get(module)
        xf = x if s is None else x / s[None, :]
        wq = w
        if calibration != "rtn" and not any(f in module.rsplit(".", 1)[-1] for f in CLIP_SKIP):
            mv = awq_search_clip(w, xf, spec, eng.convention, n_grid=eng.n_grid)
            wq = apply_clip(w, mv)
            absmax = w.abs().reshape(mv.shape[0], mv.shape[1], -1).amax(-1, keepdim=True)
            self.stats["clip"][module] = float((mv / absmax.clamp_min(1e-30)).mean())
        qt = to_cpu(quantize(wq, spec, eng.convention, name=module))
        step = max(1, x.shape[0] // STAT_TOKENS)
        w0 = w if s is None else w / s[None, :]
        self.stats["linears"][module] = {
            "tokens": int(x.shape[0]), "rel_output_mse": rel_mse(xf[::step], w, dequantize(qt)),
            "rtn_rel_output_mse": rel_mse(x[::step], w0, pseudo_quantize(w0, spec, eng.convention)),
            "calibration": calibration}
        return qt

    def _awq_quantize_grouped(self, module: str, x: torch.Tensor) -> QTensor | None:
        """``wo_a`` (block diagonal over ``o_groups``): clip search per group on that group's input block."""
        eng, G = self.eng, self.eng.cfg.geo.o_groups
        w = self._w(module)
        if eng.keep_folded:
            self.folded[module + ".weight"] = w.cpu()
        spec = self.spec(module, w)
        if spec is None:
            if module in self.cur and module in self.stats["smoothing"]:
                self.replaced[module + ".weight"] = w.cpu()
            return None
        r, kg = w.shape[0] // G, x.shape[1] // G
        step = max(1, x.shape[0] // STAT_TOKENS)
        parts, num, rnum, den = [], 0.0, 0.0, 0.0
        for j in range(G):
            wj, xj = w[j * r:(j + 1) * r], x[:, j * kg:(j + 1) * kg]
            qj = to_cpu(quantize(apply_clip(wj, awq_search_clip(wj, xj, spec, eng.convention, n_grid=eng.n_grid)),
                                  spec, eng.convention, name=module))
            parts.append(qj)
            xs = xj[::step].double()
            ref = xs @ wj.double().T
            den += float(ref.pow(2).sum())
            num += float((ref - xs @ dequantize(qj).double().T).pow(2).sum())
            rnum += float((ref - xs @ pseudo_quantize(wj, spec, eng.convention).double().T).pow(2).sum())
        self.stats["linears"][module] = {"tokens": int(x.shape[0]), "rel_output_mse": num / den if den else 0.0,
                                         "rtn_rel_output_mse": rnum / den if den else 0.0, "calibration": "dense"}
        return _cat_rows(parts)

    def awq(self) -> None:
        """AWQ for V4: four smoothing mappings, then clip search and RTN per linear (see the module notes)."""
        eng, g, p = self.eng, self.eng.cfg.geo, self.p
        a = p + "attn."
        x_attn, q_res = self._x(a + "wq_a"), self._x(a + "wq_b")
        kept_attn = [a + n for n in ("compressor.wkv", "compressor.wgate", "indexer.weights_proj",
                                     "indexer.compressor.wkv", "indexer.compressor.wgate")
                     if self.eng.source.inner.has(a + n + ".weight")]
        self._smooth(p + "attn_norm", "norm", x_attn, [(a + "wq_a", x_attn), (a + "wkv", x_attn)], kept_attn)
        q_b = [(a + "wq_b", q_res)] + ([(a + "indexer.wq_b", q_res)] if a + "indexer.wq_b" in self.inputs else [])
        self._smooth(a + "q_norm", "norm", q_res, q_b, [])
        x_ob = self._x(a + "wo_b")
        self._smooth(a + "wo_a", "linear", x_ob, [(a + "wo_b", x_ob)], [])
        x_moe = torch.cat(self.moe_in).to(self.dev)
        sh = p + "ffn.shared_experts."
        rows = {e: torch.cat(self.rows[f"{e}.in"]).to(self.dev) for e in range(g.experts)
                if self.rows.get(f"{e}.in")}
        none = x_moe[:0]
        ffn_in = [(sh + "w1", x_moe), (sh + "w3", x_moe)] + [  # every expert is folded, routed to or not
            (f"{p}ffn.experts.{e}.{k}", rows.get(e, none)) for e in range(g.experts) for k in ("w1", "w3")]
        self._smooth(p + "ffn_norm", "norm", x_moe, ffn_in, [p + "ffn.gate"])
        for m in (a + "wq_a", a + "wkv", a + "wq_b", a + "indexer.wq_b", a + "wo_a", a + "wo_b"):
            if m in self.inputs:
                x = x_attn if m == a + "wkv" else self._x(m)
                qt = (self._awq_quantize_grouped(m, x) if m == a + "wo_a"
                      else self._awq_quantize(m, x, "dense"))
                if qt is not None:
                    self.quantized[m] = qt
        for k in ("w1", "w3", "w2"):
            x = x_moe if k != "w2" else self._x(sh + "w2")
            qt = self._awq_quantize(sh + k, x, "dense")
            if qt is not None:
                self.quantized[sh + k] = qt
        self.inputs.clear()
        grp = max(1, eng.expert_group)
        for e0 in range(0, g.experts, grp):
            e1 = min(g.experts, e0 + grp)
            eng.report_stage(self.idx, f"calibrating experts {e0}-{e1 - 1}")
            done: dict[str, QTensor] = {}
            for e in range(e0, e1):
                pre = f"{p}ffn.experts.{e}."
                xi = rows.pop(e, None)
                x_down = self.rows.pop(f"{e}.w2", [])
                n = 0 if xi is None else int(xi.shape[0])
                pol = "routed" if n >= eng.min_expert_tokens else eng.expert_policy
                self.stats["experts"][e] = {"tokens_routed": n, "policy": pol}
                if pol == "all-tokens" or xi is None:
                    xi, xd = x_moe, self._swiglu_in(pre, x_moe)
                else:
                    xd = torch.cat(x_down).to(self.dev)
                for k, x in (("w1", xi), ("w3", xi), ("w2", xd)):
                    qt = self._awq_quantize(pre + k, x, pol)
                    if qt is not None:
                        done[pre + k] = qt
                    self.cur.pop(pre + k, None)
            self.quantized.put(done)
        self.rows.clear()

    def _swiglu_in(self, pre: str, x: torch.Tensor) -> torch.Tensor:
        """``w2``'s input on rows ``x`` as the forward computes it (clamped SwiGLU of the unfolded weights)."""
        lim, md = self.eng.cfg.swiglu_limit, self.eng.model.dtype
        xm = x.to("cpu", md)
        w1, w3 = (self._weight(pre + k).to("cpu", md) for k in ("w1", "w3"))
        a = F.linear(xm, w1).clamp(max=lim)
        b = F.linear(xm, w3).clamp(min=-lim, max=lim)
        return (F.silu(a) * b).to(device=self.dev, dtype=torch.float32)

    def release(self) -> None:
        self.inputs.clear()
        self.cur.clear()
        self.hess.clear()
        self.sample.clear()
        self.rows.clear()
        self.moe_in = []

