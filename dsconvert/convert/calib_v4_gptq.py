"""GPTQ stage of :class:`~dsconvert.convert.calibrate_v4.V4CalibrationEngine` (DeepSeek-V4), one decoder layer on
its :class:`~.calib_v4_capture.V4LayerCapture`: each non-expert linear on the Hessian accumulated at capture
(:func:`dsconvert.quant.gptq.gptq_quantize`; the shared expert's ``w1``/``w3`` share one, ``wo_a`` is quantized
group by group and the groups' rows stacked), then the routed experts a group at a time, their Hessians built
from the kept rows (an expert under ``min_expert_tokens``: every token of the layer, ``all-tokens``, or plain
RTN, ``rtn``). The module notes of :mod:`dsconvert.convert.calibrate_v4` describe the whole loop.

Sources: GPTQ (Frantar et al. 2022); AutoGPTQ ``auto_gptq/modeling/_base.py::quantize`` (layer-sequential
loop); llm-compressor ``moe_calibrate_all_experts``.
"""

from __future__ import annotations

import torch

from ..quant.awq import pseudo_quantize
from ..quant.gptq import gptq_quantize
from ..quant.rtn import QTensor, dequantize, quantize
from .calib_base import STAT_TOKENS, cat_rows, hessian, output_sums, rel_mse, to_cpu
from .calib_capture import CalibStage
from .calib_v4_capture import V4LayerCapture


class V4GptqStage(CalibStage):
    """GPTQ of one V4 layer: :meth:`run` (the non-expert linears, then the expert groups)."""

    def __init__(self, cap: V4LayerCapture):
        super().__init__(cap)
        self.x_moe: torch.Tensor | None = None  # the MoE input, while the expert groups run

    def run(self) -> None:
        cap = self.cap
        for key in cap.hessian_keys():
            if "#" in key:
                continue
            acc = cap.hessian(key)
            xs = cap.sample(key)
            for m in ([key, key[:-2] + "w3"] if key.endswith("shared_experts.w1") else [key]):
                w = cap.weight(m)
                qt = self._gptq(m, w, acc.H, xs, acc.n, "dense")
                if qt is not None:
                    cap.quantized[m] = qt
        wo_a = cap.p + "attn.wo_a"
        if cap.has_hessian(f"{wo_a}#0"):
            w = cap.weight(wo_a)
            if cap.spec(wo_a, w) is not None:
                self._gptq_grouped(wo_a, w, self.eng.cfg.geo.o_groups)
        cap.drop_hessians()
        self.x_moe = cap.take_moe_input()
        self.expert_groups()
        self.x_moe = None

    def run_experts(self, experts: range) -> None:
        """GPTQ (or the fallback) of a group of routed experts; the group's results are spilled as one file."""
        done: dict[str, QTensor] = {}
        for e in experts:
            done.update(self._expert(e))
        self.cap.quantized.put(done)

    def release(self) -> None:
        self.x_moe = None

    def _gptq(self, module: str, w: torch.Tensor, H: torch.Tensor | None, xs: torch.Tensor, tokens: int,
              calibration: str) -> QTensor | None:
        """GPTQ of ``module`` on ``H`` (RTN for ``calibration="rtn"``) and its stats on the sample ``xs``."""
        cap, eng = self.cap, self.eng
        spec = cap.spec(module, w)
        if spec is None:
            return None
        if calibration == "rtn":
            qt = to_cpu(quantize(w, spec, eng.convention, name=module))
        else:
            qt = to_cpu(gptq_quantize(w, H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                      static_groups=eng.act_order, name=module))
        cap.stats["linears"][module] = {
            "tokens": tokens, "rel_output_mse": rel_mse(xs, w, dequantize(qt)),
            "rtn_rel_output_mse": rel_mse(xs, w, pseudo_quantize(w, spec, eng.convention)),
            "calibration": calibration}
        return qt

    def _gptq_grouped(self, module: str, w: torch.Tensor, groups: int) -> None:
        """``wo_a``: group ``j``'s rows against group ``j``'s Hessian; the statistic over the whole output."""
        cap, eng = self.cap, self.eng
        spec = cap.spec(module, w)
        rows = w.shape[0] // groups
        parts, num, den, rnum = [], 0.0, 0.0, 0.0
        tokens = 0
        for j in range(groups):
            acc = cap.hessian(f"{module}#{j}")
            wj = w[j * rows:(j + 1) * rows]
            qt = to_cpu(gptq_quantize(wj, acc.H, spec, eng.convention, damp=eng.damp, act_order=eng.act_order,
                                      static_groups=eng.act_order, name=module))
            parts.append(qt)
            n, r, d = output_sums(cap.sample(f"{module}#{j}"), wj, dequantize(qt),
                                  pseudo_quantize(wj, spec, eng.convention))
            num, rnum, den = num + n, rnum + r, den + d
            tokens = acc.n
        cap.quantized[module] = cat_rows(parts)
        cap.stats["linears"][module] = {"tokens": tokens, "rel_output_mse": num / den if den else 0.0,
                                        "rtn_rel_output_mse": rnum / den if den else 0.0, "calibration": "dense"}

    def _expert(self, e: int) -> dict[str, QTensor]:
        """GPTQ (or the fallback) of routed expert ``e``'s three linears."""
        cap, dev, x_moe = self.cap, self.cap.dev, self.x_moe
        pre = f"{cap.p}ffn.experts.{e}."
        x_in = cap.take_expert_rows(e, "in")
        x_down = cap.take_expert_rows(e, "w2")
        pol = cap.set_expert_policy(e, sum(int(x.shape[0]) for x in x_in))
        w1, w3, w2 = (cap.weight(pre + k) for k in ("w1", "w3", "w2"))
        if pol == "all-tokens" and x_moe is not None:
            xi = x_moe.to(dev)
            xd = cap.swiglu_input(x_moe, w1, w3)
        else:
            xi = torch.cat(x_in).to(dev) if x_in else w1.new_zeros((0, w1.shape[1]))
            xd = torch.cat(x_down).to(dev) if x_down else w2.new_zeros((0, w2.shape[1]))
        del x_in, x_down
        out: dict[str, QTensor] = {}
        step_i, step_d = max(1, xi.shape[0] // STAT_TOKENS), max(1, xd.shape[0] // STAT_TOKENS)
        Hi = hessian(xi, dev) if pol != "rtn" else None
        for k, w in (("w1", w1), ("w3", w3)):
            qt = self._gptq(pre + k, w, Hi, xi[::step_i], int(xi.shape[0]), pol)
            if qt is not None:
                out[pre + k] = qt
        del Hi
        Hd = hessian(xd, dev) if pol != "rtn" else None
        qt = self._gptq(pre + "w2", w2, Hd, xd[::step_d], int(xd.shape[0]), pol)
        if qt is not None:
            out[pre + "w2"] = qt
        return out
