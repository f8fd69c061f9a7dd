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

Step 1 is :class:`~.calib_v4_capture.V4LayerCapture`, step 2 :class:`~.calib_v4_gptq.V4GptqStage` or
:class:`~.calib_v4_awq.V4AwqStage` (its mappings: :data:`~.calib_v4_awq.V4_AWQ_MAPPINGS`), both subclasses
of :class:`~.calib_capture.CalibStage` as V3's stages are; this module drives them.

Source weights are what the V4 forward reads: FP8 and FP4 (e2m1 + E8M0) blocks dequantized exactly first. The
MTP block is not calibrated (the quantize pipeline quantizes it with RTN).

Sources: GPTQ (Frantar et al. 2022) and AutoGPTQ ``auto_gptq/modeling/_base.py::quantize`` (the
layer-sequential loop, inputs of layer ``i+1`` from the quantized layer ``i``); AWQ (Lin et al. 2023) and
AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_search_best_clip``, the folds of ``scale.py``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import UsageError
from ..model.source import WeightSource
from ..model.v4 import V4ReferenceModel
from ..quant.rtn import Convention
from .calib_base import (
    MIN_EXPERT_TOKENS,
    PROGRESS_EXPERTS,
    CalibrationEngineBase,
    LayerResult,
    Overrides,
    Policy,
)
from .calib_v4_awq import V4AwqStage
from .calib_v4_capture import V4LayerCapture, capture_hook, is_quantizable
from .calib_v4_gptq import V4GptqStage

__all__ = ["capture_hook", "is_quantizable", "V4CalibrationEngine", "V4_EXPERT_POLICIES"]

V4_EXPERT_POLICIES = ("all-tokens", "rtn")


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
    #: No remote expert groups on V4 (``--ray`` is refused: :meth:`~.calibrated.CalibratedRun.use_ray`), so the
    #: stages' :meth:`~.calib_capture.CalibStage.expert_groups` always run here, one group after the other.
    expert_dispatch = None

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
        cap = V4LayerCapture(self, layer_idx)
        stage = (V4AwqStage if self.method == "awq" else V4GptqStage)(cap)
        try:
            self.report_stage(layer_idx, "capture")
            cap.capture()
            self.report_stage(layer_idx, "search")
            stage.run()
            self.report_stage(layer_idx, "propagate")
            self.source.overrides = Overrides(cap.quantized, cap.replaced)
            stage.release()
            cap.release()
            gc.collect()
            self._hidden = self.model.layer_forward_many(layer_idx, self._hidden, self.positions,
                                                         token_ids=self.ids)
            result = LayerResult(layer_idx, cap.quantized, cap.replaced, cap.stats, cap.folded)
        except BaseException:
            cap.quantized.close()
            raise
        finally:
            self.source.reset()
            stage.release()
            cap.release()
            gc.collect()
        result.stats["seconds"] = time.perf_counter() - t0
        self.next_layer += 1
        return result
