"""A ``deepseek2`` GGUF (one file or llama.cpp splits) as a :class:`dsconvert.model.WeightSource`.

Serves tensors by their Hugging Face names, so the reference forward (and ``dsconvert validate``) runs on
the GGUF exactly as on a checkpoint:

* ``config`` is rebuilt from the GGUF metadata as an HF-style ``config.json`` dict (inverse of
  :mod:`dsconvert.formats.gguf_meta`; float32 KV values are read back as the shortest decimal that round-trips
  in float32, so ``1e-6`` stays ``1e-6``);
* every tensor is dequantized with dsconvert's own ggml dequantizers (:mod:`dsconvert.quant.ggml`);
* ``model.layers.N.mlp.experts.E.*`` is expert ``E`` of the stacked ``ffn_*_exps`` (only its bytes are read);
* ``self_attn.kv_b_proj.weight`` is re-fused from ``attn_k_b``/``attn_v_b`` with
  :func:`~dsconvert.formats.gguf_deepseek2.fuse_kv_b` (bit-exact inverse of the converter's split).

The MTP layer is not in a deepseek2 GGUF, so ``has`` is False for it.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import BadInputError, UnsupportedError
from ..formats import gguf_deepseek2 as g2
from ..formats.gguf_names import EXPERT_TENSORS, KV_B_OUTPUTS, T
from ..quant import ggml

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def gguf_files(path: str | Path) -> list[Path]:
    """The files of a GGUF: ``path`` itself, or all splits when ``path`` is one split (any of them) or the
    un-split name ``FILE.gguf`` whose splits ``FILE-0000i-of-0000N.gguf`` exist.

    Raises:
        BadInputError: nothing found, or a split missing.
    """
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if m is None and not p.exists():
        found = sorted(p.parent.glob(glob.escape(p.stem) + "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))
        if not found:
            raise BadInputError(f"{p}: no such GGUF file (and no split files {p.stem}-0000i-of-0000N.gguf)")
        m = _SPLIT_RE.match(found[0].name)
    if m is None:
        return [p]
    n = int(m.group("n"))
    files = [p.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BadInputError(f"{p}: split files missing: {', '.join(missing)}", hint="all splits must sit together")
    return files


def _f32(v: Any) -> Any:
    """A float32 KV value as the shortest decimal that round-trips (``1e-06``, not ``9.99999997e-07``)."""
    return float(str(np.float32(v))) if isinstance(v, float) else v


def config_from_metadata(kv: dict[str, Any], tensor_names: set[str]) -> dict:
    """An HF-style DeepSeek ``config.json`` dict from deepseek2 GGUF metadata (what ReferenceModel needs).

    Raises:
        UnsupportedError: not ``deepseek2``, or a legacy MLA file without ``*_mla`` keys.
    """
    arch = kv.get("general.architecture")
    if arch != g2.ARCH_NAME:
        raise UnsupportedError(f"GGUF architecture {arch!r} is not {g2.ARCH_NAME!r}")

    def g(key: str, default: Any = None) -> Any:
        return _f32(kv.get(f"{arch}.{key}", default))

    key_mla, val_mla = g("attention.key_length_mla"), g("attention.value_length_mla")
    if key_mla is None or val_mla is None:
        raise UnsupportedError("GGUF lacks attention.key_length_mla / value_length_mla (a pre-PR #12801 or "
                               "legacy kv_b file); only the mainline MLA layout is read")
    rope_dim = int(g("rope.dimension_count"))
    sigmoid = g("expert_gating_func", 1) == int(gguf.ExpertGatingFuncType.SIGMOID)
    n_group = int(g("expert_group_count", 1) or 1)
    n_head = int(g("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
        "hidden_act": "silu",
        "hidden_size": int(g("embedding_length")),
        "intermediate_size": int(g("feed_forward_length", g("expert_feed_forward_length"))),
        "moe_intermediate_size": g("expert_feed_forward_length"),
        "num_hidden_layers": int(g("block_count")),
        "first_k_dense_replace": int(g("leading_dense_block_count", 0)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head,  # head_count_kv = 1 in the file is MLA-as-MQA, not GQA
        "q_lora_rank": g("attention.q_lora_rank"),
        "kv_lora_rank": int(g("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": int(key_mla) - rope_dim,
        "v_head_dim": int(val_mla),
        "n_routed_experts": g("expert_count"),
        "n_shared_experts": g("expert_shared_count"),
        "num_experts_per_tok": g("expert_used_count"),
        "n_group": n_group,
        "topk_group": int(g("expert_group_used_count", 1) or 1),
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if n_group > 1 else "greedy"),
        "scoring_func": "sigmoid" if sigmoid else "softmax",
        "norm_topk_prob": bool(g("expert_weights_norm", False)),
        "routed_scaling_factor": g("expert_weights_scale", 1.0),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": g("rope.freq_base", 10000.0),
        "max_position_embeddings": g("context_length", 4096),
        "vocab_size": int(g("vocab_size", len(kv.get("tokenizer.ggml.tokens") or []))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if g("rope.scaling.type") == "yarn":
        log_mul = g("rope.scaling.yarn_log_multiplier")
        rs = {"type": "yarn", "factor": g("rope.scaling.factor"),
              "original_max_position_embeddings": int(g("rope.scaling.original_context_length")),
              "beta_fast": g("rope.scaling.yarn_beta_fast", 32.0), "beta_slow": g("rope.scaling.yarn_beta_slow", 1.0)}
        if log_mul is not None:
            # written as 0.1 * mscale_all_dim; llama.cpp assumes mscale == mscale_all_dim (true for V3/R1)
            m = _f32(float(np.float32(log_mul)) / 0.1)
            rs.update(mscale=m, mscale_all_dim=m)
        cfg["rope_scaling"] = rs
    return cfg


class GGUFWeightSource:
    """A :class:`dsconvert.model.WeightSource` over a deepseek2 GGUF (single file or splits).

    Args:
        path: the ``.gguf`` file, any one of its splits, or the un-split name of a split set.

    Raises:
        BadInputError: missing files or a tensor that appears twice.
        UnsupportedError: not a mainline-layout deepseek2 file.
    """

    def __init__(self, path: str | Path):
        self.files = gguf_files(path)
        self.path = Path(path)
        self._readers = [gguf.GGUFReader(f) for f in self.files]
        self._tensors: dict[str, Any] = {}
        for f, r in zip(self.files, self._readers):
            for t in r.tensors:
                if t.name in self._tensors:
                    raise BadInputError(f"{f}: tensor {t.name!r} appears twice in the GGUF")
                self._tensors[t.name] = t
        self.metadata = {k: fld.contents() for k, fld in self._readers[0].fields.items()
                         if not k.startswith("GGUF.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                    "tokenizer.ggml.token_type")}
        self.config = config_from_metadata(self.metadata, set(self._tensors))

    # -- name mapping ----------------------------------------------------------------------------
    def _target(self, name: str) -> tuple[str, Any] | None:
        """(kind, arg): ("tensor", gguf name) | ("expert", (gguf name, eid)) | ("kv_b", (k_b, v_b)); None if
        the name has no GGUF counterpart (MTP, unknown)."""
        try:
            if g2.drop_reason(name, self.config) is not None:
                return None
            ex = g2.expert_of(name)
            if ex is not None:
                bid, eid, proj = ex
                return "expert", (g2.tensor_name(EXPERT_TENSORS[proj], bid), eid)
            t, bid, suffix = g2.hf_tensor_kind(name)
        except UnsupportedError:
            return None
        if t is T.ATTN_KV_B:
            return "kv_b", tuple(g2.tensor_name(o, bid, suffix) for o in KV_B_OUTPUTS)
        return "tensor", g2.tensor_name(t, bid, suffix)

    def has(self, name: str) -> bool:
        tgt = self._target(name)
        if tgt is None:
            return False
        kind, arg = tgt
        if kind == "kv_b":
            return all(a in self._tensors for a in arg)
        if kind == "expert":
            t = self._tensors.get(arg[0])
            return t is not None and arg[1] < int(t.shape[-1])
        return arg in self._tensors

    def get(self, name: str) -> torch.Tensor:
        if not self.has(name):
            raise KeyError(f"{self.path}: no tensor for {name!r}")
        kind, arg = self._target(name)
        if kind == "kv_b":
            return g2.fuse_kv_b(self.read(arg[0]), self.read(arg[1]))
        if kind == "expert":
            return self.read(arg[0], expert=arg[1])
        return self.read(arg)

    # -- raw access ------------------------------------------------------------------------------
    def ggml_type(self, gguf_name: str) -> str:
        return gguf.GGMLQuantizationType(self._tensors[gguf_name].tensor_type).name

    def raw(self, gguf_name: str) -> np.ndarray:
        """The tensor's stored bytes (uint8, flat; a view of the memory map)."""
        t = self._tensors[gguf_name]
        return np.asarray(t.data).reshape(-1).view(np.uint8)

    def read(self, gguf_name: str, expert: int | None = None) -> torch.Tensor:
        """GGUF tensor ``gguf_name`` dequantized to float32, numpy-order shape (``expert``: one slice of a
        stacked ``(n_expert, M, N)`` tensor, reading only its bytes)."""
        t = self._tensors[gguf_name]
        shape = tuple(int(s) for s in reversed(t.shape))  # numpy order
        raw = self.raw(gguf_name)
        if expert is not None:
            per = raw.size // shape[0]
            raw = raw[expert * per: (expert + 1) * per]
            shape = shape[1:]
        data = torch.from_numpy(np.array(raw, copy=True))
        return ggml.dequantize(data, self.ggml_type(gguf_name), shape)

    def names(self) -> list[str]:
        """GGUF tensor names in file order (not part of the WeightSource protocol)."""
        return list(self._tensors)
