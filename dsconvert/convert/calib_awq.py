"""AWQ stage of :class:`~dsconvert.convert.calibrate.CalibrationEngine` (DeepSeek V2/V3), one decoder layer on
its :class:`~.calib_capture.LayerCapture`, driven by :data:`AWQ_MAPPINGS`: for each mapping (prev op -> the
linears sharing its output) search the smoothing scale ``s`` (:func:`dsconvert.quant.awq.awq_search_scale`,
inspecting the whole attention block / MoE / MLP where AutoAWQ does), fold it (norm ``/= s``, the linears'
columns ``*= s``, the router's columns ``*= s`` so routing does not drift, ``up_proj`` rows ``/= s`` for
up->down), then clip-search each linear (skipped for ``q_*`` names as in AutoAWQ) and RTN-quantize the clipped
folded weight. The MoE mapping is searched streamed (:func:`~dsconvert.quant.awq.awq_search_scale_streamed`),
its column fold applied when an expert's group is processed. docs/int-formats.md §6.

Sources: AutoAWQ ``awq/quantize/quantizer.py`` (``_search_best_scale``, ``_search_best_clip``) and
``awq/models/deepseek_v3.py`` (mappings); llm-compressor ``modifiers/awq`` (router in the balance layers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..model.mla import mla_attention
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
from ..quant.rtn import QTensor, dequantize, quantize
from .calib_base import CLIP_SKIP, STAT_TOKENS, rel_mse, to_cpu
from .calib_capture import CalibStage, LayerCapture

#: AWQ mappings for DeepSeek V2/V3 (AutoAWQ ``deepseek_v3.py`` + the router fix), in search order, as data:
#: ``(prev op, its kind, linears relative to the layer, what the search inspects)``. ``{q}`` is
#: ``q_a_proj`` or ``q_proj`` (``q_lora_rank`` null). ``{mlp_in}`` expands to every expert's and the
#: shared expert's gate/up (MoE) or the dense gate/up; ``{up}``/``{down}`` to one mapping per MLP (the
#: routed experts' when their group is processed, not for an expert under the ``rtn`` policy). A mapping
#: none of whose linears the layer has (``q_a_layernorm`` without a query LoRA) is skipped. Inspect:
#: ``attention`` the attention block's output, ``mlp`` the MLP's (the MoE's, streamed), ``linears`` the
#: concatenated outputs of the mapping's linears.
AWQ_MAPPINGS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("input_layernorm", "norm", ("self_attn.{q}", "self_attn.kv_a_proj_with_mqa"), "attention"),
    ("self_attn.q_a_layernorm", "norm", ("self_attn.q_b_proj",), "linears"),
    ("self_attn.kv_a_layernorm", "norm", ("self_attn.kv_b_proj",), "linears"),
    ("post_attention_layernorm", "norm", ("{mlp_in}",), "mlp"),
    ("{up}", "linear", ("{down}",), "linears"),
)


class AwqStage(CalibStage):
    """AWQ of one layer: :meth:`run` (the mappings, the non-expert linears, the expert groups), or
    :meth:`run_experts` alone on a rebuilt capture (:meth:`from_stage`)."""

    def __init__(self, cap: LayerCapture):
        super().__init__(cap)
        self.cur: dict[str, torch.Tensor] = {}  # module -> float32 working weight, folded so far
        self.col_scale: dict[str, torch.Tensor] = {}  # module -> the scale its columns get when first used
        self.in_scale: dict[str, torch.Tensor] = {}  # module -> s its cached input must be divided by

    @classmethod
    def from_stage(cls, cap: LayerCapture, meta: dict, tensors) -> "AwqStage":
        """The stage of a process that runs only expert groups: the pending scales of ``meta["scales"]``."""
        st = cls(cap)
        sc = {int(k.split(".", 1)[1]): t.to(cap.dev) for k, t in tensors.items() if k.startswith("scale.")}
        st.col_scale = {n: sc[j] for n, j in meta["scales"]["col"].items()}
        st.in_scale = {n: sc[j] for n, j in meta["scales"]["in"].items()}
        return st

    def scales(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"col": self.col_scale, "in": self.in_scale}

    def working_modules(self) -> Iterable[str]:
        return self.cur

    # -- weights and inputs -------------------------------------------------------------------------
    def w(self, module: str) -> torch.Tensor:
        """The float32 working weight of ``module`` on the kernel device (folded so far)."""
        t = self.cur.get(module)
        if t is None:
            t = self.cap.weight(module)
            s = self.col_scale.pop(module, None)
            if s is not None:  # the MoE smoothing's column fold, applied when the expert is processed
                t = self.cur[module] = scale_columns(t, s)
        return t

    def x_of(self, module: str) -> torch.Tensor:
        """Calibration input ``(n, N)`` float32 of ``module`` (divided by its AWQ scale if folded)."""
        x = self.cap.input_of(module)
        s = self.in_scale.get(module)
        return x if s is None else x / s[None, :]

    def _drop(self, modules: list[str]) -> None:
        for n in modules:
            self.cur.pop(n, None)
        self.cap.drop(modules)

    # -- the mappings ---------------------------------------------------------------------------------
    def _instances(self, prev: str, linears: tuple[str, ...], mlps: list[str]) -> list[tuple[str, list[str]]]:
        """``[(prev op, its linears)]`` of one :data:`AWQ_MAPPINGS` row in layer terms (``{up}``: one per MLP
        of ``mlps``)."""
        cap = self.cap
        if prev == "{up}":
            return [(f"{m}.up_proj", [f"{m}.{lin.strip('{}')}_proj" for lin in linears]) for m in mlps]
        q = "q_proj" if cap.cfg.q_lora_rank is None else "q_a_proj"
        names: list[str] = []
        for lin in linears:
            if lin == "{mlp_in}":
                names += [f"{m}.{k}" for m in cap.mlps() for k in ("gate_proj", "up_proj")]
            else:
                names.append(f"{cap.p}.{lin.format(q=q)}")
        return [(f"{cap.p}.{prev}", names)]

    def run(self) -> None:
        cap = self.cap
        dense_mlps = [m for m in cap.mlps() if cap.expert_of(m + ".down_proj") is None]
        for prev, kind, linears, inspect in AWQ_MAPPINGS:
            for prev_op, modules in self._instances(prev, linears, dense_mlps):
                if inspect == "mlp" and cap.moe:
                    self._smooth_moe(prev_op, modules)
                else:
                    self._smooth(prev_op, kind, modules, inspect)
        for n in cap.linears:
            if cap.expert_of(n) is None:
                self._quantize(n)
        cap.drop_dense_inputs()
        self.expert_groups()
        for n, t in self.cur.items():  # folded, not quantized (policy None): float, written as replaced
            if n not in cap.quantized:
                cap.replaced[n + ".weight"] = t.cpu()

    def run_experts(self, experts: range) -> None:
        """AWQ of a group of routed experts (their MoE scale is folded when first used): each expert's
        per-MLP mappings (up->down), clip search and RTN; the group's results are spilled as one file."""
        cap = self.cap
        done: dict[str, QTensor] = {}
        for e in experts:
            pre = f"{cap.p}.mlp.experts.{e}"
            if cap.expert_policy(e) != "rtn":
                for prev, kind, linears, inspect in AWQ_MAPPINGS:
                    if prev == "{up}":
                        for prev_op, modules in self._instances(prev, linears, [pre]):
                            self._smooth(prev_op, kind, modules, inspect)
            names = cap.expert_linears(e)
            for n in names:
                qt = self._quantize(n, store=False)
                if qt is not None:
                    done[n] = qt
                elif n in self.cur:  # folded, kept in float: written as replaced
                    cap.replaced[n + ".weight"] = self.cur[n].cpu()
            self._drop(names)
        cap.quantized.put(done)

    def _quantize(self, n: str, store: bool = True) -> QTensor | None:
        """Clip-search (unless skipped) and RTN-quantize the folded weight of ``n``; record its stats."""
        cap, eng = self.cap, self.eng
        spec = cap.specs[n]
        w = self.w(n)
        if eng.keep_folded:
            cap.folded[n + ".weight"] = w.cpu()
        if spec is None:
            return None
        x = self.x_of(n)
        wq = w
        if not any(f in n.rsplit(".", 1)[-1] for f in CLIP_SKIP) and cap.calibration_of(n) != "rtn":
            mv = awq_search_clip(w, x, spec, eng.convention, n_grid=eng.n_grid)
            wq = apply_clip(w, mv)
            absmax = w.abs().reshape(mv.shape[0], mv.shape[1], -1).amax(-1, keepdim=True)
            cap.stats["clip"][n] = float((mv / absmax.clamp_min(1e-30)).mean())
        qt = to_cpu(quantize(wq, spec, eng.convention, name=n))
        xs = x[:: max(1, x.shape[0] // STAT_TOKENS)]
        s_in = self.in_scale.get(n)
        w0 = w if s_in is None else w / s_in[None, :]  # the unfolded weight, for the RTN baseline
        x0 = xs if s_in is None else xs * s_in[None, :]
        cap.stats["linears"][n] = {
            "tokens": int(x.shape[0]),
            "rel_output_mse": rel_mse(xs, w, dequantize(qt)),
            "rtn_rel_output_mse": rel_mse(x0, w0, pseudo_quantize(w0, spec, eng.convention)),
            "calibration": cap.calibration_of(n)}
        if store:
            cap.quantized[n] = qt
            self.cur.pop(n, None)
            cap.drop_weight(n)
        return qt

    def _smooth(self, prev: str, kind: str, modules: list[str], inspect: str) -> None:
        """Search one AWQ scale for ``modules`` (sharing the output of ``prev``) and fold it."""
        cap = self.cap
        modules = [m for m in modules if m in cap.specs]
        quant = [m for m in modules if cap.specs[m] is not None]
        if not quant:
            return
        if inspect == "attention":
            x = cap.attention_input()
        elif inspect == "mlp":
            x = cap.mlp_input
        else:
            x = self.x_of(quant[0])
        if x.shape[0] == 0:
            return
        spec = cap.specs[quant[0]]
        ws = [self.w(m) for m in quant]
        if inspect == "linears":
            def fwd(cand):
                return torch.cat([x @ c.T for c in cand], dim=1)
        else:
            inspect_fn = self._inspect_attention if inspect == "attention" else self._inspect_mlp

            def fwd(cand):
                return inspect_fn(dict(zip(quant, cand)))
        s, ratio, errors = awq_search_scale(x, ws, fwd, spec, self.eng.convention, n_grid=self.eng.n_grid)
        del ws
        self._fold(prev, kind, modules, s, None)
        cap.stats["smoothing"][prev] = {"best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors,
                                        "linears": len(modules)}

    def _fold(self, prev: str, kind: str, modules: list[str], s: torch.Tensor, router: str | None,
              lazy: bool = False) -> None:
        """Fold ``s``: prev op, every linear of the mapping (quantized or not; ``lazy``: when first used),
        router."""
        cap = self.cap
        if kind == "norm":
            cap.replaced[prev + ".weight"] = fold_norm(cap.dense(prev + ".weight"), s).cpu()
        else:
            self.cur[prev] = fold_linear_rows(self.w(prev), s)
        for m in modules:
            if lazy:
                self.col_scale[m] = s
            else:
                self.cur[m] = scale_columns(self.w(m), s)
            self.in_scale[m] = s
        if router is not None:
            cap.replaced[router] = scale_columns(cap.dense(router), s).cpu()

    def _smooth_moe(self, prev: str, gate_up: list[str]) -> None:
        """AWQ's ``post_attention_layernorm`` mapping of a MoE layer (every expert's and the shared expert's
        gate/up), streamed: ``w_mean`` accumulated over the experts one at a time, then the MoE output of the
        float weights and of each grid candidate accumulated expert by expert, ``eng.awq_candidates``
        candidate outputs ``(T, hidden)`` at once (one more pass over the experts per chunk of candidates).
        Same numbers as :meth:`_smooth` with :meth:`_inspect_mlp` on the whole layer; only the experts in
        flight are held in float32. The columns are folded when each expert is processed; the router's
        columns now."""
        cap, eng = self.cap, self.eng
        x = cap.mlp_input
        modules = [m for m in gate_up if m in cap.specs]
        quant = [m for m in modules if cap.specs[m] is not None]
        if not quant or x.shape[0] == 0:
            return
        spec, conv = cap.specs[quant[0]], eng.convention
        qset = set(quant)
        x_mean = x.to(torch.float32).abs().mean(dim=0)  # (hidden,)
        total = torch.zeros(x.shape[1], dtype=torch.float32, device=cap.dev)
        rows = 0
        for m in quant:
            t, r = awq_weight_sums(cap.float_weight(m), spec)
            total += t
            rows += r
        w_mean = total / max(rows, 1)
        cands = list(awq_scale_candidates(x_mean, w_mean, eng.n_grid))
        mlps = cap.mlps()

        def mlp_out(pre: str, ss: list[torch.Tensor | None], outs: list[torch.Tensor]) -> None:
            """Add MLP ``pre``'s output to ``outs[j]`` with gate/up as candidate ``ss[j]`` (None: float)."""
            e = cap.expert_of(pre + ".down_proj")
            if e is not None:
                tok, wts = cap.routed(e)
                if tok.numel() == 0:
                    return
                xs = x[tok]
            else:
                xs = x
            ws = {k: cap.float_weight(f"{pre}.{k}") for k in ("gate_proj", "up_proj", "down_proj")}
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
        self._fold(prev, "norm", modules, s, f"{cap.p}.mlp.gate.weight", lazy=True)
        cap.stats["smoothing"][prev] = {
            "best_ratio": ratio, "mse_best": min(errors), "mse_grid": errors, "linears": len(modules)}

    def _inspect_attention(self, cand: dict[str, torch.Tensor]) -> torch.Tensor:
        """Attention block output ``(T_total, hidden)`` with ``cand`` weights replacing those modules."""
        cap, eng = self.cap, self.eng
        model = eng.model

        def get(name: str) -> torch.Tensor:
            mod = name[: -len(".weight")] if name.endswith(".weight") else name
            if mod in cand:
                return cand[mod].to("cpu", model.dtype)
            if mod in self.cur:
                return self.cur[mod].to("cpu", model.dtype)
            if name in cap.replaced:
                return cap.replaced[name].to(model.dtype)
            return eng.source.get(name).to(model.dtype)

        outs = []
        for x, pos in zip(cap.attention_inputs(), eng.positions):
            cos, sin = model.rope(pos)
            outs.append(mla_attention(cap.cfg, x.to(model.dtype), pos, cos, sin, model.softmax_scale, get,
                                      f"{cap.p}.self_attn").to(torch.float32))
        return torch.cat(outs)

    def _inspect_mlp(self, cand: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense MLP output ``(T, hidden)`` on the cached input with ``cand`` gate/up weights."""
        x = self.cap.mlp_input
        pre = f"{self.cap.p}.mlp"
        g = x @ cand.get(pre + ".gate_proj", self.w(pre + ".gate_proj")).T
        u = x @ cand.get(pre + ".up_proj", self.w(pre + ".up_proj")).T
        return (F.silu(g) * u) @ self.w(pre + ".down_proj").T

    def release(self) -> None:
        self.cur.clear()
        self.col_scale.clear()
        self.in_scale.clear()
