"""``ModelConfig``: the config.json fields the reference forward uses, with every choice explicit.

Supported ``model_type`` values:

* ``deepseek_v3`` (V3, V3-Base, V3-0324, V3.1, R1, R1-0528, Kimi-K2-shaped configs).
* ``deepseek_v2`` (V2, V2-Lite, V2.5): softmax router, ``greedy`` / ``group_limited_greedy``,
  ``q_lora_rank`` may be ``None`` (plain ``q_proj``).
* ``deepseek_v32`` (V3.2-Exp): run as V3 **without the lightning indexer**. That is exact for
  sequences of at most ``index_topk`` (2048) tokens, because the indexer then keeps every causal
  key; :class:`~dsconvert.model.forward.ReferenceModel` raises ``UnsupportedError`` for longer ones.

Anything else raises :class:`~dsconvert.errors.UnsupportedError` (a ``ValueError`` is not used so
the CLI maps it to exit 3).

Source: deepseek-ai/DeepSeek-V3 ``inference/model.py`` and transformers 5.24
``models/deepseek_v3/modeling_deepseek_v3.py`` (see docs/checkpoint-layout.md §10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dsconvert.errors import UnsupportedError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (``rope_scaling`` in config.json, ``rope_parameters`` in transformers 5).

    ``factor`` None in the file is replaced by ``max_position_embeddings /
    original_max_position_embeddings``, as transformers does. ``attention_factor`` is the explicit
    cos/sin multiplier when the config gives one; otherwise it is derived (see
    :func:`dsconvert.model.rope.rope_attention_factor`).
    """

    type: str  # only "yarn" is supported
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The architecture fields of a DeepSeek V2/V3 ``config.json``.

    ``q_lora_rank`` None means a plain ``q_proj`` (V2-Lite). ``n_routed_experts`` None means every
    layer is dense. A layer ``i`` is MoE iff ``n_routed_experts`` is set, ``i >=
    first_k_dense_replace`` and ``i % moe_layer_freq == 0`` (DeepSeek's ``modeling_deepseek.py``;
    transformers ignores ``moe_layer_freq``, which is 1 in every release).
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    index_topk: int | None = None  # deepseek_v32 only
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: ``qk_nope_head_dim + qk_rope_head_dim`` (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has a routed-expert MLP."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed ``config.json`` (or ``transformers`` ``PretrainedConfig.to_dict()``).

        Defaults for keys a file may omit: V3 (and v32) ``scoring_func`` sigmoid and
        ``topk_method`` noaux_tc (transformers' DeepseekV3 hard-codes both); V2 softmax and greedy.

        Raises:
            UnsupportedError: unknown ``model_type``, a rope type other than yarn/default,
                ``hidden_act`` other than silu, attention bias, GQA (``num_key_value_heads`` !=
                ``num_attention_heads``), or an inconsistent router (``n_routed_experts`` not a
                multiple of ``n_group``, ``num_experts_per_tok`` > experts in ``topk_group`` groups).
        """
        c = dict(config)
        mt = c.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedError(
                f"model_type {mt!r} is not supported by the reference forward",
                hint=f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            )
        v3 = mt in ("deepseek_v3", "deepseek_v32")

        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedError(f"hidden_act {act!r} is not supported (only silu)")
        if c.get("attention_bias"):
            raise UnsupportedError("attention_bias=true is not supported")
        if c.get("mlp_bias"):
            raise UnsupportedError("mlp_bias=true is not supported")
        n_heads = int(c["num_attention_heads"])
        n_kv = c.get("num_key_value_heads")
        if n_kv is not None and int(n_kv) != n_heads:
            raise UnsupportedError(
                f"num_key_value_heads {n_kv} != num_attention_heads {n_heads}: MLA has one latent per head"
            )

        rope_theta, rope_scaling = _parse_rope(c)

        n_routed = c.get("n_routed_experts")
        n_group = c.get("n_group") or 1
        topk_group = c.get("topk_group") or 1
        top_k = c.get("num_experts_per_tok")
        topk_method = c.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        scoring = c.get("scoring_func") or ("sigmoid" if v3 else "softmax")
        if topk_method not in TOPK_METHODS:
            raise UnsupportedError(f"topk_method {topk_method!r} is not supported", hint=f"supported: {TOPK_METHODS}")
        if scoring not in SCORING_FUNCS:
            raise UnsupportedError(f"scoring_func {scoring!r} is not supported", hint=f"supported: {SCORING_FUNCS}")
        if n_routed is not None:
            n_routed = int(n_routed)
            if top_k is None:
                raise UnsupportedError("n_routed_experts is set but num_experts_per_tok is missing")
            if n_routed % n_group:
                raise UnsupportedError(f"n_routed_experts {n_routed} is not a multiple of n_group {n_group}")
            if topk_method != "greedy" and int(top_k) > int(topk_group) * (n_routed // n_group):
                raise UnsupportedError(
                    f"num_experts_per_tok {top_k} exceeds the {topk_group} x {n_routed // n_group} experts "
                    "of the selected groups"
                )

        index_topk = c.get("index_topk", 2048) if mt == "deepseek_v32" else None
        q_lora = c.get("q_lora_rank")
        return cls(
            model_type=mt,
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=n_heads,
            q_lora_rank=None if q_lora is None else int(q_lora),
            kv_lora_rank=int(c["kv_lora_rank"]),
            qk_nope_head_dim=int(c["qk_nope_head_dim"]),
            qk_rope_head_dim=int(c["qk_rope_head_dim"]),
            v_head_dim=int(c["v_head_dim"]),
            first_k_dense_replace=int(c.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(c.get("moe_layer_freq") or 1),
            moe_intermediate_size=int(c.get("moe_intermediate_size") or 0),
            n_routed_experts=n_routed,
            n_shared_experts=None if c.get("n_shared_experts") is None else int(c["n_shared_experts"]),
            num_experts_per_tok=None if top_k is None else int(top_k),
            n_group=int(n_group),
            topk_group=int(topk_group),
            topk_method=topk_method,
            scoring_func=scoring,
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(c.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            index_topk=None if index_topk is None else int(index_topk),
            extra={k: c[k] for k in ("architectures", "torch_dtype", "dtype") if k in c},
        )


def _parse_rope(c: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None) from ``rope_scaling`` (config.json) or ``rope_parameters``."""
    rp = c.get("rope_scaling") or c.get("rope_parameters") or {}
    theta = float(c.get("rope_theta") or rp.get("rope_theta") or 10000.0)
    rtype = rp.get("type") or rp.get("rope_type") or "default"
    if rtype == "default":
        return theta, None
    if rtype != "yarn":
        raise UnsupportedError(f"rope type {rtype!r} is not supported (only yarn or none)")
    orig = rp.get("original_max_position_embeddings")
    if orig is None:
        raise UnsupportedError("yarn rope_scaling lacks original_max_position_embeddings")
    factor = rp.get("factor")
    if factor is None:
        factor = float(c["max_position_embeddings"]) / float(orig)

    def _opt(key: str) -> float | None:
        v = rp.get(key)
        return None if v is None else float(v)

    return theta, RopeScaling(
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(rp.get("beta_fast") or 32),
        beta_slow=float(rp.get("beta_slow") or 1),
        mscale=_opt("mscale"),
        mscale_all_dim=_opt("mscale_all_dim"),
        attention_factor=_opt("attention_factor"),
        truncate=bool(rp.get("truncate", True)),
    )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1.0 when ``scale <= 1``).

    Source: transformers ``modeling_rope_utils._compute_yarn_parameters.get_mscale``.
    """
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale ``qk_head_dim**-0.5 * yarn_get_mscale(factor, mscale_all_dim)**2``.

    The correction applies whenever rope scaling is yarn and ``mscale_all_dim`` is non-zero,
    independent of sequence length (transformers' ``yarn_apply_mscale``). DeepSeek's
    ``inference/model.py`` applies it only when ``max_seq_len > original_seq_len``; with its default
    ``max_seq_len`` 16384 the two agree. V3: ``192**-0.5 * (0.1 ln 40 + 1)**2 = 0.135234``.
    """
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
        scale *= m * m
    return scale
