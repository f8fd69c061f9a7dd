"""GPTQ stage of :class:`~dsconvert.convert.calibrate.CalibrationEngine` (DeepSeek V2/V3), one decoder layer on
its :class:`~.calib_capture.LayerCapture`: the non-expert linears one by one
(:func:`dsconvert.quant.gptq.gptq_quantize`; linears sharing an input share one Hessian, the attention
Hessians streamed at capture), then each routed expert group through one batched
:func:`~dsconvert.quant.gptq.gptq_quantize_batch` per weight shape (gate and up stacked along M).
docs/int-formats.md §7.

Sources: GPTQ (Frantar et al. 2022); AutoGPTQ ``auto_gptq/modeling/_base.py::quantize`` (layer-sequential
loop).
"""

from __future__ import annotations

import torch

from ..quant.awq import pseudo_quantize
from ..quant.gptq import gptq_quantize, gptq_quantize_batch, output_error
from ..quant.rtn import QTensor, dequantize, quantize
from .calib_base import STAT_TOKENS, hessian, qt_rows, rel_mse, to_cpu
from .calib_capture import CalibStage


class GptqStage(CalibStage):
    """GPTQ of one layer: :meth:`run`, or :meth:`run_experts` alone on a rebuilt capture."""

    def run(self) -> None:
        cap, eng = self.cap, self.eng
        non_expert = [n for n in cap.linears if cap.expert_of(n) is None]
        h_cache: tuple | None = None  # (input tensor, H): gate/up and q_a/kv_a share one Hessian
        kv_a = f"{cap.p}.self_attn.kv_a_proj_with_mqa"

        def key(n: str) -> str:
            return cap.attn_key if n == kv_a else n

        # the last quantized linear reading each streamed Hessian: the Hessian is dropped after it (a real
        # o_proj's is 1 GiB; only the Hessian of the linear in flight is held)
        last = {key(n): n for n in non_expert if cap.specs[n] is not None}
        for k in [k for k in cap.streamed_keys() if k not in last]:
            cap.drop_streamed(k)  # kept in float: its Hessian is never used
        for n in non_expert:
            spec = cap.specs[n]
            if spec is None:
                continue
            w = cap.weight(n)
            pol = cap.calibration_of(n)
            st = cap.streamed_hessian(key(n))
            if st is not None:  # accumulated at capture
                H, xs, tokens = st.H, st.sample, st.n
                if last[key(n)] == n:
                    cap.drop_streamed(key(n))
                del st
            else:
                x = cap.input_of(n)
                if h_cache is None or h_cache[0] is not x:
                    h_cache = (x, hessian(x, cap.dev))
                H, xs, tokens = h_cache[1], x[:: max(1, x.shape[0] // STAT_TOKENS)], int(x.shape[0])
            qt = to_cpu(gptq_quantize(w, H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                      static_groups=eng.act_order, name=n))
            cap.quantized[n] = qt
            # both errors on the same token sample (up to STAT_TOKENS): tr(D H Dᵀ) over every token costs
            # two M x N x N float64 products, over 10 minutes for a real o_proj (N = 16384) on two cores
            rtn_rel = rel_mse(xs, w, pseudo_quantize(w, spec, eng.convention))
            rel = rel_mse(xs, w, dequantize(qt))
            del H
            cap.stats["linears"][n] = {"tokens": tokens, "rel_output_mse": rel, "rtn_rel_output_mse": rtn_rel,
                                       "calibration": pol}
            cap.drop_weight(n)
            del w
            if n.endswith(".down_proj"):
                cap.drop_input(n)  # done with this MLP's down input
                h_cache = None
        del h_cache
        cap.drop_dense_inputs()
        self.expert_groups()
        cap.stats["gptq"] = {"damp": eng.damp, "act_order": eng.act_order}

    def run_experts(self, experts: range) -> None:
        """GPTQ of a group of routed experts: their Hessians, then one batched GPTQ per (shape, spec) bucket
        (gate and up of an expert share a Hessian and are stacked along M), results spilled as one group."""
        cap, eng = self.cap, self.eng
        done: dict[str, QTensor] = {}
        pending: dict[str, tuple[int, float, str]] = {}  # module -> (tokens, RTN baseline, calibration)
        # (shape, spec) -> [(names, rows of each, w (M, N), H (N, N))]
        buckets: dict[tuple, list[tuple[list[str], list[int], torch.Tensor, torch.Tensor]]] = {}
        for e in experts:
            names = [n for n in cap.expert_linears(e) if cap.specs[n] is not None]
            pol = cap.expert_policy(e)
            by_input: dict[str, list[str]] = {}
            for n in names:
                by_input.setdefault("down" if n.endswith(".down_proj") else "in", []).append(n)
            for kind, ns in by_input.items():
                x = cap.input_of(ns[0])
                ws = [cap.weight(n) for n in ns]
                if pol == "rtn":
                    for n, w in zip(ns, ws):
                        qt = to_cpu(quantize(w, cap.specs[n], eng.convention, name=n))
                        done[n] = qt
                        self._rtn_stats(n, w, x, qt, rel_mse(x[:: max(1, x.shape[0] // STAT_TOKENS)], w,
                                                             dequantize(qt)), pol)
                    continue
                H = hessian(x, cap.dev)
                xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
                for n, w in zip(ns, ws):  # tokens and the RTN baseline while the input is at hand
                    pending[n] = (int(x.shape[0]), rel_mse(xs, w, pseudo_quantize(w, cap.specs[n], eng.convention)),
                                  pol)
                same = len({(tuple(w.shape), cap.specs[n]) for n, w in zip(ns, ws)}) == 1
                parts = [(ns, ws)] if same else [([n], [w]) for n, w in zip(ns, ws)]
                for gn, gws in parts:
                    gw = torch.cat(gws) if len(gws) > 1 else gws[0]  # (sum M, N): rows are independent given H
                    buckets.setdefault((tuple(gw.shape), cap.specs[gn[0]]), []).append(
                        (gn, [int(w.shape[0]) for w in gws], gw, H))
                del x, ws, H
            cap.drop(cap.expert_linears(e))
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
                    part = qt_rows(qt, r0, r0 + r) if len(gn) > 1 else to_cpu(qt)
                    tokens, rtn_rel, pol = pending.pop(n)
                    cap.stats["linears"][n] = {
                        "tokens": tokens, "rel_output_mse": output_error(gw[r0:r0 + r], dequantize(part), h),
                        "rtn_rel_output_mse": rtn_rel, "calibration": pol}
                    done[n] = part
                    r0 += r
            del items, res
        cap.quantized.put({n: done[n] for e in experts for n in cap.expert_linears(e) if n in done})

    def _rtn_stats(self, n: str, w: torch.Tensor, x: torch.Tensor, qt: QTensor, rel: float, pol: str) -> None:
        """The stats of an expert linear under the ``rtn`` policy (``rel``: its output error)."""
        xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
        self.cap.stats["linears"][n] = {
            "tokens": int(x.shape[0]), "rel_output_mse": rel,
            "rtn_rel_output_mse": rel_mse(xs, w, pseudo_quantize(w, self.cap.specs[n], self.eng.convention)),
            "calibration": pol}
