"""A pure-torch, layer-streamed DeepSeek V2/V3 forward pass: the reference for ``validate``.

Memory bound. :class:`ReferenceModel` holds no weights between calls. While decoder layer ``i``
runs it holds that layer's dense tensors (attention, norms, router, shared experts or dense MLP)
cast to the compute dtype, plus **one** routed expert at a time (only experts that receive at least
one token are fetched at all), plus activations: the ``(T, hidden)`` residual and normalised copies,
``(H, T, T)`` float32 attention scores, ``(H, T, qk_head_dim)`` queries/keys, ``(T, E)`` router
logits. ``embed`` holds the ``(vocab, hidden)`` embedding as the source returns it; ``head`` holds
``lm_head`` as returned and casts it in chunks of ``HEAD_CHUNK_ROWS`` rows, returning ``(T, vocab)``
float32 logits. V3 in float32: about 0.9 GiB of dense weights in an MoE layer (attention 187M +
shared expert 44M + router 1.8M params), 2.2 GiB in dense layers 0-2 (+ the 396M-param MLP),
168 MiB per routed expert, 1.73 GiB for the BF16 ``lm_head`` (+ 0.44 GiB per fp32 chunk); at
T = 512 the attention scores take 128 MiB per copy.

Choices (docs/checkpoint-layout.md §10): YaRN always on when ``rope_scaling.type == "yarn"``; the
router bias whenever the checkpoint has one; ``-inf`` group masking; a float32 router; all-position
logits; the MTP layer (index ``num_hidden_layers``) is never run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsconvert.errors import UnsupportedError
from dsconvert.model.config import ModelConfig, softmax_scale
from dsconvert.model.layers import Getter, HeadHook, LinearHook, rms_norm, swiglu_mlp
from dsconvert.model.mla import mla_attention
from dsconvert.model.moe import moe_forward, moe_forward_many
from dsconvert.model.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq
from dsconvert.model.source import WeightSource

ProgressFn = Callable[[int, int], None]

#: ``lm_head`` rows cast to the compute dtype at a time (16384 x 7168 float32 = 448 MiB for V3).
HEAD_CHUNK_ROWS = 16384


class ForwardOutput(NamedTuple):
    """``logits``: ``(T, vocab)`` float32. ``hidden_states``: None, or one ``(T, hidden)`` float32
    tensor per decoder layer (the residual stream after layer ``i``, before the final norm)."""

    logits: torch.Tensor
    hidden_states: list[torch.Tensor] | None


def check_token_ids(token_ids, vocab_size: int) -> torch.Tensor:
    """``token_ids`` as a 1-D int64 tensor, checked against the vocabulary.

    Raises:
        ValueError: empty or not 1-D, or an id outside ``0..vocab_size-1``.
    """
    token_ids = torch.as_tensor(token_ids, dtype=torch.long)
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
        raise ValueError(f"token id outside 0..{vocab_size - 1}")
    return token_ids


class _Cast:
    """A getter that fetches each name once from ``source`` and casts it to ``dtype``; drop it to free."""

    def __init__(self, source: WeightSource, dtype: torch.dtype, device: torch.device | None = None):
        self._source = source
        self._dtype = dtype
        self._device = device
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            t = self._source.get(name)
            # The router (weight and bias) keeps the source precision: it runs in float32, as in
            # transformers (``_keep_in_fp32_modules_strict``).
            if not name.endswith((".mlp.gate.weight", "e_score_correction_bias")):
                t = t.to(self._dtype)
            if self._device is not None:
                t = t.to(self._device)
            self._cache[name] = t
        return t


class ReferenceModel:
    """Layer-streamed DeepSeek V2/V3 forward over a :class:`WeightSource`.

    Args:
        source: tensors by HF name, plus ``source.config`` (the parsed config.json).
        dtype: computation dtype, ``torch.float32`` (default) or ``torch.bfloat16``. RMSNorm
            statistics, attention softmax, RoPE and the router are float32 in both.
        config: a pre-built :class:`ModelConfig`; default ``ModelConfig.from_hf(source.config)``.
        device: where weights (cast per layer) and activations live; the source is read on the CPU and each
            tensor moved there as it is used. Logits and returned hidden states come back on the CPU. Default CPU.

    Example (a calibration loop)::

        m = ReferenceModel(src)
        pos = torch.arange(len(ids))
        h = m.embed(ids)
        for i in range(m.cfg.num_hidden_layers):
            h = m.layer_forward(i, h, pos, on_linear=capture)
        logits = m.head(h)
    """

    def __init__(self, source: WeightSource, dtype: torch.dtype = torch.float32, config: ModelConfig | None = None,
                 device: torch.device | str | None = None):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.source = source
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._dev = None if self.device.type == "cpu" else self.device  # None: no copies on the CPU path
        self.cfg = config if config is not None else ModelConfig.from_hf(source.config)
        self.softmax_scale = softmax_scale(self.cfg)
        self._inv_freq = rope_inv_freq(self.cfg).to(self.device)  # (qk_rope_head_dim/2,) float32
        self._attn_factor = rope_attention_factor(self.cfg)

    # -- pieces -------------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for ``positions`` ``(T,)`` int64: ``(cos, sin)`` ``(T, qk_rope_head_dim/2)`` float32, as
        :meth:`layer_forward` uses them (YaRN attention factor included)."""
        return rope_cos_sin(self._inv_freq, positions.to(self.device, torch.long), self._attn_factor)


    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(T,)`` int64 token ids -> ``(T, hidden)`` in the compute dtype."""
        token_ids = self._check_ids(token_ids)
        w = self.source.get("model.embed_tokens.weight")  # (vocab, hidden)
        return w[token_ids].to(self.device, self.dtype)

    def layer_forward(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        on_linear: LinearHook | None = None,
        on_heads: HeadHook | None = None,
    ) -> torch.Tensor:
        """Decoder layer ``layer_idx``: ``h += attn(norm(h)); h += mlp(norm(h))``.

        Args:
            layer_idx: 0 .. num_hidden_layers-1 (the MTP layer is refused).
            hidden: ``(T, hidden)`` residual stream, compute dtype.
            positions: ``(T,)`` int64 rope positions, also defining the causal mask.
            on_linear: called as ``on_linear(name, x)`` with the ``(n_tokens, in_features)`` input of
                every Linear (``...self_attn.q_a_proj``, ``...mlp.gate`` (router),
                ``...mlp.experts.{eid}.down_proj`` with only that expert's tokens, ...).
            on_heads: called with the per-head inputs of the absorbed MLA matrices
                (:data:`~dsconvert.model.layers.HeadHook`).

        Returns:
            ``(T, hidden)``, compute dtype. The layer's weights are released on return.
        """
        return self.layer_forward_many(layer_idx, [hidden], [positions], on_linear, on_heads)[0]

    def layer_forward_many(
        self,
        layer_idx: int,
        hiddens: list[torch.Tensor],
        positions: list[torch.Tensor],
        on_linear: LinearHook | None = None,
        on_heads: HeadHook | None = None,
        token_ids: list[torch.Tensor] | None = None,
        moe_experts=None,
    ) -> list[torch.Tensor]:
        """:meth:`layer_forward` for several independent sequences at once.

        Attention runs per sequence (its own positions and causal mask); the MLP / MoE, which is token-wise,
        runs once on all tokens concatenated, so each routed expert is fetched once per layer whatever the number
        of sequences, and only one expert is resident at a time. Mathematically a token's result does not depend
        on which other tokens share the batch; in floating point, matmul blocking over a different row count can
        change the last bits (both sides of a ``validate`` use the same batches, so a lossless conversion still
        compares exactly equal).

        Args:
            hiddens: ``[(T_s, hidden)]`` residual streams.
            positions: ``[(T_s,)]`` int64 rope positions.
            token_ids: accepted so one driver serves every architecture (:mod:`dsconvert.model.registry`);
                V2/V3 routing reads only hidden states, so the ids are not needed here.
            moe_experts: a MoE layer's routed experts computed elsewhere (:func:`~.moe.moe_forward`'s ``experts``).

        Returns:
            ``[(T_s, hidden)]`` in the compute dtype.
        """
        cfg = self.cfg
        if not 0 <= layer_idx < cfg.num_hidden_layers:
            raise IndexError(f"layer_idx {layer_idx} outside 0..{cfg.num_hidden_layers - 1} (the MTP layer is not run)")
        prefix = f"model.layers.{layer_idx}"
        get = _Cast(self.source, self.dtype, self._dev)
        attn_out = []
        for hidden, pos in zip(hiddens, positions):
            self._check_len(hidden.shape[0])
            hidden = hidden.to(self.device, self.dtype)
            pos = pos.to(self.device, torch.long)
            cos, sin = rope_cos_sin(self._inv_freq, pos, self._attn_factor)  # (T, dr/2) each
            x = rms_norm(hidden, get(f"{prefix}.input_layernorm.weight"), cfg.rms_norm_eps)
            attn_out.append(hidden + mla_attention(
                cfg, x, pos, cos, sin, self.softmax_scale, get, f"{prefix}.self_attn", on_linear, on_heads))
        hidden = torch.cat(attn_out)  # (sum T_s, hidden)
        x = rms_norm(hidden, get(f"{prefix}.post_attention_layernorm.weight"), cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            y = moe_forward(cfg, x, get, self._expert_getter, self.source.has, f"{prefix}.mlp", on_linear,
                            moe_experts)
        else:
            y = swiglu_mlp(x, get, f"{prefix}.mlp", on_linear)
        return list((hidden + y).split([h.shape[0] for h in attn_out]))

    def attention_blocks(
        self,
        layer_idx: int,
        hiddens: list[torch.Tensor],
        positions: list[torch.Tensor],
        on_linear: LinearHook | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first half of :meth:`layer_forward` on each sequence, with the same operations:
        ``h' = h + attn(input_layernorm(h))`` and the MLP input ``x = post_attention_layernorm(h')``. The
        attention weights are fetched once for all sequences.

        Args:
            hiddens: ``[(T_s, hidden)]`` residual streams; positions: ``[(T_s,)]`` int64.

        Returns:
            ``[(h'_s, x_s)]``, each ``(T_s, hidden)`` in the compute dtype.
        """
        cfg = self.cfg
        if not 0 <= layer_idx < cfg.num_hidden_layers:
            raise IndexError(f"layer_idx {layer_idx} outside 0..{cfg.num_hidden_layers - 1} (the MTP layer is not run)")
        prefix = f"model.layers.{layer_idx}"
        get = _Cast(self.source, self.dtype)
        out = []
        for hidden, pos in zip(hiddens, positions):
            self._check_len(hidden.shape[0])
            hidden = hidden.to(self.dtype)
            pos = pos.to(torch.long)
            cos, sin = rope_cos_sin(self._inv_freq, pos, self._attn_factor)  # (T, dr/2) each
            x = rms_norm(hidden, get(f"{prefix}.input_layernorm.weight"), cfg.rms_norm_eps)
            hidden = hidden + mla_attention(cfg, x, pos, cos, sin, self.softmax_scale, get, f"{prefix}.self_attn",
                                            on_linear)
            out.append((hidden, rms_norm(hidden, get(f"{prefix}.post_attention_layernorm.weight"),
                                         cfg.rms_norm_eps)))
        return out

    def layer_forward_seqwise(
        self,
        layer_idx: int,
        hiddens: list[torch.Tensor],
        positions: list[torch.Tensor],
        on_linear: LinearHook | None = None,
    ) -> list[torch.Tensor]:
        """``[layer_forward(layer_idx, h, p, on_linear) for h, p in zip(hiddens, positions)]``, bit for bit, but
        each routed expert is fetched once for all sequences (:func:`~dsconvert.model.moe.moe_forward_many`)
        instead of once per sequence. The hook sees the same inputs, expert-major for the MoE.

        Args:
            hiddens: ``[(T_s, hidden)]`` residual streams; positions: ``[(T_s,)]`` int64.

        Returns:
            ``[(T_s, hidden)]`` in the compute dtype.
        """
        halves = self.attention_blocks(layer_idx, hiddens, positions, on_linear)
        ys = self.mlp_block(layer_idx, [x for _, x in halves], on_linear)
        return [h + y for (h, _), y in zip(halves, ys)]

    def mlp_block(self, layer_idx: int, xs: list[torch.Tensor], on_linear: LinearHook | None = None
                  ) -> list[torch.Tensor]:
        """The second half of :meth:`layer_forward` (MoE or dense MLP, without the residual) on each sequence's
        MLP input ``xs[s]`` ``(T_s, hidden)`` separately, with the same operations as per-sequence calls; routed
        experts are fetched once for all sequences. Returns ``[(T_s, hidden)]``, compute dtype."""
        prefix = f"model.layers.{layer_idx}"
        get = _Cast(self.source, self.dtype)
        if self.cfg.is_moe_layer(layer_idx):
            return moe_forward_many(self.cfg, xs, get, self._expert_getter, self.source.has, f"{prefix}.mlp",
                                    on_linear)
        return [swiglu_mlp(x, get, f"{prefix}.mlp", on_linear) for x in xs]

    def head(self, hidden: torch.Tensor, on_linear: LinearHook | None = None) -> torch.Tensor:
        """Final RMSNorm then ``lm_head`` (``embed_tokens`` if tied): ``(T, hidden)`` -> ``(T, vocab)`` float32."""
        get = _Cast(self.source, self.dtype, self._dev)
        x = rms_norm(hidden.to(self.device, self.dtype), get("model.norm.weight"), self.cfg.rms_norm_eps)
        tied = self.cfg.tie_word_embeddings and not self.source.has("lm_head.weight")
        name = "model.embed_tokens" if tied else "lm_head"
        if on_linear is not None:
            on_linear(name, x)
        w = self.source.get(name + ".weight")  # (vocab, hidden), source dtype
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=self.device)  # (T, vocab)
        for r0 in range(0, w.shape[0], HEAD_CHUNK_ROWS):
            wc = w[r0 : r0 + HEAD_CHUNK_ROWS].to(self.device, self.dtype)  # (rows, hidden)
            out[:, r0 : r0 + wc.shape[0]] = F.linear(x, wc).to(torch.float32)
        return out.cpu()

    # -- whole model ----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(
        self,
        token_ids: torch.Tensor,
        return_hidden: bool = False,
        progress: ProgressFn | None = None,
        on_linear: LinearHook | None = None,
    ) -> ForwardOutput:
        """Run the whole model on one sequence.

        Args:
            token_ids: ``(T,)`` int64, positions ``0..T-1``.
            return_hidden: also return the residual stream after every decoder layer (float32 copies).
            progress: called as ``progress(layer_idx, num_hidden_layers)`` after each layer.
            on_linear: Linear input hook, see :meth:`layer_forward`; ``lm_head`` included.

        Returns:
            :class:`ForwardOutput` with ``(T, vocab)`` float32 logits for every position.

        Raises:
            UnsupportedError: deepseek_v32 with ``T > index_topk`` (the indexer is not implemented).
        """
        token_ids = self._check_ids(token_ids)
        positions = torch.arange(token_ids.shape[0])
        h = self.embed(token_ids)
        hiddens: list[torch.Tensor] | None = [] if return_hidden else None
        n = self.cfg.num_hidden_layers
        for i in range(n):
            h = self.layer_forward(i, h, positions, on_linear=on_linear)
            if hiddens is not None:
                hiddens.append(h.to("cpu", torch.float32, copy=True))
            if progress is not None:
                progress(i, n)
        return ForwardOutput(self.head(h, on_linear=on_linear), hiddens)

    __call__ = forward

    # -- helpers --------------------------------------------------------------------------------

    def _expert_getter(self, expert_prefix: str) -> Getter:
        return _Cast(self.source, self.dtype, self._dev)

    def _check_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        token_ids = check_token_ids(token_ids, self.cfg.vocab_size)
        self._check_len(token_ids.shape[0])
        return token_ids

    def _check_len(self, T: int) -> None:
        it = self.cfg.index_topk
        if it is not None and T > it:
            raise UnsupportedError(
                f"deepseek_v32 with {T} tokens > index_topk {it}: the sparse indexer is not implemented",
                hint=f"validate with at most {it} tokens, where dense MLA is exact",
            )
