"""What a run of the reference forward (``validate``, ``logits``) will cost, from config.json and shard headers only:
peak host memory, memory on the compute device, bytes read, tokens x active parameters and FLOPs.

The forward (:mod:`dsconvert.model.forward`) is layer-streamed, so its peak is the largest of three phases, on top
of the interpreter + torch baseline and of what lives through the whole run:

* **embed**: the ``(vocab, hidden)`` embedding as the source returns it (BF16: 2 bytes per weight; a GGUF source
  returns float32), plus the ``(T, hidden)`` stream;
* **layer**: the layer's dense tensors twice (the source-dtype copy the layer cache keeps, and the compute-dtype
  cast), one routed expert the same way, an FP8 weight's float32 dequantization temporaries, and activations:
  ``(T, hidden)`` streams, ``(T, moe_intermediate)`` / ``(T, intermediate)`` MLP temporaries, and per sequence
  the ``(H, T, T)`` float32 attention scores (three live copies: scores, mask fill, softmax);
* **head**: ``lm_head`` in the source dtype, one ``HEAD_CHUNK_ROWS`` cast chunk and the ``(T, vocab)`` float32
  logits.

Lasting through the run: ``validate`` keeps each model's per-layer hidden states ``(L, T, hidden)`` float32 and the
reference logits while the candidate runs, then scores both in float64: up to 11 ``(T, vocab)`` float64 tensors
live at once (log_softmax of each, their pooled copies, ``exp``, the KL terms and their temporaries). With ``--device cuda`` the compute-dtype casts and activations sit on the GPU and the host
holds the source-dtype copies.

Work: every decoder layer is read once per model (bytes from the headers; routed experts that receive no token
are skipped in practice, so this is an upper bound), and the forward performs ``2 x tokens x active parameters``
FLOPs in its matrix products (active: attention, dense or shared MLP, ``num_experts_per_tok`` experts, the head)
plus ``2 x H x T^2 x (qk_head_dim + v_head_dim)`` per sequence in attention. How close the peak estimate comes to
the measured peak RSS is tested (tests/model/test_forward_estimate.py) and stated in README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..formats import deepseek_v4 as v4
from ..formats.deepseek_v3 import is_mtp
from ..model.config import ModelConfig
from ..model.registry import architecture
from ..model.forward import HEAD_CHUNK_ROWS
from ..units import bytes_fields

#: Interpreter + torch + dsconvert imported, before any tensor (measured 0.24-0.26 GiB on this project's machine).
BASE_RSS = 256 * 2**20


@dataclass
class ModelCost:
    """Per-model figures (params are logical weights, bytes are what the checkpoint stores)."""

    dense_layer_params: int  # the largest decoder layer without its routed experts
    expert_params: int  # one routed expert
    active_params_per_token: int
    embed_params: int
    head_params: int
    bytes_read: int
    largest_fp8: int  # elements of the largest FP8 weight (dequantized whole, float32 temporaries)
    source_esz: int  # bytes per element of what the source returns (BF16 2, GGUF float32 4)


@dataclass(frozen=True)
class _Dims:
    """The activation-size numbers of one architecture: ``streams`` residual copies per token (V4's mHC: 4),
    ``qk``/``v`` the attended key/value widths per head."""

    hidden: int
    vocab: int
    heads: int
    layers: int
    inter: int
    qk: int
    v: int
    streams: int


def _v3_dims(config: dict) -> _Dims:
    cfg = ModelConfig.from_hf(config)
    return _Dims(cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.num_hidden_layers,
                 max(cfg.intermediate_size, (cfg.n_shared_experts or 0) * cfg.moe_intermediate_size),
                 cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, 1)


def _v4_dims(config: dict) -> _Dims:
    g = v4.geometry(config)
    return _Dims(g.hidden, g.vocab, g.heads, g.layers, g.shared * g.inter, g.head_dim, g.head_dim, g.hc)


def _v4_cost(config: dict, path: Path) -> ModelCost:
    """V4 counts from the layout table (:func:`dsconvert.formats.deepseek_v4.expected_tensors`): a layer's dense
    part is every non-expert tensor of ``layers.{i}.``; MTP (``mtp.*``) is not run."""
    g = v4.geometry(config)
    dense = [0] * g.layers
    for e in v4.expected_tensors(g):
        if 0 <= e.layer < g.layers and e.expert is None:
            n = 1
            for d in e.shape:
                n *= d
            dense[e.layer] += n
    expert = 3 * g.hidden * g.inter
    head = g.vocab * g.hidden
    active = sum(dense) + g.layers * g.experts_per_tok * expert + head
    bytes_read, largest_fp8 = _header_bytes(Path(path), g.layers, lambda n: n.startswith("mtp."))
    return ModelCost(max(dense), expert, active, head, head, bytes_read, largest_fp8, 2)


def model_cost(config: dict, path: Path) -> ModelCost:
    """Parameter and byte counts of the checkpoint at ``path`` (a directory or a ``.gguf`` file) from its config
    and headers; MTP layers are never run and not counted."""
    return _COSTS[architecture(config).name](config, path)


def _v3_cost(config: dict, path: Path) -> ModelCost:
    cfg = ModelConfig.from_hf(config)
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * qk
    else:
        q = h * nh * qk
    attn = (q + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
            + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * h + 2 * h)
    expert = 3 * h * cfg.moe_intermediate_size
    dense_mlp = 3 * h * cfg.intermediate_size
    dense_max = active_sum = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            n_e = cfg.n_routed_experts or 0
            shared = (cfg.n_shared_experts or 0) * expert
            dense = attn + shared + n_e * h + n_e
            active = attn + shared + n_e * h + (cfg.num_experts_per_tok or 0) * expert
        else:
            dense = active = attn + dense_mlp
        dense_max = max(dense_max, dense)
        active_sum += active
    head = cfg.vocab_size * h
    bytes_read, largest_fp8 = _header_bytes(Path(path), cfg.num_hidden_layers)
    return ModelCost(dense_max, expert, active_sum + head, cfg.vocab_size * h, head, bytes_read, largest_fp8,
                     4 if str(path).endswith(".gguf") else 2)


def _header_bytes(path: Path, n_layers: int, skip=None) -> tuple[int, int]:
    """(bytes of every tensor the forward may read, elements of the largest FP8 weight) from the headers."""
    if str(path).endswith(".gguf"):
        from .gguf_source import gguf_files

        return sum(Path(f).stat().st_size for f in gguf_files(path)), 0  # the files (tensor data + small headers)
    from ..formats.checkpoint import scan

    ck = scan(path)
    total = largest = 0
    for name, (_, e) in ck.tensors.items():
        if (skip(name) if skip is not None else is_mtp(name, n_layers)):
            continue
        total += e.nbytes
        if e.dtype == "F8_E4M3":
            largest = max(largest, e.numel)
    return total, largest


def estimate_forward(costs: list[ModelCost], config: dict, seq_lens: list[int], dtype_bytes: int, *,
                     validate: bool, on_gpu: bool = False) -> dict:
    """The cost of running every model of ``costs`` (one for ``logits``; reference + candidate for ``validate``)
    on sequences of ``seq_lens`` tokens, computing in ``dtype_bytes`` (4 float32, 2 bfloat16).

    Returns:
        JSON-able: ``peak_memory_estimate`` (host bytes, with ``bytes``/``gb``/``gib``), ``device_memory_estimate``
        (None on CPU), ``bytes_read``, ``tokens``, ``active_params``, ``tokens_x_active_params``, ``flops``, and
        the phase breakdown (``phases``).
    """
    d = _DIMS[architecture(config).name](config)
    t_all, t_max = sum(seq_lens), max(seq_lens)
    h, v, nh, n_layers = d.hidden, d.vocab, d.heads, d.layers
    c = dtype_bytes
    inter = d.inter
    keys = t_max + (t_max // 4 if d.streams > 1 else 0)  # V4: sliding keys + CSA's compressed entries
    acts = t_all * h * c * 8 * d.streams + t_all * inter * c * 3 + 3 * nh * t_max * keys * 4
    qk = d.qk
    acts += t_max * nh * (qk + d.v) * c * 4  # q, k, v and their concatenations
    host_phase, dev_phase = [], []
    for m in costs:
        src = m.source_esz
        # The compute-dtype copy. On the CPU a bfloat16 matmul widens its weight to float32 temporaries (measured:
        # bf16 compute peaks higher than float32 here), so it costs as much as a float32 cast.
        cast = c if on_gpu else 4
        layer_host = (m.dense_layer_params + m.expert_params) * src + m.largest_fp8 * 4 * 2
        layer_dev = (m.dense_layer_params + m.expert_params) * cast + acts
        embed_host = m.embed_params * src + t_all * h * 4
        head_host = m.head_params * src + HEAD_CHUNK_ROWS * h * c + t_all * v * 4
        if on_gpu:
            host_phase.append(max(layer_host, embed_host, m.head_params * src + t_all * v * 4))
            dev_phase.append(max(layer_dev, HEAD_CHUNK_ROWS * h * c + t_all * v * 4))
        else:
            host_phase.append(max(layer_host + layer_dev, embed_host, head_host))
    hidden = len(costs) * n_layers * t_all * h * d.streams * 4 if validate else 0  # every layer's hidden states, both models
    ref_logits = t_all * v * 4 if validate else 0  # kept while the candidate runs
    # Scoring (model/metrics.py, validate._pool): float64 log_softmax of both models' logits, their pooled copies,
    # exp, difference, product, zeros and where: 11 live (T, vocab) float64 tensors with several sequences, 9
    # with one; both float32 logit sets are still alive.
    units = (11 if len(seq_lens) > 1 else 9) if validate else 0
    score = units * (t_all - len(seq_lens)) * v * 8
    lasting = hidden + ref_logits
    peak_host = BASE_RSS + max(lasting + max(host_phase), hidden + len(costs) * t_all * v * 4 + score)
    tokens_x_active = sum(t_all * m.active_params_per_token for m in costs)
    attn_flops = len(costs) * n_layers * sum(2 * nh * t * t * (qk + d.v) for t in seq_lens)
    return {
        "peak_memory_estimate": bytes_fields(peak_host),
        "device_memory_estimate": bytes_fields(max(dev_phase) + lasting) if on_gpu else None,
        "bytes_read": bytes_fields(sum(m.bytes_read for m in costs)),
        "tokens": t_all,
        "sequences": len(seq_lens),
        "models": len(costs),
        "active_params": [m.active_params_per_token for m in costs],
        "tokens_x_active_params": tokens_x_active,
        "flops": 2 * tokens_x_active + attn_flops,
        "phases": {"largest_layer_params": max(m.dense_layer_params for m in costs),
                   "expert_params": max(m.expert_params for m in costs),
                   "activations_bytes": acts, "lasting_bytes": lasting, "scoring_bytes": score},
    }


_COSTS = {"deepseek_v3": _v3_cost, "deepseek_v4": _v4_cost}
_DIMS = {"deepseek_v3": _v3_dims, "deepseek_v4": _v4_dims}
