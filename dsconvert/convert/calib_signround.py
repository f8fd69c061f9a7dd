"""``quantize --method autoround``: SignRound (:mod:`dsconvert.quant.signround`) on each DeepSeek-V2/V3 decoder
layer: :class:`SignRoundStage`, the stage :class:`~dsconvert.convert.calibrate.CalibrationEngine` runs
without a capture (its own differentiable forward) where AWQ/GPTQ capture first.

Per layer ``i`` (input: the residual stream of the calibration sequences after the *quantized* layers
``0..i-1``, auto-round's ``enable_quanted_input``):

1. **Target.** The float layer's output on the *float* model's residual stream
   (:attr:`CalibrationEngine.reference_hidden`, advanced here layer by layer; auto-round's ``reference_output``
   becoming the next block's input), one ``(T_s, hidden)`` float32 tensor per sequence. The trial outputs are
   computed on the quantized stream, so a layer also learns to correct the error of the layers before it.
2. **Attention, shared expert / dense MLP.** Their linears are optimized jointly on the MSE between the layer
   output with the trial weights and the target: the differentiable forward is the reference forward
   (``ReferenceModel.layer_forward_many``) over a weight source that serves the trial quantize-dequantized
   weights, the routed experts held at their RTN values and the router kept in float. A sample is one
   calibration sequence; ``batch_size`` of them per iteration.
3. **Routed experts in groups** (MoE layers; :attr:`CalibrationEngine.expert_group` at a time, the others at
   their current quantized values: learned for earlier groups, RTN for later ones): with the attention and
   shared expert now fixed at their learned values, the post-attention residual, the MLP input and the
   routing are computed once; per iteration only the group's experts run, on their routed tokens of the
   batch, and the loss is the same layer-output MSE. Only the group's float weights and parameters are held.

Source: W. Cheng et al. arXiv 2309.05516; Intel auto-round (``AutoRound.quant_block``: block output MSE,
``enable_quanted_input``, defaults).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import ReferenceModel
from ..model.layers import swiglu_mlp
from ..model.moe import route, routed_expert_output
from ..quant.rtn import QTensor, dequantize, quantize
from ..quant.signround import DEFAULT_BATCH, DEFAULT_ITERS, SignRoundWeight, signround
from .calib_capture import CalibStage

__all__ = ["SignRoundOptions", "SignRoundStage"]


@dataclass(frozen=True)
class SignRoundOptions:
    """``--method autoround`` settings: ``iters`` per stage, ``lr`` (None: ``1 / iters``), ``batch_size``
    (calibration sequences per iteration), ``seed`` (batch order), ``minmax`` (learn the clipping factors)."""

    iters: int = DEFAULT_ITERS
    lr: float | None = None
    batch_size: int = DEFAULT_BATCH
    seed: int = 0
    minmax: bool = True


class _TrialSource:
    """A weight source serving ``subs`` (``{HF weight name: tensor}``, may require grad) over ``base``; the routed
    experts' quantized linears not in ``subs`` are served at their RTN values (``rtn(name)``, computed when read,
    never all held)."""

    def __init__(self, base, rtn):
        self.base = base
        self.config = base.config
        self.rtn = rtn
        self.subs: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return name in self.subs or self.base.has(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.subs.get(name)
        if t is None:
            t = self.rtn(name)
        return t if t is not None else self.base.get(name)


def _to_cpu(qt: QTensor) -> QTensor:
    return QTensor(qt.q.cpu(), qt.scale.cpu(), None if qt.zero is None else qt.zero.cpu(), qt.spec, qt.convention)


class SignRoundStage(CalibStage):
    """SignRound of one layer (the module docstring's steps) on a :class:`~.calib_capture.LayerCapture` that is
    not captured (:attr:`needs_capture` False: the stage runs its own differentiable forward). :meth:`run` fills
    ``cap.quantized`` (each expert group spilled as one file, like GPTQ's) and ``cap.stats`` (``linears``,
    ``experts``, ``autoround``); the routed expert groups go through the shared
    :meth:`~.calib_capture.CalibStage.expert_groups` loop, run here one after the other (they read the layer's
    output target and the fixed part of its output, so they are never shipped: :meth:`expert_stage` refuses).

    ``opts``: the :class:`SignRoundOptions` (default: the engine's ``signround``, else the defaults).
    """

    needs_capture = False

    def __init__(self, cap, opts: SignRoundOptions | None = None):
        super().__init__(cap)
        self.opts = opts or getattr(self.eng, "signround", None) or SignRoundOptions()
        self._stage_stats: list[dict] = []
        self._model: ReferenceModel | None = None
        self._hidden: list[torch.Tensor] = []
        self._target: list[torch.Tensor] = []
        self._routed: set[str] = set()
        self._xs: list[torch.Tensor] = []  # per sequence: the MLP input (stage 3)
        self._routes: list = []  # per sequence: route() of the MLP input
        self._fixed: list[torch.Tensor] = []  # per sequence: the output outside the group in flight

    def run(self) -> None:
        """Quantize every linear of the layer with SignRound (module docstring, steps 1-3).

        Raises:
            UsageError: from the kernel (bad iteration count or learning rate).
        """
        lay, opts = self.cap, self.opts
        eng, cfg = lay.eng, lay.cfg
        dev, dtype = lay.dev, eng.model.dtype
        conv = eng.convention
        self._hidden = hidden = [h.to(dev) for h in eng.hidden_states]
        positions = eng.positions
        self._routed = routed = {n for n in lay.specs if lay.expert_of(n) is not None and lay.specs[n] is not None}

        def rtn(name: str) -> torch.Tensor | None:
            mod = name[: -len(".weight")]
            if mod not in routed:
                return None
            w = eng.source.get(name).to(device=dev, dtype=torch.float32)
            return dequantize(quantize(w, lay.specs[mod], conv, name=mod)).to(dtype)

        self._model = model = ReferenceModel(_TrialSource(eng.source, rtn), dtype, config=cfg, device=dev)
        ref_in = eng.reference_hidden
        if ref_in is None:  # layer 0 (the embeddings: both streams are equal), or a state saved without it
            ref_in = hidden
            target_kind = "float layer, float input" if lay.idx == 0 else "float layer, quantized input"
        else:
            ref_in = [h.to(dev) for h in ref_in]
            target_kind = "float layer, float input"
        with torch.no_grad():
            # the float layer: its own source (``model``'s serves the routed experts at RTN)
            float_layer = ReferenceModel(eng.source, dtype, config=cfg, device=dev)
            self._target = [y.to(torch.float32)
                            for y in float_layer.layer_forward_seqwise(lay.idx, ref_in, positions)]
            del float_layer
        del ref_in
        # the next layer's float input
        eng.reference_hidden = [t.to(eng.hidden_states[0].dtype).cpu() for t in self._target]
        self._stage_stats = []

        # -- attention + shared expert / dense MLP, the routed experts at RTN -----------------------------
        dense = [n for n in lay.linears if n not in routed and lay.specs[n] is not None]
        if dense:
            eng.report_stage(lay.idx, "autoround attention" + ("+shared expert" if lay.moe else "+mlp"))
            ws = {n: self._sr_weight(n) for n in dense}

            def loss_dense(qdq: Mapping[str, torch.Tensor], batch: list[int]) -> torch.Tensor:
                model.source.subs = {n + ".weight": q.to(dtype) for n, q in qdq.items()}
                outs = model.layer_forward_many(lay.idx, [hidden[s] for s in batch], [positions[s] for s in batch])
                return self._mse(outs, batch)

            done = self._signround("attention+" + ("shared" if lay.moe else "mlp"), ws, loss_dense)
            for n in dense:
                lay.quantized[n] = _to_cpu(done[n])
            model.source.subs = {n + ".weight": dequantize(qt).to(device=dev, dtype=dtype) for n, qt in done.items()}
            del ws, done
        if lay.moe:
            self._start_experts()
            self.expert_groups()
        for n in lay.linears:
            e = lay.expert_of(n)
            lay.stats["linears"][n] = {
                "tokens": eng.num_tokens if e is None else lay.stats["experts"][e]["tokens_routed"],
                "calibration": "dense" if e is None else lay.stats["experts"][e]["policy"]}
        lay.stats["autoround"] = {"iters": opts.iters, "lr": opts.lr if opts.lr is not None else
                                  (1.0 / opts.iters if opts.iters else 0.0), "batch_size": opts.batch_size,
                                  "seed": opts.seed, "minmax": opts.minmax, "target": target_kind,
                                  "stages": self._stage_stats}

    def _sr_weight(self, n: str) -> SignRoundWeight:
        w = self.eng.source.get(n + ".weight").to(device=self.cap.dev, dtype=torch.float32)
        return SignRoundWeight(w, self.cap.specs[n], self.eng.convention, minmax=self.opts.minmax, name=n)

    def _signround(self, stage: str, ws: dict[str, SignRoundWeight], loss_fn) -> dict[str, QTensor]:
        """:func:`~dsconvert.quant.signround.signround` on ``ws``, its figures appended to the stage stats."""
        opts = self.opts
        t0 = time.perf_counter()
        res = signround(ws, loss_fn, len(self._hidden), iters=opts.iters, lr=opts.lr, batch_size=opts.batch_size,
                        seed=opts.seed)
        self._stage_stats.append({"stage": stage, "linears": len(ws), "loss_rtn": res.loss_init,
                                  "loss_best": res.loss_best, "best_iter": res.best_iter,
                                  "seconds": round(time.perf_counter() - t0, 3)})
        return res.quantized

    def _mse(self, outs: list[torch.Tensor], batch: list[int]) -> torch.Tensor:
        """Mean squared error of the layer outputs ``outs`` (one per sequence of ``batch``) vs the target."""
        target, positions = self._target, self.eng.positions
        num = sum(((o.to(torch.float32) - target[s]) ** 2).sum() for o, s in zip(outs, batch))
        return num / (sum(int(positions[s].numel()) for s in batch) * self.cap.cfg.hidden_size)

    def _cast(self, name: str) -> torch.Tensor:
        """Weight ``name`` as the trial source serves it (learned attention / shared, routed experts at their
        current values), in the compute dtype on the kernel device."""
        return self._model.source.get(name).to(device=self.cap.dev, dtype=self._model.dtype)

    def _add(self, e: int, get, outs: list[torch.Tensor], sign: float, seqs=None, inplace: bool = True):
        """Add ``sign`` x expert ``e``'s weighted output (weights from ``get``) to ``outs[j]`` for sequence
        ``seqs[j]`` (default: all); returns the new tensors (``inplace=False``: out of place, for autograd)."""
        xs, p = self._xs, f"{self.cap.p}.mlp"
        res = []
        for o, s in zip(outs, seqs if seqs is not None else range(len(xs))):
            w, idx = self._routes[s]
            if bool((idx == e).any()):
                tok, y = routed_expert_output(xs[s], w, idx, e, get, p)
                y = y.to(torch.float32) * sign
                o = o.index_add_(0, tok, y) if inplace else o.index_add(0, tok, y)
            res.append(o)
        return res

    @torch.no_grad()
    def _start_experts(self) -> None:
        """Stage 3 of the module docstring, before the groups: with the attention and shared expert fixed at
        their learned values, the MLP input and routing of each sequence and the fixed part of its output
        (post-attention residual, shared expert, every routed expert at RTN) as one ``(T_s, hidden)`` float32
        tensor; a group's contribution is taken out of it while the group trains (:meth:`run_experts`) and its
        learned contribution put back after. Fills the layer's ``stats["experts"]``."""
        lay, cfg = self.cap, self.cap.cfg
        src = self._model.source  # serves the learned attention / shared weights, routed experts at RTN
        dev = lay.dev
        p = f"{lay.p}.mlp"
        halves = self._model.attention_blocks(lay.idx, self._hidden, self.eng.positions)
        self._xs = xs = [x for _, x in halves]
        gate_w = src.get(f"{p}.gate.weight").to(device=dev, dtype=torch.float32)
        bias_name = f"{p}.gate.e_score_correction_bias"
        bias = src.get(bias_name).to(dev) if src.has(bias_name) else None
        # per sequence, as the forward
        self._routes = [route(cfg, F.linear(x.to(torch.float32), gate_w), bias) for x in xs]
        self._fixed = fixed = [h.to(torch.float32) for h, _ in halves]
        if cfg.n_shared_experts:
            for f, x in zip(fixed, xs):
                f += swiglu_mlp(x, self._cast, f"{p}.shared_experts", None).to(torch.float32)
        del halves
        for e in range(cfg.n_routed_experts):
            tok = sum(int((idx == e).sum()) for _, idx in self._routes)
            lay.stats["experts"][e] = {"tokens_routed": tok, "policy": "routed" if tok else "rtn"}
            self._add(e, self._cast, fixed, 1.0)  # every expert at RTN to start with

    @torch.no_grad()
    def run_experts(self, experts: range) -> None:
        """SignRound of a group of routed experts on the layer-output MSE, the other experts at their current
        values (learned for earlier groups, RTN for later ones); results spilled as one group."""
        lay, dtype, dev = self.cap, self._model.dtype, self.cap.dev
        fixed, cast = self._fixed, self._cast
        for e in experts:
            self._add(e, cast, fixed, -1.0)
        names = [n for e in experts for n in lay.expert_linears(e) if n in self._routed]
        ws = {n: self._sr_weight(n) for n in names}

        def loss_group(qdq: Mapping[str, torch.Tensor], batch: list[int]) -> torch.Tensor:
            def get(name: str) -> torch.Tensor:
                q = qdq.get(name[: -len(".weight")])
                return q.to(dtype) if q is not None else cast(name)

            outs = [fixed[s] for s in batch]
            for e in experts:
                outs = self._add(e, get, outs, 1.0, batch, inplace=False)
            return self._mse(outs, batch)

        e0, e1 = experts.start, experts.stop
        done = self._signround(f"experts {e0}-{e1 - 1}", ws, loss_group) if names else {}
        lay.quantized.put({n: _to_cpu(done[n]) for n in names})
        learned = {n + ".weight": dequantize(qt).to(device=dev, dtype=dtype) for n, qt in done.items()}

        def get_learned(name: str) -> torch.Tensor:
            return learned[name] if name in learned else cast(name)

        for e in experts:
            self._add(e, get_learned, fixed, 1.0)
        del ws, done

    def report_group(self, e0: int, e1: int) -> None:
        """Name the SignRound stage of the expert group ``e0..e1-1`` in flight."""
        self.eng.report_stage(self.idx, f"autoround experts {e0}-{e1 - 1}")

    def expert_stage(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Refused: a SignRound expert group reads the layer's output target and the fixed part of its output.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("autoround expert groups run where the layer's output target is held; they cannot "
                           "be shipped")

    def release(self) -> None:
        """Drop the trial model, the streams, the target, the routing and the fixed output."""
        self._model = None
        self._hidden, self._target, self._xs, self._routes, self._fixed = [], [], [], [], []
        self._routed = set()


def estimate_signround_bytes(cfg, n_tokens: int, *, expert_group: int, batch_tokens: int | None = None,
                             seq_len: int | None = None, act_bytes: int = 4, weight_bytes: int = 2,
                             chunk_tokens: int = 16384) -> int:
    """Estimated peak memory (bytes, on top of the interpreter) of :class:`SignRoundStage` plus the engine's
    propagate forward, over every decoder layer kind of ``cfg``, for ``n_tokens`` (T) calibration tokens,
    ``batch_tokens`` per iteration (default T) in sequences of at most ``seq_len`` tokens (default
    ``batch_tokens``). The largest of:

    * the attention (+ shared expert / dense MLP) stage: the quantized and the float model's residual streams
      (``act_bytes``), the float target
      (T x hidden float32), the layer's non-expert source weights (``weight_bytes``), per trained linear eight
      float32 ``(M, N)`` (weight, ``v``, its gradient and best copy, the trial weight, its gradient and two
      temporaries), every routed expert's RTN weight in float32 (the batch's forward holds them for the
      backward), and the batch's forward and backward activations (per token: the attention projections and
      ``num_heads x seq_len`` scores three times, the MLP intermediates, all in float32, twice for the gradients).
    * the routed expert stage: stream, target, MLP input and the fixed part of the output (T x hidden each),
      ``expert_group`` experts' eight float32 copies of their three linears, and their routed rows' activations.
    * propagate: the stream, one chunk's four ``(chunk, hidden)`` intermediates, the largest dequantized weight.

    It leaves out the routing tables (``T x k``) and the interpreter; the figure is an estimate, not a bound.

    Returns:
        bytes (int).
    """
    T, H = int(n_tokens), cfg.hidden_size
    Tb = T if batch_tokens is None else min(T, int(batch_tokens))
    S = Tb if seq_len is None else min(Tb, int(seq_len))
    nh = cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    kv = cfg.kv_lora_rank
    attn = ([(cfg.q_lora_rank, H), (nh * qk, cfg.q_lora_rank)] if cfg.q_lora_rank else [(nh * qk, H)])
    attn += [(kv + cfg.qk_rope_head_dim, H), (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), kv),
             (H, nh * cfg.v_head_dim)]
    attn_params = sum(m * n for m, n in attn)
    a = act_bytes
    stream = 2 * a * T * H + 4 * T * H  # the quantized and the float residual streams + the float target
    per_tok_attn = 6 * H + sum(m for m, _ in attn) + 3 * nh * S
    peaks = []
    for moe in {cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)}:
        if moe:
            E, I, k = cfg.n_routed_experts or 0, cfg.moe_intermediate_size, cfg.num_experts_per_tok or 0
            Is = I * (cfg.n_shared_experts or 0)
            dense_params = attn_params + 3 * Is * H
            trained = dense_params
            experts_rtn = 4 * E * 3 * I * H
            per_tok_mlp = 3 * Is + k * (3 * I + H) + E
            G = max(1, min(expert_group, E))
            group = stream + 4 * T * H + a * T * H + weight_bytes * (dense_params + E * H) \
                + G * 8 * 4 * 3 * I * H + 2 * 4 * Tb * k * (3 * I + 2 * H)
            biggest = max(max(m * n for m, n in attn), 3 * I * H)
        else:
            I = cfg.intermediate_size
            dense_params = trained = attn_params + 3 * I * H
            experts_rtn = 0
            per_tok_mlp = 3 * I
            group = 0
            biggest = max(max(m * n for m, n in attn), 3 * I * H)
        dense = stream + weight_bytes * dense_params + 8 * 4 * trained + experts_rtn \
            + 2 * 4 * Tb * (per_tok_attn + per_tok_mlp)
        c = min(T, chunk_tokens)
        propagate = a * T * H + 4 * a * c * H + weight_bytes * dense_params + 4 * biggest
        peaks.append(max(dense, group, propagate))
    return int(max(peaks)) if peaks else 0
