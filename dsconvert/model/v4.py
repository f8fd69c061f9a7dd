"""A pure-torch, layer-streamed DeepSeek-V4 forward pass (the reference for ``validate`` / ``logits`` on V4).

It reads tensors by their **release** names (``layers.3.attn.wq_a.weight``, ``ffn.experts.5.w1.weight``, ...;
:mod:`dsconvert.formats.deepseek_v4`) from a :class:`~dsconvert.model.source.WeightSource` that dequantizes FP8 /
FP4 blocks as they are asked for, holds one layer's dense tensors at a time and one routed expert at a time.

Architecture (docs/checkpoint-layout.md §11-§14; numerics follow transformers 5.24
``models/deepseek_v4/modeling_deepseek_v4.py``, the oracle of the tests, in a stateless full-sequence form):

* residual: ``hc_mult`` streams, ``(T, hc, D)``; every sub-block collapses them with mHC weights ``pre``, and
  writes back ``post * out + comb^T @ streams``, ``comb`` Sinkhorn-projected; ``hc_head`` collapses before ``norm``;
* attention: low-rank queries with an unweighted per-head RMSNorm, one shared K=V head (``kv_norm(wkv(x))``),
  interleaved RoPE on the **last** ``qk_rope_head_dim`` dims (inverse rotation on the output), a learned sink per
  head, a sliding window, plus compressed entries: HCA (ratio 128, non-overlapping softmax-gated pooling) or CSA
  (ratio 4, overlapping windows, a Lightning Indexer choosing ``index_topk`` entries per query); grouped
  low-rank output ``wo_a`` (block diagonal over ``o_groups``) then ``wo_b``;
* MoE on every layer: ``sqrt(softplus)`` scores, hash routing (``tid2eid[token]``) on the first
  ``num_hash_layers`` layers, bias-corrected top-k after that, weights normalised and scaled by
  ``routed_scaling_factor``, SwiGLU clamped at ``swiglu_limit`` in routed and shared experts.

The MTP block is never run. Everything runs in float32 or bfloat16 (``dtype``); mHC, norms, softmaxes, RoPE and
the compressor pooling statistics are float32 as in transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsconvert.formats import deepseek_v4 as v4fmt
from dsconvert.model.config import RopeScaling
from dsconvert.model.forward import ForwardOutput, check_token_ids
from dsconvert.model.layers import LinearHook
from dsconvert.model.rope import rope_inv_freq
from dsconvert.model.source import WeightSource

#: ``head.weight`` rows cast to the compute dtype at a time.
HEAD_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class V4Config:
    """The numbers the V4 forward needs, from a release (or transformers-saved) ``config.json``."""

    geo: v4fmt.V4Geometry
    sliding_window: int
    index_topk: int
    rms_norm_eps: float
    hc_sinkhorn_iters: int
    hc_eps: float
    routed_scaling_factor: float
    swiglu_limit: float
    rope_theta: float
    compress_rope_theta: float
    rope_scaling: RopeScaling | None

    @property
    def num_hidden_layers(self) -> int:
        return self.geo.layers

    @property
    def vocab_size(self) -> int:
        return self.geo.vocab

    @classmethod
    def from_hf(cls, cfg: dict) -> "V4Config":
        """Raises UnsupportedError (via :func:`dsconvert.formats.deepseek_v4.geometry`) on a config it cannot read,
        and on a scoring function other than ``sqrtsoftplus``."""
        from dsconvert.errors import UnsupportedError

        geo = v4fmt.geometry(cfg)
        if cfg.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
            raise UnsupportedError(f"config.json: scoring_func {cfg.get('scoring_func')!r}; V4 uses sqrtsoftplus")
        rs = cfg.get("rope_scaling")
        rp = cfg.get("rope_parameters") or {}
        comp = rp.get("compress") if isinstance(rp.get("compress"), dict) else None
        if rs is None and comp is not None and comp.get("rope_type") == "yarn":
            rs = comp
        scaling = None
        if rs:
            scaling = RopeScaling(type="yarn", factor=float(rs["factor"]),
                                  original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                                  beta_fast=float(rs.get("beta_fast", 32.0)), beta_slow=float(rs.get("beta_slow", 1.0)))
        main_theta = (rp.get("main") or {}).get("rope_theta") if isinstance(rp.get("main"), dict) else None
        comp_theta = comp.get("rope_theta") if comp else None
        return cls(geo=geo, sliding_window=int(cfg.get("sliding_window", 128)),
                   index_topk=int(cfg.get("index_topk", 512)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)), hc_eps=float(cfg.get("hc_eps", 1e-6)),
                   routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.5)),
                   swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
                   rope_theta=float(cfg.get("rope_theta", main_theta or 10000.0)),
                   compress_rope_theta=float(cfg.get("compress_rope_theta", comp_theta or 160000.0)),
                   rope_scaling=scaling)


class _RopeCfg:
    """The three fields :func:`dsconvert.model.rope.rope_inv_freq` reads."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None):
        self.qk_rope_head_dim, self.rope_theta, self.rope_scaling = dim, theta, scaling


def _rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``(T, r/2)`` float32 for ``positions`` ``(T,)``."""
    f = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return f.cos(), f.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE on the last ``2 * cos.shape[-1]`` dims of ``x`` ``(T, ..., d)``; pairs ``(2j, 2j+1)``
    rotate by angle ``j``; ``cos``/``sin`` are ``(T, r/2)``. Computed in float32, returned in ``x.dtype``.
    Pass ``-sin`` for the inverse rotation."""
    r = 2 * cos.shape[-1]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (r // 2,)
    c, s = cos.reshape(shape), sin.reshape(shape)
    rope = x[..., -r:].float()
    a, b = rope[..., 0::2], rope[..., 1::2]
    out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], out.to(x.dtype)], dim=-1)


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in float32; ``weight`` None = unweighted (transformers casts the
    weighted form's result to x.dtype after the float32 weight multiply)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(x.dtype)
    return (weight.float() * y).to(x.dtype)


class _Get:
    """Fetch each name once from the source, cast float tensors to ``dtype`` unless listed as float32-kept."""

    FP32 = ("hc_", "attn_sink", ".ape", "norm.weight", "compressor.wkv.weight", "compressor.wgate.weight",
            "weights_proj.weight", "gate.bias")

    def __init__(self, source: WeightSource, dtype: torch.dtype, device: torch.device | None):
        self.source, self.dtype, self.device, self.cache = source, dtype, device, {}

    def __call__(self, name: str) -> torch.Tensor:
        t = self.cache.get(name)
        if t is None:
            t = self.source.get(name)
            if t.dtype.is_floating_point:
                t = t.to(torch.float32 if any(k in name for k in self.FP32) else self.dtype)
            if self.device is not None:
                t = t.to(self.device)
            self.cache[name] = t
        return t


class V4ReferenceModel:
    """Layer-streamed DeepSeek-V4 forward over a :class:`WeightSource` with release tensor names.

    The same driving interface as :class:`dsconvert.model.forward.ReferenceModel`: :meth:`embed`,
    :meth:`layer_forward_many`, :meth:`head`, :meth:`forward`, but the hidden state is ``(T, hc_mult, hidden)``
    (the mHC streams) and hash-routed layers need the token ids (``token_ids=`` of :meth:`layer_forward_many`).

    Args:
        source: tensors by release name; ``source.config`` the release config.json.
        dtype: ``torch.float32`` (default) or ``torch.bfloat16``.
        device: where weights and activations live (default CPU); logits return on the CPU.

    Raises:
        ValueError: another dtype. UnsupportedError: a config :class:`V4Config` cannot read.
    """

    def __init__(self, source: WeightSource, dtype: torch.dtype = torch.float32, config: V4Config | None = None,
                 device: torch.device | str | None = None):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.source, self.dtype = source, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._dev = None if self.device.type == "cpu" else self.device
        self.cfg = config if config is not None else V4Config.from_hf(source.config)
        g = self.cfg.geo
        self._inv_main = rope_inv_freq(_RopeCfg(g.rope_dim, self.cfg.rope_theta, None)).to(self.device)
        self._inv_comp = rope_inv_freq(_RopeCfg(g.rope_dim, self.cfg.compress_rope_theta,
                                                self.cfg.rope_scaling)).to(self.device)

    # -- pieces -------------------------------------------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(T,)`` int64 -> ``(T, hc, hidden)``: the embedding copied into every stream, compute dtype."""
        token_ids = self._check_ids(token_ids)
        e = self.source.get("embed.weight")[token_ids].to(self.device, self.dtype)
        return e[:, None, :].expand(-1, self.cfg.geo.hc, -1).contiguous()

    def layer_forward_many(self, layer_idx: int, hiddens: list[torch.Tensor], positions: list[torch.Tensor],
                           on_linear: LinearHook | None = None, *, token_ids: list[torch.Tensor],
                           on_mix: LinearHook | None = None) -> list[torch.Tensor]:
        """Decoder layer ``layer_idx`` on several independent sequences (attention per sequence, MoE on all
        tokens at once, each routed expert fetched once).

        Args:
            hiddens: ``[(T_s, hc, hidden)]``; positions: ``[(T_s,)]`` int64 (``0..T_s-1``: the compressors pool
                windows from the sequence start); token_ids: ``[(T_s,)]`` int64 (hash routing).
            on_linear: sees (and may replace) the input of every dense Linear and routed expert, as in V3.
            on_mix: sees (never replaces) the input of the two mHC mixing matrices, ``on_mix(name, flat)`` with
                ``name`` ``layers.{i}.hc_attn_fn`` / ``hc_ffn_fn`` and ``flat`` the RMS-normed flattened streams
                ``(T, hc * hidden)`` float32 (imatrix).

        Returns:
            ``[(T_s, hc, hidden)]`` in the compute dtype.

        Raises:
            IndexError: ``layer_idx`` outside the main layers.
        """
        cfg = self.cfg
        if not 0 <= layer_idx < cfg.num_hidden_layers:
            raise IndexError(f"layer_idx {layer_idx} outside 0..{cfg.num_hidden_layers - 1} (MTP is not run)")
        p = f"layers.{layer_idx}."
        get = _Get(self.source, self.dtype, self._dev)
        mids, xs = [], []
        for h, pos in zip(hiddens, positions):
            h = h.to(self.device, self.dtype)
            pos = pos.to(self.device, torch.long)
            post, comb, x = self._hc(h, get, p + "hc_attn", on_mix)
            a = self._attention(layer_idx, _rms(x, get(p + "attn_norm.weight"), cfg.rms_norm_eps), pos, get,
                                on_linear)
            h = post.to(h.dtype)[..., None] * a[:, None, :] + torch.matmul(comb.to(h.dtype).transpose(-1, -2), h)
            post, comb, x = self._hc(h, get, p + "hc_ffn", on_mix)
            mids.append((h, post, comb))
            xs.append(_rms(x, get(p + "ffn_norm.weight"), cfg.rms_norm_eps))
        ids = torch.cat([t.to(self.device, torch.long) for t in token_ids])
        y = self._moe(layer_idx, torch.cat(xs), ids, get, on_linear).split([x.shape[0] for x in xs])
        return [post.to(h.dtype)[..., None] * yy[:, None, :] + torch.matmul(comb.to(h.dtype).transpose(-1, -2), h)
                for (h, post, comb), yy in zip(mids, y)]

    def head(self, hidden: torch.Tensor, on_linear: LinearHook | None = None) -> torch.Tensor:
        """``hc_head`` collapse, final RMSNorm, ``head``: ``(T, hc, hidden)`` -> ``(T, vocab)`` float32 (CPU)."""
        get = _Get(self.source, self.dtype, self._dev)
        hidden = hidden.to(self.device, self.dtype)
        flat = _rms(hidden.flatten(1).float(), None, self.cfg.rms_norm_eps)
        mix = F.linear(flat, get("hc_head_fn"))
        pre = torch.sigmoid(mix * get("hc_head_scale") + get("hc_head_base")) + self.cfg.hc_eps
        x = (pre[..., None] * hidden).sum(1).to(self.dtype)
        x = _rms(x, get("norm.weight"), self.cfg.rms_norm_eps)
        if on_linear is not None:
            r = on_linear("head", x)
            x = x if r is None else r
        w = self.source.get("head.weight")
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=self.device)
        for r0 in range(0, w.shape[0], HEAD_CHUNK_ROWS):
            wc = w[r0: r0 + HEAD_CHUNK_ROWS].to(self.device, self.dtype)
            out[:, r0: r0 + wc.shape[0]] = F.linear(x, wc).float()
        return out.cpu()

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, return_hidden: bool = False,
                on_linear: LinearHook | None = None) -> ForwardOutput:
        """Whole model on one sequence at positions ``0..T-1``.

        Returns:
            :class:`~dsconvert.model.forward.ForwardOutput`: ``(T, vocab)`` float32 logits and, with
            ``return_hidden``, the ``(T, hc, hidden)`` float32 streams after every layer.
        """
        ids = self._check_ids(token_ids)
        pos = torch.arange(ids.shape[0])
        h = self.embed(ids)
        hiddens: list[torch.Tensor] | None = [] if return_hidden else None
        for i in range(self.cfg.num_hidden_layers):
            h = self.layer_forward_many(i, [h], [pos], on_linear, token_ids=[ids])[0]
            if hiddens is not None:
                hiddens.append(h.to("cpu", torch.float32, copy=True))
        return ForwardOutput(self.head(h, on_linear), hiddens)

    __call__ = forward

    # -- mHC ----------------------------------------------------------------------------------------------------

    def _hc(self, h: torch.Tensor, get: _Get, p: str, on_mix: LinearHook | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mHC weights of one sub-block from the streams ``h`` ``(T, hc, D)``: ``post`` ``(T, hc)``, ``comb``
        ``(T, hc, hc)`` (softmax, then Sinkhorn column/row normalisation, ``hc_sinkhorn_iters`` rounds) and the
        collapsed input ``sum_k pre_k h_k`` ``(T, D)``; all mixing in float32."""
        cfg, n = self.cfg, self.cfg.geo.hc
        flat = _rms(h.flatten(1).float(), None, cfg.rms_norm_eps)
        if on_mix is not None:
            on_mix(p + "_fn", flat)
        mix = F.linear(flat, get(p + "_fn"))  # (T, (2+n)n)
        base, scale = get(p + "_base"), get(p + "_scale")
        pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + cfg.hc_eps
        post = 2 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
        comb = torch.softmax(mix[:, 2 * n:].view(-1, n, n) * scale[2] + base[2 * n:].view(n, n), dim=-1) + cfg.hc_eps
        comb = comb / (comb.sum(-2, keepdim=True) + cfg.hc_eps)
        for _ in range(cfg.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + cfg.hc_eps)
            comb = comb / (comb.sum(-2, keepdim=True) + cfg.hc_eps)
        return post, comb, (pre[..., None] * h).sum(1).to(h.dtype)

    # -- attention ----------------------------------------------------------------------------------------------

    def _lin(self, x: torch.Tensor, get: _Get, name: str, on_linear: LinearHook | None) -> torch.Tensor:
        if on_linear is not None:
            r = on_linear(name, x)
            x = x if r is None else r
        w = get(name + ".weight")
        return F.linear(x.to(w.dtype), w)

    def _pool(self, x: torch.Tensor, get: _Get, p: str, ratio: int, dim: int, overlap: bool, on_linear,
              ) -> torch.Tensor:
        """Compressed entries ``(N, dim)``, ``N = T // ratio``: softmax(gate + ape)-weighted sums of ``wkv(x)`` over
        each window of ``ratio`` tokens (``overlap``: CSA, the window's second half-width features plus the previous
        window's first half-width ones, ``2 * ratio`` slots), RMS-normed, RoPE'd at position ``ratio * n``."""
        T = x.shape[0]
        n = T // ratio
        kv = self._lin(x, get, p + "wkv", on_linear)[: n * ratio].float()
        gate = self._lin(x, get, p + "wgate", on_linear)[: n * ratio].float()
        if n == 0:
            return kv.new_zeros((0, dim)).to(self.dtype)
        kv = kv.view(n, ratio, -1)
        gate = gate.view(n, ratio, -1) + get(p + "ape")
        if overlap:
            kv_prev = torch.cat([kv.new_zeros((1, ratio, dim)), kv[:-1, :, :dim]])
            g_prev = torch.cat([gate.new_full((1, ratio, dim), float("-inf")), gate[:-1, :, :dim]])
            kv = torch.cat([kv_prev, kv[..., dim:]], dim=1)
            gate = torch.cat([g_prev, gate[..., dim:]], dim=1)
        pooled = (kv * gate.softmax(dim=1)).sum(1)
        pooled = _rms(pooled, get(p + "norm.weight"), self.cfg.rms_norm_eps)
        cos, sin = _rope_tables(self._inv_comp, torch.arange(n, device=x.device) * ratio)
        return apply_rope(pooled, cos, sin).to(self.dtype)

    def _indexer_mask(self, x, q_res, pos, get, p, on_linear) -> torch.Tensor:
        """CSA's Lightning Indexer: ``(T, N)`` additive mask, 0 on the ``index_topk`` causal compressed entries of
        highest score ``sum_h w_h relu(q_h . k)``, ``-inf`` elsewhere."""
        g, ratio = self.cfg.geo, 4
        keys = self._pool(x, get, p + "indexer.compressor.", ratio, g.index_dim, True, on_linear).float()
        N = keys.shape[0]
        cos, sin = _rope_tables(self._inv_comp, pos)
        q = self._lin(q_res, get, p + "indexer.wq_b", on_linear).view(x.shape[0], g.index_heads, g.index_dim)
        q = apply_rope(q, cos, sin).float()
        s = F.relu(torch.einsum("thd,nd->thn", q, keys)) * g.index_dim ** -0.5
        w = self._lin(x, get, p + "indexer.weights_proj", on_linear).float() * g.index_heads ** -0.5
        score = (s * w[..., None]).sum(1)  # (T, N)
        thr = ((pos + 1) // ratio)[:, None]
        ent = torch.arange(N, device=x.device)[None, :]
        score = score.masked_fill(ent >= thr, float("-inf"))
        k = min(self.cfg.index_topk, N)
        mask = score.new_full((score.shape[0], N + 1), float("-inf"))  # column N: where invalid picks land
        if k:
            top = score.topk(k, dim=-1).indices
            mask.scatter_(-1, torch.where(top < thr, top, N), 0.0)
        return mask[:, :N]
        return mask

    def _attention(self, layer_idx: int, x: torch.Tensor, pos: torch.Tensor, get: _Get, on_linear) -> torch.Tensor:
        """One sequence's attention block: ``(T, D)`` normalised input -> ``(T, D)``."""
        cfg, g = self.cfg, self.cfg.geo
        T, p = x.shape[0], f"layers.{layer_idx}.attn."
        ratio = g.ratios[layer_idx]
        cos, sin = _rope_tables(self._inv_main if ratio == 0 else self._inv_comp, pos)
        q_res = _rms(self._lin(x, get, p + "wq_a", on_linear), get(p + "q_norm.weight"), cfg.rms_norm_eps)
        q = self._lin(q_res, get, p + "wq_b", on_linear).view(T, g.heads, g.head_dim)
        q = apply_rope(_rms(q, None, cfg.rms_norm_eps), cos, sin)
        kv = _rms(self._lin(x, get, p + "wkv", on_linear), get(p + "kv_norm.weight"), cfg.rms_norm_eps)
        kv = apply_rope(kv, cos, sin)  # (T, hd)
        d = pos[:, None] - pos[None, :]
        mask = torch.zeros(T, T, device=x.device).masked_fill((d < 0) | (d >= cfg.sliding_window), float("-inf"))
        if ratio:
            comp = self._pool(x, get, p + "compressor.", ratio, g.head_dim, ratio == 4, on_linear)
            if ratio == 4:
                cmask = self._indexer_mask(x, q_res, pos, get, p, on_linear)
            else:
                ent = torch.arange(comp.shape[0], device=x.device)[None, :]
                cmask = torch.zeros(T, comp.shape[0], device=x.device).masked_fill(
                    ent >= ((pos + 1) // ratio)[:, None], float("-inf"))
            kv = torch.cat([kv, comp])
            mask = torch.cat([mask, cmask], 1)
        logits = torch.einsum("thd,sd->hts", q, kv) * g.head_dim ** -0.5 + mask.to(q.dtype)
        sink = get(p + "attn_sink").to(logits.dtype)[:, None, None].expand(-1, T, 1)
        full = torch.cat([logits, sink], -1)
        probs = torch.softmax(full - full.max(-1, keepdim=True).values, dim=-1)[..., :-1]
        out = torch.einsum("hts,sd->thd", probs.to(kv.dtype), kv)
        out = apply_rope(out, cos, -sin).reshape(T, g.o_groups, -1)
        wa_name = p + "wo_a"
        if on_linear is not None:
            r = on_linear(wa_name, out.reshape(T, -1))
            out = out if r is None else r.reshape(out.shape)
        wa = get(wa_name + ".weight").view(g.o_groups, g.o_lora, -1)
        o = torch.einsum("tgi,goi->tgo", out, wa).reshape(T, -1)
        return self._lin(o, get, p + "wo_b", on_linear)

    # -- MoE ----------------------------------------------------------------------------------------------------

    def _swiglu(self, x, get, p, on_linear) -> torch.Tensor:
        lim = self.cfg.swiglu_limit
        a = self._lin(x, get, p + "w1", on_linear).clamp(max=lim)
        b = self._lin(x, get, p + "w3", on_linear).clamp(min=-lim, max=lim)
        return self._lin(F.silu(a) * b, get, p + "w2", on_linear)

    def _moe(self, layer_idx: int, x: torch.Tensor, ids: torch.Tensor, get: _Get, on_linear) -> torch.Tensor:
        """Routed + shared experts on ``x`` ``(T, D)``; ``ids`` ``(T,)`` for hash layers."""
        cfg, g, p = self.cfg, self.cfg.geo, f"layers.{layer_idx}.ffn."
        if on_linear is not None:
            r = on_linear(p + "gate", x)
            xr = x if r is None else r
        else:
            xr = x
        logits = F.linear(xr.float(), get(p + "gate.weight").float())
        scores = torch.sqrt(F.softplus(logits))
        if g.moe_kind(layer_idx) == "hash":
            idx = get(p + "gate.tid2eid")[ids].long()
        else:
            idx = torch.topk(scores + get(p + "gate.bias"), g.experts_per_tok, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            eget = _Get(self.source, self.dtype, self._dev)  # one expert resident at a time
            y = self._swiglu(x[tok], eget, f"{p}experts.{e}.", on_linear)
            out.index_add_(0, tok, (y * w[tok, slot, None].to(y.dtype)).to(out.dtype))
        return out + self._swiglu(x, get, p + "shared_experts.", on_linear)

    # -- helpers ------------------------------------------------------------------------------------------------

    def _check_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        return check_token_ids(token_ids, self.cfg.vocab_size)
