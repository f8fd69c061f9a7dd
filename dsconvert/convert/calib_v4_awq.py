"""AWQ stage of :class:`~dsconvert.convert.calibrate_v4.V4CalibrationEngine` (DeepSeek-V4), one decoder layer on
its :class:`~.calib_v4_capture.V4LayerCapture`, driven by :data:`V4_AWQ_MAPPINGS`: for each mapping (prev op ->
the linears reading its output) search one smoothing scale on the output MSE of the quantized linears it feeds,
each on its own rows (AutoAWQ's grid and ``w_mean``/``x_mean`` statistics, streamed one float32 weight at a
time: :meth:`V4AwqStage.smooth`), and fold it exactly in float32 (norm or ``wo_a``'s rows ``/= s``, the linears'
and the kept readers' columns ``*= s``; a routed expert's when its group is processed). No ``w3 -> w2`` fold:
the SwiGLU clamp makes it inexact. Then, per linear of :data:`V4_AWQ_LINEARS` and per routed expert, a clip
search (not for ``wq_*``, as AutoAWQ skips ``q_*``; ``wo_a`` per group) and RTN of the clipped folded weight.
The module notes of :mod:`dsconvert.convert.calibrate_v4` describe the whole loop.

Sources: AWQ (Lin et al. 2023); AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``,
``_search_best_clip``, the folds of ``scale.py``); llm-compressor ``modifiers/awq`` (router in the balance layers).
"""

from __future__ import annotations

import torch

from ..quant.awq import (apply_clip, awq_scale_candidates, awq_search_clip, awq_search_scale_streamed,
                         awq_weight_sums, fold_linear_rows, fold_norm, pseudo_quantize, scale_columns)
from ..quant.rtn import QTensor, dequantize, quantize
from .calib_base import CLIP_SKIP, STAT_TOKENS, cat_rows, output_sums, rel_mse, to_cpu
from .calib_capture import CalibStage
from .calib_v4_capture import V4LayerCapture, is_routed_expert

#: AWQ smoothing mappings for DeepSeek-V4, in search order, as data: ``(prev op, its kind, linears, input,
#: kept readers)``, names relative to the layer (``layers.{i}.``). ``kind``: ``norm`` (a norm weight ``/= s``)
#: or ``linear`` (the prev linear's output rows ``/= s``). ``input``: the captured input (``ffn.gate``: the
#: MoE input) whose ``|x|`` is the statistic and on which every linear's output is measured, except that
#: ``{experts}`` expands to every routed expert's ``w1``/``w3``, each on its routed rows (none: folded, not
#: measured). A linear whose input was not captured (no indexer) is left out. Kept readers (present in the
#: checkpoint): float linears of the same input, whose columns take the fold (the router, so routing does not
#: move).
V4_AWQ_MAPPINGS: tuple[tuple[str, str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("attn_norm", "norm", ("attn.wq_a", "attn.wkv"), "attn.wq_a",
     ("attn.compressor.wkv", "attn.compressor.wgate", "attn.indexer.weights_proj", "attn.indexer.compressor.wkv",
      "attn.indexer.compressor.wgate")),
    ("attn.q_norm", "norm", ("attn.wq_b", "attn.indexer.wq_b"), "attn.wq_b", ()),
    ("attn.wo_a", "linear", ("attn.wo_b",), "attn.wo_b", ()),
    ("ffn_norm", "norm", ("ffn.shared_experts.w1", "ffn.shared_experts.w3", "{experts}"), "ffn.gate",
     ("ffn.gate",)),
)

#: The non-expert linears in quantization order, each with the captured input its clip search and statistics
#: use (``ffn.gate``: the MoE input); one whose input was not captured is skipped. ``wo_a`` is block diagonal
#: over ``o_groups``: clip search per group on that group's input block.
V4_AWQ_LINEARS: tuple[tuple[str, str], ...] = (
    ("attn.wq_a", "attn.wq_a"), ("attn.wkv", "attn.wq_a"), ("attn.wq_b", "attn.wq_b"),
    ("attn.indexer.wq_b", "attn.indexer.wq_b"), ("attn.wo_a", "attn.wo_a"), ("attn.wo_b", "attn.wo_b"),
    ("ffn.shared_experts.w1", "ffn.gate"), ("ffn.shared_experts.w3", "ffn.gate"),
    ("ffn.shared_experts.w2", "ffn.shared_experts.w2"),
)


class V4AwqStage(CalibStage):
    """AWQ of one V4 layer: :meth:`run` (the mappings, the non-expert linears, the expert groups)."""

    def __init__(self, cap: V4LayerCapture):
        super().__init__(cap)
        self.cur: dict[str, torch.Tensor] = {}  # module -> float32 working weight, folded so far
        self.in_scale: dict[str, torch.Tensor] = {}  # module -> the s its input is divided by
        self.x_moe: torch.Tensor | None = None  # the MoE input on the kernel device
        self.rows: dict[int, torch.Tensor] = {}  # routed expert -> its w1/w3 input rows, until it is done

    def w(self, module: str) -> torch.Tensor:
        """The working float32 weight: folded so far (a routed expert's column fold applied when first used)."""
        if module not in self.cur:
            w = self.cap.weight(module)
            if is_routed_expert(module) and module in self.in_scale:
                w = scale_columns(w, self.in_scale[module])
            self.cur[module] = w
        return self.cur[module]

    def _input(self, key: str) -> torch.Tensor:
        """The captured input ``key`` (layer-relative; ``ffn.gate``: the MoE input)."""
        return self.x_moe if key == "ffn.gate" else self.cap.input(self.cap.p + key)

    def _has_input(self, key: str) -> bool:
        return key == "ffn.gate" or self.cap.has_input(self.cap.p + key)

    def run(self) -> None:
        cap, p, dev = self.cap, self.cap.p, self.cap.dev
        self.x_moe = cap.take_moe_input().to(dev)
        for e in range(self.eng.cfg.geo.experts):
            xs = cap.take_expert_rows(e, "in")
            if xs:
                self.rows[e] = torch.cat(xs).to(dev)
        for prev, kind, linears, key, kept in V4_AWQ_MAPPINGS:
            x = self._input(key)
            members: list[tuple[str, torch.Tensor]] = []
            for lin in linears:
                if lin == "{experts}":  # every expert is folded, routed to or not
                    members += [(f"{p}ffn.experts.{e}.{k}", self.rows.get(e, x[:0]))
                                for e in range(self.eng.cfg.geo.experts) for k in ("w1", "w3")]
                elif cap.has_input(p + lin):
                    members.append((p + lin, x))
            self.smooth(p + prev, kind, x, members, [p + n for n in kept if cap.has_weight(p + n)])
        for lin, key in V4_AWQ_LINEARS:
            if self._has_input(key):
                x = self._input(key)
                qt = self.quantize_grouped(p + lin, x) if lin == "attn.wo_a" else self.quantize(p + lin, x, "dense")
                if qt is not None:
                    cap.quantized[p + lin] = qt
        cap.drop_inputs()
        self.expert_groups()

    def run_experts(self, experts: range) -> None:
        """Clip search and RTN of a group of routed experts (on their routed rows, or every token of the layer
        under ``all-tokens`` or when routed none); the group's results are spilled as one file."""
        cap = self.cap
        done: dict[str, QTensor] = {}
        for e in experts:
            pre = f"{cap.p}ffn.experts.{e}."
            xi = self.rows.pop(e, None)
            x_down = cap.take_expert_rows(e, "w2")
            pol = cap.set_expert_policy(e, 0 if xi is None else int(xi.shape[0]))
            if pol == "all-tokens" or xi is None:
                xi = self.x_moe
                xd = cap.swiglu_input(self.x_moe, cap.weight(pre + "w1"), cap.weight(pre + "w3"))
            else:
                xd = torch.cat(x_down).to(cap.dev)
            for k, x in (("w1", xi), ("w3", xi), ("w2", xd)):
                qt = self.quantize(pre + k, x, pol)
                if qt is not None:
                    done[pre + k] = qt
                self.cur.pop(pre + k, None)
        cap.quantized.put(done)

    def release(self) -> None:
        self.cur.clear()
        self.in_scale.clear()
        self.rows.clear()
        self.x_moe = None

    # -- smoothing ----------------------------------------------------------------------------------------
    def smooth(self, prev: str, kind: str, x: torch.Tensor, members: list[tuple[str, torch.Tensor]],
               extra: list[str]) -> None:
        """Search one AWQ scale for the linears ``members`` ``[(module, its input rows)]`` (all fed by
        ``prev``'s output; ``x`` the rows of the ``|x|`` statistic), the loss being the output MSE of the
        quantized ones on their own rows, and :meth:`fold` it.

        Streamed over the members, one float32 weight at a time (the ``ffn_norm`` mapping has every routed
        expert's ``w1``/``w3``): a first pass accumulates ``w_mean`` (:func:`~dsconvert.quant.awq.awq_weight_sums`,
        in member order, the sum :func:`~dsconvert.quant.awq.awq_search_scale` forms), a second computes each
        member's float output once and adds its squared error under every grid candidate to that candidate's
        float64 sum. The loss is separable (each linear on its own rows), so the sums over all members divided
        by the output elements are the MSE of the concatenated outputs that ``awq_search_scale`` takes, up to
        summation order. Routed experts are read from the source in both passes (never kept)."""
        cap, eng = self.cap, self.eng
        quant = [(m, xm) for m, xm in members if cap.spec(m, cap.weight_shape(m)) is not None]
        if not quant or x.shape[0] == 0:
            return
        spec = cap.spec(quant[0][0], cap.weight_shape(quant[0][0]))
        conv = eng.convention

        def weight(m: str) -> torch.Tensor:
            return cap.weight(m) if is_routed_expert(m) else self.w(m)

        x_mean = x.to(torch.float32).abs().mean(dim=0)  # (N,)
        total = torch.zeros(x.shape[1], dtype=torch.float32, device=cap.dev)
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
        self.fold(prev, kind, members, extra, s, ratio, errors)

    def fold(self, prev: str, kind: str, members: list[tuple[str, torch.Tensor]], extra: list[str],
             s: torch.Tensor, ratio: float, errors: list[float]) -> None:
        """Fold the scale ``s`` ``(N,)`` :meth:`smooth` found: ``prev`` (a norm weight, ``kind="norm"``, or a
        linear's output rows, ``"linear"``) ``/= s``, every member's and every kept linear of ``extra``'s columns
        ``*= s`` (routed experts' when they are processed); record the search's statistics."""
        cap = self.cap
        if kind == "norm":
            cap.replaced[prev + ".weight"] = fold_norm(self.eng.source.get(prev + ".weight"), s.cpu()).cpu()
        else:
            self.cur[prev] = fold_linear_rows(self.w(prev), s)
        for m, _ in members:
            if not is_routed_expert(m):
                self.cur[m] = scale_columns(self.w(m), s)
            self.in_scale[m] = s
        for m in extra:
            cap.replaced[m + ".weight"] = scale_columns(cap.weight(m), s).cpu()
        cap.stats["smoothing"][prev] = {"best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors,
                                        "linears": len(members) + len(extra)}

    # -- quantization -------------------------------------------------------------------------------------
    def quantize(self, module: str, x: torch.Tensor, calibration: str) -> QTensor | None:
        """Clip-search (not for ``q_*`` names, as AutoAWQ; not under ``rtn``) and RTN-quantize the folded weight
        of ``module``; ``x`` its input rows before the fold. A module the policy keeps is written folded
        (``replaced``)."""
        cap, eng = self.cap, self.eng
        w = self.w(module)
        if eng.keep_folded:
            cap.folded[module + ".weight"] = w.cpu()
        spec = cap.spec(module, w)
        if spec is None:
            if module in self.in_scale or module in self.cur:
                cap.replaced[module + ".weight"] = w.cpu()
            return None
        s = self.in_scale.get(module)
        xf = x if s is None else x / s[None, :]
        wq = w
        if calibration != "rtn" and not any(f in module.rsplit(".", 1)[-1] for f in CLIP_SKIP):
            mv = awq_search_clip(w, xf, spec, eng.convention, n_grid=eng.n_grid)
            wq = apply_clip(w, mv)
            absmax = w.abs().reshape(mv.shape[0], mv.shape[1], -1).amax(-1, keepdim=True)
            cap.stats["clip"][module] = float((mv / absmax.clamp_min(1e-30)).mean())
        qt = to_cpu(quantize(wq, spec, eng.convention, name=module))
        step = max(1, x.shape[0] // STAT_TOKENS)
        w0 = w if s is None else w / s[None, :]
        cap.stats["linears"][module] = {
            "tokens": int(x.shape[0]), "rel_output_mse": rel_mse(xf[::step], w, dequantize(qt)),
            "rtn_rel_output_mse": rel_mse(x[::step], w0, pseudo_quantize(w0, spec, eng.convention)),
            "calibration": calibration}
        return qt

    def quantize_grouped(self, module: str, x: torch.Tensor) -> QTensor | None:
        """``wo_a`` (block diagonal over ``o_groups``): clip search per group on that group's input block."""
        cap, eng, G = self.cap, self.eng, self.eng.cfg.geo.o_groups
        w = self.w(module)
        if eng.keep_folded:
            cap.folded[module + ".weight"] = w.cpu()
        spec = cap.spec(module, w)
        if spec is None:
            if module in self.cur and module in cap.stats["smoothing"]:
                cap.replaced[module + ".weight"] = w.cpu()
            return None
        r, kg = w.shape[0] // G, x.shape[1] // G
        step = max(1, x.shape[0] // STAT_TOKENS)
        parts, num, rnum, den = [], 0.0, 0.0, 0.0
        for j in range(G):
            wj, xj = w[j * r:(j + 1) * r], x[:, j * kg:(j + 1) * kg]
            qj = to_cpu(quantize(apply_clip(wj, awq_search_clip(wj, xj, spec, eng.convention, n_grid=eng.n_grid)),
                                 spec, eng.convention, name=module))
            parts.append(qj)
            n, rn, d = output_sums(xj[::step], wj, dequantize(qj), pseudo_quantize(wj, spec, eng.convention))
            num, rnum, den = num + n, rnum + rn, den + d
        cap.stats["linears"][module] = {"tokens": int(x.shape[0]), "rel_output_mse": num / den if den else 0.0,
                                        "rtn_rel_output_mse": rnum / den if den else 0.0, "calibration": "dense"}
        return cat_rows(parts)
