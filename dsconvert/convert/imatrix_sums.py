"""The sums ``dsconvert imatrix`` collects: squared input activations per matrix (per expert for routed experts)
under the GGUF tensor names, fed by the reference forward's hooks (:mod:`dsconvert.convert.imatrix` runs the
forward and writes the file; a Ray unit of :mod:`dsconvert.convert.calib_ray` feeds one group of experts).
Source: llama.cpp ``tools/imatrix/imatrix.cpp`` (``collect_imatrix``); layouts in the imatrix module notes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..formats import gguf_names as gn


class ImatrixCollector:
    """Float64 sums of squared inputs per GGUF tensor name, fed by the reference forward's hooks.

    ``values[name]`` is ``[n_mat, ne0]``; ``counts[name]`` ``[n_mat]`` (tokens per matrix; one count for every
    tensor but the routed experts, as llama-imatrix keeps them).
    """

    def __init__(self, cfg: dict, n_expert: int):
        self.cfg = cfg
        self.n_expert = n_expert
        self.values: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def _acc(self, name: str, n_mat: int, mat: int, x: torch.Tensor, n_tokens: int) -> None:
        ne0 = x.shape[-1]
        v = self.values.get(name)
        if v is None:
            v = self.values[name] = torch.zeros(n_mat, ne0, dtype=torch.float64)
            self.counts[name] = torch.zeros(n_mat if n_mat > 1 and name.endswith("_exps.weight") else 1,
                                            dtype=torch.float64)
        xd = x.detach().to(torch.float64)
        if x.dim() == 3:  # (n_head, T, ne0): one matrix per head, one shared count
            v += (xd * xd).sum(1)
            if mat == 0:
                self.counts[name][0] += n_tokens
            return
        v[mat] += (xd * xd).sum(0)
        self.counts[name][mat if self.counts[name].numel() > 1 else 0] += n_tokens

    def on_linear(self, hf_module: str, x: torch.Tensor) -> None:
        """:data:`~dsconvert.model.layers.LinearHook`: ``x`` ``(T, in_features)`` of HF module ``hf_module``."""
        if hf_module.endswith(".kv_b_proj"):
            return  # llama.cpp's MLA graph uses attn_k_b / attn_v_b instead (on_heads)
        if hf_module == "lm_head" or hf_module == "model.embed_tokens":
            self._acc("output.weight", 1, 0, x, x.shape[0])
            return
        hf = hf_module + ".weight"
        ex = gn.expert_of(hf)
        name = gn.gguf_name(hf, self.cfg)
        if name is None:
            return
        if ex is not None:
            self._acc(name, self.n_expert, ex[1], x, x.shape[0])
        else:
            self._acc(name, 1, 0, x, x.shape[0])

    def on_heads(self, what: str, x: torch.Tensor) -> None:
        """:data:`~dsconvert.model.layers.HeadHook`: ``x`` ``(n_head, T, ne0)`` for ``...kv_b_proj.k_b|v_b``."""
        hf_module, part = what.rsplit(".", 1)
        k_name, v_name = gn.gguf_outputs(hf_module + ".weight", self.cfg)
        self._acc(k_name if part == "k_b" else v_name, x.shape[0], 0, x, x.shape[1])

    def add_matrix(self, name: str, mat: int, row: torch.Tensor, count: float) -> None:
        """Add one routed expert's sums ``row`` ``(ne0,)`` float64 and token ``count``, collected by another
        process's collector (``imatrix --ray``): exactly what :meth:`on_linear` adds for that expert here."""
        v = self.values.get(name)
        if v is None:
            v = self.values[name] = torch.zeros(self.n_expert, row.shape[0], dtype=torch.float64)
            self.counts[name] = torch.zeros(self.n_expert, dtype=torch.float64)
        v[mat] += row
        self.counts[name][mat] += count

    def entries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{name: (in_sum2 float32 [n_mat, ne0], counts float32 [n_mat])}`` in sorted name order. Tensors with
        several matrices and one count (``attn_k_b``/``attn_v_b``) are flattened to ``[1, n_mat * ne0]``, the shape
        llama-imatrix stores them in."""
        out = {}
        for name in sorted(self.values):
            v, c = self.values[name], self.counts[name]
            if c.numel() == 1 and v.shape[0] > 1:
                v = v.reshape(1, -1)
            out[name] = (v.to(torch.float32).numpy(), c.to(torch.float32).numpy())
        return out


class V4ImatrixCollector(ImatrixCollector):
    """The same sums for a DeepSeek-V4 release checkpoint, fed by :class:`~dsconvert.model.v4.V4ReferenceModel`'s
    ``on_linear`` hook (release module names), under the ``deepseek4`` GGUF names that ``dsconvert gguf`` writes
    (:mod:`dsconvert.formats.gguf_deepseek4`): every linear the forward runs and each layer's two mHC mixing
    matrices (``hc_attn_fn``, ``hc_ffn_fn``: the normed flattened streams), one matrix each (``attn_q_a``,
    ``attn_q_b``, ``attn_kv``, ``attn_output_a``, ``attn_output_b``, the compressors' ``kv``/``gate``, the indexer's
    ``attn_q_b``/``proj``, ``ffn_gate_inp``, ``ffn_*_shexp``), the routed experts one matrix per expert over its
    routed tokens (``ffn_{gate,up,down}_exps``, ``counts`` per expert), ``output.weight`` with ``process_output``.

    ``attn_output_a`` (``wo_a``, block diagonal over ``o_groups``): the file stores it 2-D ``[o_groups * o_lora,
    K_g]`` and llama-quantize takes exactly ``K_g`` importance values for it (it refuses ``o_groups * K_g``, the
    per-group layout llama.cpp's graph would give llama-imatrix: "imatrix size 512 is different from tensor size
    256" on the tiny fixture), so its input is summed as ``T * o_groups`` rows of ``K_g`` (every group's input
    against the one importance vector all its rows share), ``counts`` = ``T * o_groups``.
    """

    def __init__(self, cfg: dict, n_expert: int):
        super().__init__(cfg, n_expert)
        from ..formats import gguf_deepseek4 as g4

        self._g4 = g4

    def on_mix(self, name: str, x: torch.Tensor) -> None:
        """``on_mix`` of the V4 forward: ``x`` ``(T, hc * hidden)``, the input of mHC matrix ``name``
        (``layers.{i}.hc_attn_fn`` / ``hc_ffn_fn``: GGUF ``blk.{i}.hc_attn_fn.weight``, which llama.cpp multiplies
        with ``MUL_MAT`` and llama-quantize quantizes)."""
        self._acc(self._g4.gguf_name(name), 1, 0, x, x.shape[0])

    def on_linear(self, module: str, x: torch.Tensor) -> None:
        """:data:`~dsconvert.model.layers.LinearHook`: ``x`` ``(T, in_features)`` of release module ``module``."""
        if module == "head":
            self._acc("output.weight", 1, 0, x, x.shape[0])
            return
        parts = module.split(".")
        if len(parts) == 6 and parts[2:4] == ["ffn", "experts"]:  # layers.L.ffn.experts.E.wK
            self._acc(f"blk.{parts[1]}.{self._g4.EXPERT_NAMES[parts[5]]}", self.n_expert, int(parts[4]), x,
                      x.shape[0])
            return
        name = self._g4.gguf_name(module + ".weight")
        if module.endswith("attn.wo_a"):
            x = x.reshape(-1, x.shape[1] // int(self.cfg["o_groups"]))
        if name is not None:
            self._acc(name, 1, 0, x, x.shape[0])
