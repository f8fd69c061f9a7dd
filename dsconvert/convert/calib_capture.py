"""One decoder layer's calibration capture for :class:`~dsconvert.convert.calibrate.CalibrationEngine`
(DeepSeek V2/V3): the inputs of every linear, the routing of a MoE layer, each routed expert's token rows and
calibration choice, the expert groups, and the layer's results as the AWQ, GPTQ and SignRound stages
(:mod:`.calib_awq`, :mod:`.calib_gptq`, :mod:`.calib_signround`; SignRound runs its own forward, no capture)
fill them. The stages read the capture only through the public methods of :class:`LayerCapture`;
:class:`CalibStage` is their common part (the expert-group plumbing that :mod:`.calib_ray` talks to). docs/int-formats.md §5-§7 describe the steps; the module notes of
:mod:`dsconvert.convert.calibrate` the whole loop.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats import deepseek_v3 as v3
from ..model.moe import route
from ..quant.gptq import HessianAccumulator
from ..quant.rtn import Convention, QuantSpec
from .calib_base import STAT_TOKENS, LayerResults, expert_ranges, token_chunks

#: ``expert_policy="topk"``: an expert with too few tokens is calibrated on the tokens that route to it when
#: every token picks ``TOPK_FACTOR * num_experts_per_tok`` experts from all groups (GPTQModel's routing
#: override, restricted to the starved experts; the propagated output keeps the model's own routing).
TOPK_FACTOR = 4

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


class StreamedHessian:
    """A Linear's GPTQ Hessian accumulated from its input rows as the forward produces them, in the same
    4096-row chunks of the concatenated input that :func:`hessian` uses (so the same ``H`` bit for bit), plus
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
        """Add the buffered rows; then :attr:`H` ``(N, N)`` float32 and :attr:`sample` ``(n, N)`` are set."""
        if self._nbuf:
            self.acc.add(torch.cat(self._buf) if len(self._buf) > 1 else self._buf[0])
        self._buf, self._nbuf = [], 0
        self.sample = torch.cat(self._sample) if len(self._sample) > 1 else self._sample[0]
        self._sample = []
        self.H = self.acc.H


class LayerCapture:
    """The per-layer capture of one :meth:`CalibrationEngine.run_layer` call (dropped when it returns).

    ``eng`` is the engine (or, in a process that runs only expert groups, its settings: :meth:`from_stage`).

    Attributes (the layer's record, filled by the stages):
        quantized: :class:`~.calib_base.LayerResults` ``{module: QTensor}``.
        replaced: ``{HF tensor name: float32}`` folded float tensors (AWQ).
        folded: ``keep_folded``: every linear's folded weight before clipping/quantization (AWQ).
        stats: ``layer``, ``method``, ``tokens``, ``linears``, ``experts``, ``smoothing``, ``clip``.
        linears, specs: the layer's linears present in the source, in calibration order, and
            ``{module: QuantSpec | None}`` from the engine's policy.
        mlp_input: ``(T, hidden)`` float32 post-attention normed MLP input (after :meth:`capture`).
        attn_key: the module whose cached input is the attention input (``q_a_proj`` or ``q_proj``).
    """

    def __init__(self, eng, idx: int, *, specs: Mapping[str, QuantSpec | None] | None = None,
                 bounds: Sequence[tuple[int, int]] | None = None):
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
        self._f32: dict[str, torch.Tensor] = {}  # module -> float32 copy of the source weight
        self._xe: tuple[int, torch.Tensor] | None = None  # (expert, its routed input): one at a time
        self._inputs: dict[str, torch.Tensor] = {}  # key -> (n, N) float32 cached input
        self._streamed: dict[str, StreamedHessian] = {}  # GPTQ: Linear -> Hessian + token sample, no cache
        self._attn_in: list[torch.Tensor] = []  # per-sequence normed attention input
        self.mlp_input: torch.Tensor | None = None
        self.attn_key = f"{self.p}.self_attn.{'q_proj' if self.cfg.q_lora_rank is None else 'q_a_proj'}"
        self._routes: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._calib_rows: dict[int, torch.Tensor] = {}  # "topk" experts: rows under the raised top-k
        if specs is None:
            self.linears = self._linear_names()
            self.specs = {n: eng.policy(n, tuple(eng.source.shape(n + ".weight"))) for n in self.linears}
        else:
            self.specs = dict(specs)
            self.linears = list(self.specs)
        if bounds is None:
            t0, bounds = 0, []  # (start, end) token rows of each calibration sequence
            for pos in eng.positions:
                bounds.append((t0, t0 + int(pos.numel())))
                t0 += int(pos.numel())
        self.bounds = [tuple(b) for b in bounds]

    @classmethod
    def from_stage(cls, eng, meta: dict, tensors: Mapping[str, torch.Tensor]) -> "LayerCapture":
        """The routed-expert part of a MoE layer's capture rebuilt from :meth:`expert_stage`'s ``(meta,
        tensors)`` (a process that runs only expert groups; ``eng`` holds the settings of ``meta``)."""
        cap = cls(eng, meta["layer"], specs=meta["specs"], bounds=meta["bounds"])
        cap.moe = True
        cap.stats["experts"] = {e: {"policy": pol} for e, pol in meta["policies"].items()}
        dev = cap.dev
        cap.mlp_input = tensors["x_mlp"].to(dev)
        cap._routes = {e: (tensors[f"tok.{e}"].to(dev), None) for e in meta["policies"]}
        cap._calib_rows = {e: tensors[f"rows.{e}"].to(dev) for e in meta["policies"] if f"rows.{e}" in tensors}
        return cap

    # -- names and weights ------------------------------------------------------------------------
    def _linear_names(self) -> list[str]:
        cfg = self.cfg
        names = v3.layer_linears(self.idx, q_lora_rank=cfg.q_lora_rank, moe=self.moe,
                                 n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts)
        return [n for n in names if self.eng.source.has(n + ".weight")]

    def mlps(self) -> list[str]:
        """MLP prefixes: the experts then the shared experts (MoE), or the dense MLP."""
        return v3.mlp_prefixes(self.idx, moe=self.moe, n_routed_experts=self.cfg.n_routed_experts,
                               n_shared_experts=self.cfg.n_shared_experts)

    def expert_of(self, module: str) -> int | None:
        """The routed expert index of ``module``, None for attention, dense and shared-expert linears."""
        m = _EXPERT.search(module)
        return int(m.group(1)) if m else None

    def expert_linears(self, e: int) -> list[str]:
        """Routed expert ``e``'s gate/up/down present in the layer."""
        pre = f"{self.p}.mlp.experts.{e}"
        return [n for n in (f"{pre}.gate_proj", f"{pre}.up_proj", f"{pre}.down_proj") if n in self.specs]

    def expert_policy(self, e: int) -> str:
        """How routed expert ``e`` is calibrated: ``routed``, ``all-tokens``, ``rtn`` or ``topk``."""
        return self.stats["experts"][e]["policy"]

    def calibration_of(self, module: str) -> str:
        """``dense`` for a non-routed linear, else its expert's :meth:`expert_policy`."""
        e = self.expert_of(module)
        return "dense" if e is None else self.expert_policy(e)

    def source_weight(self, module: str) -> torch.Tensor:
        """``module``'s weight as the source holds it (dequantized, source dtype)."""
        return self.eng.source.get(module + ".weight")

    def weight(self, module: str) -> torch.Tensor:
        """``module``'s float32 source weight on the kernel device, kept until :meth:`drop_weight`."""
        t = self._f32.get(module)
        if t is None:
            t = self._f32[module] = self.source_weight(module).to(device=self.dev, dtype=torch.float32)
        return t

    def float_weight(self, module: str) -> torch.Tensor:
        """The unfolded float32 source weight (the kept copy when there is one; not kept otherwise)."""
        t = self._f32.get(module)
        return t if t is not None else self.source_weight(module).to(device=self.dev, dtype=torch.float32)

    def dense(self, name: str) -> torch.Tensor:
        """Source tensor ``name`` (full HF name) in float32 on the kernel device."""
        return self.eng.source.get(name).to(device=self.dev, dtype=torch.float32)

    def drop_weight(self, module: str) -> None:
        """Free the kept float32 copy of ``module``."""
        self._f32.pop(module, None)

    def drop(self, modules: Sequence[str]) -> None:
        """Free the float32 copies and cached inputs of ``modules`` (an expert that is done)."""
        for n in modules:
            self._f32.pop(n, None)
            self._inputs.pop(n, None)
        self._xe = None

    def drop_input(self, module: str) -> None:
        """Free the cached input of ``module`` (a down_proj that is done)."""
        self._inputs.pop(module, None)

    def drop_dense_inputs(self) -> None:
        """Free the attention / dense-MLP / shared-expert inputs once their linears are done (the experts
        only need the MLP input)."""
        self._inputs.clear()
        self._attn_in.clear()
        self._streamed.clear()

    def holds_expert_state(self) -> bool:
        """Whether any routed expert's weight copy or input is held (the groups were started here)."""
        return any(self.expert_of(n) is not None for n in (*self._f32, *self._inputs))

    # -- capture ----------------------------------------------------------------------------------
    def capture(self, chunk_tokens: int) -> None:
        """Run the float layer's attention on every sequence (hooking its Linears' inputs), ``chunk_tokens``
        tokens of whole sequences at a time, and cache the MLP input once; a dense layer's MLP runs too (its
        down_proj input). GPTQ keeps streamed Hessians instead of inputs. A MoE layer's experts are not run
        here: their inputs are recomputed a group at a time from the cached MLP input and the routing."""
        eng = self.eng
        store: dict[str, list[torch.Tensor]] = {}
        skip = (".kv_a_proj_with_mqa", ".up_proj", ".gate_proj")
        attn_key = self.attn_key

        gptq = eng.method == "gptq"
        dense_gate = f"{self.p}.mlp.gate_proj"

        def hook(name: str, x: torch.Tensor) -> None:
            if name.endswith(skip) and name != dense_gate or (self.moe and name == dense_gate):
                return
            if gptq and name != dense_gate:  # GPTQ needs only the Hessian and a token sample: no cache
                st = self._streamed.get(name)
                if st is None:
                    st = self._streamed[name] = StreamedHessian(x.shape[1], eng.num_tokens, self.dev)
                st.add(x.detach().to(device=self.dev, dtype=torch.float32))
                return
            if name == attn_key:
                self._attn_in.append(x.detach().to(torch.float32))
                return
            store.setdefault(name, []).append(x.detach().to(device=self.dev, dtype=torch.float32))

        xs = []  # the MLP inputs; the post-attention residual h' is dropped a chunk of sequences at a time
        hidden = eng.hidden_states
        for c0, c1 in token_chunks(eng.positions, chunk_tokens):
            xs += [x for _, x in eng.model.attention_blocks(self.idx, hidden[c0:c1], eng.positions[c0:c1],
                                                            on_linear=hook)]
        if self.moe:
            store[f"{self.p}.mlp.gate"] = [x.to(device=self.dev, dtype=torch.float32) for x in xs]
        else:
            eng.model.mlp_block(self.idx, xs, on_linear=hook)
        del xs
        self._inputs = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in store.items()}
        store.clear()
        if not gptq:
            self._inputs[attn_key] = torch.cat(self._attn_in).to(self.dev)
        for st in self._streamed.values():
            st.finish()
        mlp_key = f"{self.p}.mlp.gate" if self.moe else f"{self.p}.mlp.gate_proj"
        self.mlp_input = self._inputs.pop(mlp_key)  # (T, hidden) post-attention normed input
        if self.moe:
            self._route()

    def _route(self) -> None:
        """Routing of the cached MLP input as the forward computes it: per expert the token rows and the
        mixing weights; the per-expert calibration choice."""
        cfg = self.cfg
        gate = f"{self.p}.mlp.gate"
        gate_w = self.eng.source.get(gate + ".weight").to(torch.float32)  # (E, hidden)
        bias_name = gate + ".e_score_correction_bias"
        bias = self.eng.source.get(bias_name) if self.eng.source.has(bias_name) else None
        # per sequence, exactly as the forward computes it (a batched matmul could round differently)
        ws, idx = [], []
        for t0, t1 in self.bounds:
            w_s, i_s = route(cfg, F.linear(self.mlp_input[t0:t1].cpu(), gate_w), bias)  # (T_s, k) each
            ws.append(w_s)
            idx.append(i_s)
        weights, indices = torch.cat(ws).to(self.dev), torch.cat(idx).to(self.dev)  # (T, k)
        self._routes = {}
        self._calib_rows = {}
        raised = None
        for e in range(cfg.n_routed_experts):
            tok, kpos = torch.where(indices == e)
            self._routes[e] = (tok, weights[tok, kpos])
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
                    self._calib_rows[e] = rows
                    self._inputs.pop(f"{self.p}.mlp.experts.{e}.down_proj", None)  # recomputed on those rows
                else:
                    pol = "all-tokens"
            entry["policy"] = pol
            self.stats["experts"][e] = entry

    def _raised_topk(self, gate_w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Expert indices ``(T, TOPK_FACTOR * k)`` per token with top-k raised and no group limit."""
        cfg = self.cfg
        k = min(cfg.n_routed_experts, TOPK_FACTOR * cfg.num_experts_per_tok)
        wide = replace(cfg, num_experts_per_tok=k, topk_group=cfg.n_group)
        _, idx = route(wide, F.linear(self.mlp_input.cpu(), gate_w), bias)
        return idx.to(self.dev)

    def routed(self, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert ``e``'s routed token rows (int64, ascending) and their mixing weights ``(n_e,)`` (None in a
        process that runs only expert groups)."""
        return self._routes[e]

    # -- inputs -----------------------------------------------------------------------------------
    def attention_input(self) -> torch.Tensor:
        """The normed attention input ``(T, hidden)`` float32 (AWQ; cached at capture)."""
        return self._inputs[self.attn_key]

    def attention_inputs(self) -> list[torch.Tensor]:
        """The normed attention input per sequence, ``(T_s, hidden)`` float32 each (AWQ)."""
        return self._attn_in

    def _forward_down_input(self, pre: str, tok: torch.Tensor | None) -> torch.Tensor:
        """The ``down_proj`` input of MLP ``pre`` exactly as the per-sequence forward computes it:
        ``silu(x Wgᵀ) * (x Wuᵀ)`` in the compute dtype on each sequence's rows of the MLP input (``tok``: the
        routed token rows, ascending; None: every token), concatenated, ``(n, I)`` float32."""
        md = self.eng.model.dtype
        wg = self.source_weight(pre + ".gate_proj").to(md)  # (I, hidden)
        wu = self.source_weight(pre + ".up_proj").to(md)
        parts = []
        for t0, t1 in self.bounds:
            if tok is None:
                rows = self.mlp_input[t0:t1]
            else:
                sel = tok[(tok >= t0) & (tok < t1)]
                if sel.numel() == 0:  # the forward runs an expert only on sequences that route to it
                    continue
                rows = self.mlp_input[sel]
            rows = rows.cpu().to(md)  # (n_s, hidden), the forward's own values
            parts.append((F.silu(F.linear(rows, wg)) * F.linear(rows, wu)).to(device=self.dev, dtype=torch.float32))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def input_of(self, module: str) -> torch.Tensor:
        """Calibration input ``(n, N)`` float32 of ``module`` (unscaled): all tokens for attention/dense/shared
        linears; for an expert its routed tokens, or every token of the layer under the ``all-tokens`` policy
        (its ``down_proj``: the routed tokens' forward input when it has any)."""
        if module == f"{self.p}.self_attn.kv_a_proj_with_mqa":
            return self._inputs[self.attn_key]
        mlp_in = module.endswith((".gate_proj", ".up_proj"))
        e = self.expert_of(module)
        pre = module.rsplit(".", 1)[0]
        if e is None:
            if mlp_in:
                return self.mlp_input
            if module not in self._inputs:  # the shared experts' down_proj (the MoE is not run at capture)
                self._inputs[module] = self._forward_down_input(pre, None)
            return self._inputs[module]
        all_tokens = self.expert_policy(e) == "all-tokens"
        if mlp_in:
            return self.mlp_input if all_tokens else self._expert_x(e)
        if module not in self._inputs:
            if self._routes[e][0].numel():  # what the forward feeds down_proj on the routed tokens
                self._inputs[module] = self._forward_down_input(pre, self._routes[e][0])
            else:  # no routed token: from the float gate/up weights
                xs = self.mlp_input if all_tokens else self._expert_x(e)
                g = xs @ self.float_weight(pre + ".gate_proj").T
                u = xs @ self.float_weight(pre + ".up_proj").T
                self._inputs[module] = F.silu(g) * u  # (n, I)
        return self._inputs[module]

    def _expert_x(self, e: int) -> torch.Tensor:
        """The MLP input rows routed to expert ``e`` ``(n_e, hidden)`` (cached for one expert at a time)."""
        if self._xe is None or self._xe[0] != e:
            rows = self._calib_rows.get(e)
            self._xe = (e, self.mlp_input[self._routes[e][0] if rows is None else rows])
        return self._xe[1]

    def streamed_keys(self) -> list[str]:
        """The linears whose GPTQ Hessian was accumulated at capture."""
        return list(self._streamed)

    def streamed_hessian(self, key: str) -> StreamedHessian | None:
        """The streamed Hessian (``H``, ``sample``, ``n``) of linear ``key``, None if it has none."""
        return self._streamed.get(key)

    def drop_streamed(self, key: str) -> None:
        """Free linear ``key``'s streamed Hessian."""
        del self._streamed[key]

    # -- expert groups ----------------------------------------------------------------------------
    def groups(self) -> list[tuple[int, int]]:
        """The routed expert groups ``[(e0, e1), ...]`` of :attr:`expert_group` experts (none for a dense
        layer)."""
        if not self.moe:
            return []
        return expert_ranges(self.cfg.n_routed_experts or 0, self.eng.expert_group)

    def report_group(self, e0: int, e1: int) -> None:
        """Name the stage of the expert group ``e0..e1-1`` in flight."""
        self.eng.report_stage(self.idx, f"calibrating experts {e0}-{e1 - 1}")

    def expert_stage(self, scales: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[dict, dict[str, torch.Tensor]]:
        """What the routed expert groups of this MoE layer read from the driver's state, once the layer's
        input and routing are known and the non-expert linears are done: ``(meta, tensors)``; ``scales`` is
        the stage's ``{"col": {module: s}, "in": {module: s}}`` (AWQ's pending column folds and input scales).

        ``tensors`` (CPU, safetensors-ready): ``x_mlp`` the post-attention normed MLP input ``(T, hidden)``
        float32; ``tok.E`` the routed token rows of expert ``E`` (int64, ascending); ``rows.E`` the raised-top-k
        rows of a ``topk`` expert; ``scale.J`` (AWQ) the distinct MoE smoothing scales ``(hidden,)``.
        ``meta`` (plain data): ``layer``, ``method``, the expert ``policies``, the routed linears' ``specs``,
        sequence ``bounds``, the kernel settings, and which module's columns/input take which ``scale.J``.
        """
        eng = self.eng
        routed = {n for n in self.specs if self.expert_of(n) is not None}
        tensors: dict[str, torch.Tensor] = {"x_mlp": self.mlp_input.to("cpu", torch.float32).contiguous()}
        for e, (tok, _) in self._routes.items():
            tensors[f"tok.{e}"] = tok.cpu().contiguous()
        for e, rows in self._calib_rows.items():
            tensors[f"rows.{e}"] = rows.cpu().contiguous()
        ids: dict[int, int] = {}  # id(tensor) -> J
        refs: dict[str, dict[str, int]] = {"col": {}, "in": {}}
        for kind in ("col", "in"):
            for n, s in scales.get(kind, {}).items():
                if n in routed:
                    j = ids.setdefault(id(s), len(ids))
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
        """Merge one expert group run elsewhere (:func:`~.calibrate.run_expert_group`): its results, spilled in
        ``path`` (the spill layout of :class:`~.calib_base.LayerResults`), its ``stats`` (``linears``,
        ``smoothing``, ``clip``) and the folded float tensors it ``replaced``."""
        self.quantized.adopt(path, modules)
        for k in ("linears", "smoothing", "clip"):
            self.stats[k].update(stats.get(k, {}))
        self.replaced.update(replaced)

    def release(self) -> None:
        """Drop every cache of the capture (the record stays)."""
        self._f32.clear()
        self._xe = None
        self._inputs.clear()
        self._streamed.clear()
        self._attn_in.clear()
        self.mlp_input = None
        self._routes = {}
        self._calib_rows = {}


class CalibStage(ABC):
    """What the AWQ, GPTQ and SignRound stages share: the layer's :class:`LayerCapture` and the routed expert
    groups, run here one after the other or handed to the engine's ``expert_dispatch`` (:mod:`.calib_ray`),
    which calls :meth:`expert_stage`, :meth:`report_group` and :meth:`adopt_group` and runs :meth:`run_experts`
    elsewhere (:func:`~.calibrate.run_expert_group`).

    The DeepSeek-V4 stages (:mod:`.calib_v4_gptq`, :mod:`.calib_v4_awq`) are CalibStages on a
    :class:`~.calib_v4_capture.V4LayerCapture`, which has the ``eng``, ``idx``, :meth:`groups` and
    :meth:`report_group` of a capture; their engine has no ``expert_dispatch`` (None), so they never reach
    :meth:`expert_stage` / :meth:`adopt_group`.

    Attributes:
        needs_capture: whether the engine runs :meth:`LayerCapture.capture` before :meth:`run` (AWQ, GPTQ);
            False for a stage that runs its own forward on the layer (SignRound, :mod:`.calib_signround`).
    """

    needs_capture: bool = True

    def __init__(self, cap: LayerCapture):
        self.cap = cap
        self.eng = cap.eng
        self.idx = cap.idx

    @abstractmethod
    def run(self) -> None:
        """Quantize the whole layer (non-expert linears, then the expert groups)."""

    @abstractmethod
    def run_experts(self, experts: range) -> None:
        """Quantize a group of routed experts; the group's results are spilled as one file."""

    def scales(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"col": {module: s}, "in": {module: s}}``: scales the routed experts still take (AWQ)."""
        return {"col": {}, "in": {}}

    def working_modules(self) -> Iterable[str]:
        """Modules with a working (folded) weight held by the stage."""
        return ()

    def expert_groups(self) -> None:
        """:meth:`run_experts` on each routed expert group of a MoE layer here, or the groups handed to the
        engine's ``expert_dispatch``."""
        groups = self.cap.groups()
        dispatch = self.eng.expert_dispatch
        if groups and dispatch is not None:
            dispatch(self, groups)
            return
        for e0, e1 in groups:
            self.report_group(e0, e1)
            self.run_experts(range(e0, e1))

    def expert_stage(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """:meth:`LayerCapture.expert_stage` with this stage's scales.

        Raises:
            RuntimeError: a routed expert was already processed here, or ``keep_folded`` is set.
        """
        cap = self.cap
        if (cap.holds_expert_state() or any(cap.expert_of(n) is not None for n in self.working_modules())
                or self.eng.keep_folded):
            raise RuntimeError("expert groups can only be shipped before any routed expert is processed")
        return cap.expert_stage(self.scales())

    def report_group(self, e0: int, e1: int) -> None:
        """:meth:`LayerCapture.report_group`."""
        self.cap.report_group(e0, e1)

    def adopt_group(self, path: Path, modules: list[tuple[str, QuantSpec, Convention, bool]], stats: dict,
                    replaced: dict[str, torch.Tensor]) -> None:
        """:meth:`LayerCapture.adopt_group`."""
        self.cap.adopt_group(path, modules, stats, replaced)

    def release(self) -> None:
        """Drop the stage's working state."""
