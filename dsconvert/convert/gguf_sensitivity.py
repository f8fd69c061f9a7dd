"""``dsconvert gguf --target-size`` (``--sensitivity forward``): each quantizable tensor's sensitivity measured
with the reference forward (:mod:`dsconvert.model`) on the original checkpoint, layer by layer.

Definition. Let ``h_L`` be the residual stream entering decoder layer ``L`` on the calibration windows (the clean
forward: every earlier layer unquantized) and ``y_L = layer_L(h_L)`` its output, both ``[tokens, hidden]``. For a
tensor ``t`` of layer ``L`` and a candidate ggml type ``q``, ``y_L(t <- q)`` is that layer's output with only
``t`` replaced by ``dequantize(quantize_q(t))`` (the export's own quantizer, :func:`~.gguf_encode.encode` +
:func:`dsconvert.quant.ggml.dequantize`, with the ``--imatrix`` weights when given), everything else as released.
The sensitivity is the relative change of the layer output, summed over every calibration token::

    s(t, q) = sum_tok ||y_L(t <- q) - y_L||^2 / sum_tok ||y_L||^2

The denominator is the energy of the layer's output (the residual stream after ``L``), the same for every
tensor of the layer, so a figure says how much of the stream one tensor's quantization disturbs, and layers
with a larger stream are not favoured. Per kind:

* attention (``attn_q_a``, ``attn_q_b``/``attn_q``, ``attn_kv_a_mqa``, ``attn_k_b``, ``attn_v_b``,
  ``attn_output``): exact, the whole layer rerun (the MoE included: the disturbed attention moves the router's
  input). ``attn_k_b``/``attn_v_b`` are quantized as written (per head, as the file holds them) and fused back
  into ``kv_b_proj`` with the other half unchanged (:func:`~dsconvert.formats.gguf_deepseek2.fuse_kv_b`);
* dense and shared-expert ``ffn_{gate,up,down}``: exact; only the MLP term of the output changes;
* routed experts (``ffn_{gate,up,down}_exps``, one stacked tensor): the routing is unchanged (the router reads
  the clean input), so the output change is ``D = sum_e w_e (expert_e'(x) - expert_e(x))`` over the perturbed
  experts. Quantizing all experts at every type is too dear at the real size (256 of them per layer), so a
  sample ``S`` of up to :data:`EXPERT_SAMPLE` experts is perturbed: the experts that received a calibration
  token, spread evenly over their index range. ``||D_S||^2`` is scaled by ``A / A_S`` (``A``: the layer's
  expert assignments, tokens x ``num_experts_per_tok``; ``A_S``: those of the sample), the first-order
  estimate of the whole tensor's error: the error of independently quantized experts adds over experts, so
  the error per routed assignment is taken as the sample's. An approximation (an expert outside the sample may
  be more or less sensitive); the report lists the sampled expert ids of each layer;
* ``token_embd``: the relative error of the first layer's input, ``sum_tok ||E_q[id] - E[id]||^2 /
  sum_tok ||E[id]||^2`` (only the rows of tokens in the windows are quantized: ggml quantizes row by row, so
  those rows are exactly the file's);
* ``output`` (lm_head): the relative error of the logits, ``sum_tok ||z_q - z||^2 / sum_tok ||z||^2`` with
  ``z = W rms_norm(h_final)``, in row chunks of :data:`HEAD_ROWS`.

Every layer is measured from the clean stream ``h_L`` (errors do not compound across layers), and the file's
error is taken as the sum of ``s`` over its tensors (:mod:`dsconvert.quant.bit_alloc` then chooses): a
first-order model, like the weight-error proxy it replaces, but measured on the real activations, attention and
routing, and comparable across kinds.

Weights: served as the export quantizes them (an FP8 weight as the exact float32 product ``fp32(w) * scale``;
BF16 as stored), run in float32. Memory: one layer's dense weights and one routed expert at a time (the layer's
tensors are cached, experts are not: :class:`~.validate.LayerCachedSource`), the calibration stream
``[windows * seq_len, hidden]`` float32, and, while a layer is measured, the attention output, MLP input and MLP
output of every attention variant (``3 x variants x tokens x hidden`` float32; 3 x 36 x 512 x 7168 x 4 B ~ 1.6 GB
at the V3 size with the defaults), so each routed expert is read once per layer (:func:`estimate_peak_bytes`:
~5.6 GiB in all there). DeepSeek V2/V3 (``deepseek2`` GGUF) only.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from ..formats import gguf_deepseek2 as g2
from ..formats.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..model.forward import ReferenceModel
from ..model.layers import rms_norm, swiglu_mlp
from ..model.moe import route, routed_expert_output
from ..quant import ggml
from ..units import bytes_fields
from .calib_data import calibration_ids
from .gguf_encode import encode, rows as _rows
from .progress import ByteProgress
from .weights import LayerCachedSource

#: routed experts perturbed per stacked expert tensor (:func:`expert_sample`)
EXPERT_SAMPLE = 8
#: ``output.weight`` rows quantized and multiplied at a time
HEAD_ROWS = 16384
#: calibration windows and tokens per window of the measurement (``--sensitivity-samples``/``--sensitivity-seq-len``)
DEFAULT_SAMPLES = 4
DEFAULT_SEQ_LEN = 128
_CHUNK = 64 * 2**20  # float32 bytes per read chunk of an FP8 weight


class _ExactSource:
    """The HF-named tensors of ``ck`` as the export quantizes them: FP8 as the exact float32 product (the export's
    :func:`~.gguf_encode.rows`), other dtypes as stored. A :class:`~dsconvert.model.WeightSource`."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.config = ck.config

    def has(self, name: str) -> bool:
        return name in self.ck.tensors and not self.ck.is_scale(name)

    def get(self, name: str) -> torch.Tensor:
        if not self.has(name):
            raise KeyError(f"{self.ck.root}: no tensor {name!r}")
        if self.ck.entry(name).dtype != "F8_E4M3":
            return self.ck.read(name)
        return torch.cat(list(_rows(self.ck, name, _CHUNK)))


class _Overlay:
    """``inner`` with some tensors replaced (``over``: HF name -> tensor): how one tensor is perturbed."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self.over: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return name in self.over or self.inner.has(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.over.get(name)
        return self.inner.get(name) if t is None else t


def qdq(x: torch.Tensor, qtype: str, importance: np.ndarray | None = None, native=None,
        threads: int = 1) -> torch.Tensor:
    """Rows ``x`` (float, ``[R, ne0]``) quantized to ggml ``qtype`` by the export's quantizer
    (:func:`~.gguf_encode.encode`, importance weights float32 ``[ne0]`` when given) and dequantized: float32
    ``[R, ne0]``, the values the file holds."""
    x = x.to(torch.float32).contiguous()
    raw = encode(x, qtype, torch.device("cpu"), importance, native, threads)
    return ggml.dequantize(torch.from_numpy(raw), qtype, tuple(x.shape))


def expert_sample(counts: torch.Tensor, k: int = EXPERT_SAMPLE) -> list[int]:
    """Up to ``k`` expert ids spread evenly over those with a token: ``hit[i * len(hit) // m]``, ``i < m =
    min(k, len(hit))``, for the sorted ids ``hit`` with ``counts > 0`` (``counts``: int ``[n_expert]`` routed
    tokens per expert); ascending, empty when no expert has a token."""
    hit = torch.nonzero(counts > 0).flatten().tolist()
    m = min(k, len(hit))
    return [hit[i * len(hit) // m] for i in range(m)]


def estimate_peak_bytes(cfg: dict, variants: int, num_samples: int, seq_len: int) -> int:
    """Peak RAM of :func:`forward_sensitivity` in bytes: ``imatrix``'s (one layer's float32 weights, one expert, the
    stream, attention scores; :func:`~.imatrix.estimate_peak_bytes`) plus, per attention variant (``variants``:
    the most tensor x type pairs of one layer's attention), its attention output, MLP input and MLP output
    (``3 x tokens x hidden`` float32), plus one :data:`HEAD_ROWS` chunk of ``output.weight`` (three float32 copies)
    and its logits (two)."""
    from .imatrix import estimate_peak_bytes as base

    h, tokens = int(cfg["hidden_size"]), num_samples * seq_len
    return (base(cfg, num_samples, seq_len) + 3 * variants * tokens * h * 4
            + 3 * HEAD_ROWS * h * 4 + 2 * tokens * HEAD_ROWS * 4)


def _sq(x: torch.Tensor) -> float:
    return float(x.to(torch.float64).pow(2).sum())


def forward_sensitivity(ck: Checkpoint, plan: g2.GGUFPlan, candidates: dict[str, list[str]],
                        importance: dict[str, np.ndarray], *, num_samples: int = DEFAULT_SAMPLES,
                        seq_len: int = DEFAULT_SEQ_LEN, progress: bool | None = False, native=None,
                        threads: int = 1) -> tuple[dict[str, dict[str, float]], dict]:
    """``s(t, q)`` (module notes) of every tensor ``t`` of ``candidates`` at each of its types, over
    ``num_samples`` windows of ``seq_len`` tokens of the bundled calibration text (never the evaluation text).

    Args:
        ck: a DeepSeek V2/V3 checkpoint (FP8 release or BF16).
        plan: its ``deepseek2`` GGUF plan; the tensors of ``candidates`` are looked up there.
        candidates: GGUF name (``token_embd.weight``, ``output.weight``, ``blk.{L}.*``) -> the ggml types to
            measure it at.
        importance: GGUF name -> float32 ``[n_mat, ne0]`` ``--imatrix`` weights (row ``i``: expert or head ``i``;
            one row for a 2-D tensor); a name absent is quantized without weights.
        progress: stderr progress (:class:`~.progress.ByteProgress`, ``sensitivity: ... | layer 3/61``).
        native, threads: the ggml library and threads the quantizer uses (:func:`~.gguf_encode.encode`).

    Returns:
        (``{name: {type: s}}`` with ``s`` float >= 0, dimensionless; a record: calibration data (name, windows
        sha256, sequences, tokens), ``expert_sample`` (``blk.{L}`` -> sampled expert ids), ``measure`` per name
        (``layer_output``, ``expert_sample``, ``layer0_input``, ``logits``), ``peak_memory_estimate``
        (:func:`estimate_peak_bytes`), ``seconds``).

    Raises:
        UnsupportedError (exit 3): a DeepSeek-V4 checkpoint, or a tensor of ``candidates`` this measurement has
            no rule for.
        UsageError (exit 2): the calibration text yields no window of at least 2 tokens.
        KeyError: a name of ``candidates`` that ``plan`` does not hold.
    """
    if ck.v4 is not None:
        raise UnsupportedError("forward sensitivity: DeepSeek-V4 is not measured by the reference forward yet",
                               hint="use --sensitivity weights")
    t0 = time.perf_counter()
    by_name = {t.name: t for t in plan}
    cfg_n = int(ck.config["num_hidden_layers"])
    per_layer: dict[int, list[g2.GGUFTensorPlan]] = {}
    for n in candidates:
        t = by_name[n]
        if t.bid is None and n not in ("token_embd.weight", "output.weight"):
            raise UnsupportedError(f"forward sensitivity: no rule for {n}", hint="use --sensitivity weights")
        if t.bid is not None:
            per_layer.setdefault(t.bid, []).append(t)
    ids, record = calibration_ids(ck, None, num_samples, seq_len)
    variants = max((sum(len(candidates[t.name]) for t in ts if _kind(t) == "attn") for ts in per_layer.values()),
                   default=0)
    peak = estimate_peak_bytes(ck.config, variants, len(ids), max(len(s) for s in ids))
    inner = _ExactSource(ck)
    src = _Overlay(LayerCachedSource(inner))
    model = ReferenceModel(src, torch.float32)
    out: dict[str, dict[str, float]] = {}
    measure: dict[str, str] = {}
    sampled: dict[str, list[int]] = {}

    def q_of(name: str, x: torch.Tensor, q: str, i: int = 0) -> torch.Tensor:
        imp = importance.get(name)
        return qdq(x, q, None if imp is None else imp[i], native, threads)

    seqs = [torch.tensor(s, dtype=torch.long) for s in ids]
    pos = [torch.arange(len(s)) for s in ids]
    with ByteProgress(cfg_n, "sensitivity", unit="layers", enabled=progress) as prog, torch.no_grad():
        hs = [model.embed(s) for s in seqs]
        if "token_embd.weight" in candidates:
            out["token_embd.weight"] = _embedding(src, by_name["token_embd.weight"], seqs,
                                                  candidates["token_embd.weight"], q_of)
            measure["token_embd.weight"] = "layer0_input"
        for layer in range(cfg_n):
            prog.describe(f"layer {layer + 1}/{cfg_n}", boundary=True)
            hs, errs, meas, eids = _layer(model, src, layer, hs, pos, per_layer.get(layer, []), candidates, q_of)
            out.update(errs)
            measure.update(meas)
            if eids is not None:
                sampled[f"blk.{layer}"] = eids
            prog.advance(1)
        if "output.weight" in candidates:
            out["output.weight"] = _head(inner, model, by_name["output.weight"], hs, candidates["output.weight"],
                                         q_of)
            measure["output.weight"] = "logits"
    return out, {"calibration": record, "expert_sample": sampled, "measure": measure,
                 "peak_memory_estimate": bytes_fields(peak), "seconds": round(time.perf_counter() - t0, 3)}


def _embedding(src: _Overlay, t: g2.GGUFTensorPlan, seqs: list[torch.Tensor], cands: list[str], q_of
               ) -> dict[str, float]:
    """``token_embd``'s ``s``: the relative error of the first layer's input over the calibration tokens."""
    ids = torch.cat(seqs)
    uniq, inv = torch.unique(ids, return_inverse=True)
    rows = src.get(t.sources[0])[uniq].to(torch.float32)  # [U, hidden]
    den = _sq(rows[inv])
    return {q: _sq((q_of(t.name, rows, q) - rows)[inv]) / den if den > 0 else 0.0 for q in cands}


def _head(inner: _ExactSource, model: ReferenceModel, t: g2.GGUFTensorPlan, hs: list[torch.Tensor],
          cands: list[str], q_of) -> dict[str, float]:
    """``output``'s ``s``: the relative error of the logits ``W rms_norm(h_final)``, ``HEAD_ROWS`` rows of ``W``
    at a time (read as the export reads them)."""
    x = rms_norm(torch.cat(hs).to(torch.float32), inner.get("model.norm.weight").to(torch.float32),
                 model.cfg.rms_norm_eps)  # [tokens, hidden]
    num = dict.fromkeys(cands, 0.0)
    den = 0.0
    for w in _rows(inner.ck, t.sources[0], HEAD_ROWS * 4 * x.shape[1]):
        w = w.to(torch.float32)
        z = F.linear(x, w)  # [tokens, rows]
        den += _sq(z)
        for q in cands:
            num[q] += _sq(F.linear(x, q_of(t.name, w, q)) - z)
    return {q: num[q] / den if den > 0 else 0.0 for q in cands}


def _kind(t: g2.GGUFTensorPlan) -> str:
    """``attn`` (rerun the layer), ``mlp`` (dense or shared-expert MLP term), ``experts`` (sampled experts).

    Raises:
        UnsupportedError: a tensor of a kind the measurement has no rule for.
    """
    if t.kind == "stack_experts":
        return "experts"
    if t.kind in ("kv_b_k", "kv_b_v") or (t.kind == "copy" and ".self_attn." in t.sources[0]):
        return "attn"
    if t.kind == "copy" and t.sources[0].endswith("_proj.weight") and ".mlp." in t.sources[0]:
        return "mlp"
    raise UnsupportedError(f"forward sensitivity: no rule for {t.name} ({t.kind}, {t.sources[0]})",
                           hint="use --sensitivity weights")


def _override(src: _Overlay, mc: ModelConfig, t: g2.GGUFTensorPlan, q: str, q_of) -> None:
    """Set ``src.over`` to ``t`` at type ``q`` alone (a 2-D copy, or a kv_b half fused with the other half)."""
    hf = t.sources[0]
    w = src.inner.get(hf).to(torch.float32)
    if t.kind == "copy":
        src.over = {hf: q_of(t.name, w, q)}
        return
    k_b, v_b = g2.split_kv_b(w, mc.num_attention_heads, mc.qk_nope_head_dim, mc.v_head_dim)
    half = k_b if t.kind == "kv_b_k" else v_b
    qh = torch.stack([q_of(t.name, half[h], q, h) for h in range(half.shape[0])])
    src.over = {hf: g2.fuse_kv_b(qh, v_b) if t.kind == "kv_b_k" else g2.fuse_kv_b(k_b, qh)}


def _layer(model: ReferenceModel, src: _Overlay, layer: int, hs: list[torch.Tensor], pos: list[torch.Tensor],
           tensors: list[g2.GGUFTensorPlan], candidates: dict[str, list[str]], q_of):
    """One decoder layer: its clean output (the next layer's input) and ``s`` of each of ``tensors``.

    Returns:
        (clean outputs ``[(T_s, hidden)]`` float32, ``{name: {type: s}}``, ``{name: measure}``, the sampled expert
        ids or None).
    """
    prefix = f"model.layers.{layer}"
    kinds = {t.name: _kind(t) for t in tensors}
    attn = [(t, q) for t in tensors if kinds[t.name] == "attn" for q in candidates[t.name]]
    src.over = {}
    halves = [model.attention_blocks(layer, hs, pos)]  # [(h', x)] per window; variant 0 is clean
    for t, q in attn:
        _override(src, model.cfg, t, q, q_of)
        halves.append(model.attention_blocks(layer, hs, pos))
    src.over = {}
    # the MLP/MoE is token-wise: every variant's tokens in one batch, so each routed expert is read (and multiplied)
    # once for all
    xs = [x for v in halves for _, x in v]
    ys = model.mlp_block(layer, [torch.cat(xs)])[0].split([x.shape[0] for x in xs])
    n = len(hs)
    ys = [ys[i * n:(i + 1) * n] for i in range(len(halves))]
    clean = [h + y for (h, _), y in zip(halves[0], ys[0])]
    den = sum(_sq(y) for y in clean)

    def rel(num: float) -> float:
        return num / den if den > 0 else 0.0

    errs: dict[str, dict[str, float]] = {}
    meas: dict[str, str] = {}
    for i, (t, q) in enumerate(attn, 1):
        errs.setdefault(t.name, {})[q] = rel(sum(_sq(h + y - c) for (h, _), y, c in zip(halves[i], ys[i], clean)))
        meas[t.name] = "layer_output"
    xs = [x for _, x in halves[0]]
    del halves, ys
    x_all = torch.cat(xs)  # [tokens, hidden] the clean MLP input
    for t in (t for t in tensors if kinds[t.name] == "mlp"):
        hf = t.sources[0]
        mlp = hf[: hf.rindex(".", 0, hf.rindex("."))]  # model.layers.L.mlp or ...mlp.shared_experts
        w = {f"{mlp}.{p}.weight": src.inner.get(f"{mlp}.{p}.weight").to(torch.float32)
             for p in ("gate_proj", "up_proj", "down_proj")}
        base = swiglu_mlp(x_all, w.__getitem__, mlp, None)
        errs[t.name] = {q: rel(_sq(swiglu_mlp(x_all, {**w, hf: q_of(t.name, w[hf], q)}.__getitem__, mlp, None)
                                   - base)) for q in candidates[t.name]}
        meas[t.name] = "layer_output"
    experts = [t for t in tensors if kinds[t.name] == "experts"]
    eids = None
    if experts:
        eids, e_errs = _experts(model, src, prefix, x_all, experts, candidates, q_of)
        errs.update({n_: {q: rel(v) for q, v in e.items()} for n_, e in e_errs.items()})
        meas.update({t.name: "expert_sample" for t in experts})
    return clean, errs, meas, eids


def _experts(model: ReferenceModel, src: _Overlay, prefix: str, x: torch.Tensor, tensors: list[g2.GGUFTensorPlan],
             candidates: dict[str, list[str]], q_of) -> tuple[list[int], dict[str, dict[str, float]]]:
    """The sampled-expert estimate of ``sum_tok ||D||^2`` (module notes) for each stacked expert tensor of one MoE
    layer, on the clean MLP input ``x`` ``[tokens, hidden]``: (sampled expert ids, ``{name: {type: A/A_S *
    ||D_S||^2}}``)."""
    mc = model.cfg
    gate = src.inner.get(f"{prefix}.mlp.gate.weight").to(torch.float32)
    bias_name = f"{prefix}.mlp.gate.e_score_correction_bias"
    bias = src.inner.get(bias_name) if src.inner.has(bias_name) else None
    weights, indices = route(mc, F.linear(x, gate), bias)
    counts = torch.bincount(indices.flatten(), minlength=int(mc.n_routed_experts))
    eids = expert_sample(counts, EXPERT_SAMPLE)
    scale = indices.numel() / max(1, int(counts[eids].sum()))
    d = {t.name: {q: torch.zeros_like(x) for q in candidates[t.name]} for t in tensors}
    for e in eids:
        ep = f"{prefix}.mlp.experts.{e}"
        w = {f"{ep}.{p}.weight": src.inner.get(f"{ep}.{p}.weight").to(torch.float32)
             for p in ("gate_proj", "up_proj", "down_proj")}
        tok, y = routed_expert_output(x, weights, indices, e, w.__getitem__, f"{prefix}.mlp")
        for t in tensors:
            hf = t.sources[e]
            for q, acc in d[t.name].items():
                over = {**w, hf: q_of(t.name, w[hf], q, e)}
                _, yq = routed_expert_output(x, weights, indices, e, over.__getitem__, f"{prefix}.mlp")
                acc.index_add_(0, tok, yq - y)
    return eids, {n: {q: scale * _sq(v) for q, v in per.items()} for n, per in d.items()}
