"""Which tensors ``dsconvert quantize`` quantizes: one ``LayerPolicy(name, shape) -> QuantSpec | None``.

Defaults (docs/cli-conventions.md, docs/int-formats.md §4): the decoder Linears of attention
and MLPs are quantized, including routed and shared experts and the MTP block's decoder layer; kept in their
float dtype: embeddings, ``lm_head`` and the MTP ``shared_head.head``, every norm, the MoE router
(``mlp.gate.weight`` and ``e_score_correction_bias``), the MTP ``eh_proj``, V3.2 indexer tensors.

``--ignore`` takes exact module names (``model.layers.0.self_attn.kv_b_proj``, ``lm_head``) or ``re:`` regular
expressions matched from the start of the module name (``re:.*kv_b_proj$``), as llm-compressor's ``ignore``.

Fused groups must share one precision, because vLLM/SGLang load them into one fused layer ("All shards of fused
layers to have the same precision", docs/known-failures.md item 36): {q_a_proj, kv_a_proj_with_mqa},
{gate_proj, up_proj} of each MLP, and every routed expert of a layer.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

from ..errors import UsageError
from ..formats import deepseek_v3 as v3
from ..formats import deepseek_v4 as v4_layout
from ..quant.rtn import QuantSpec

log = logging.getLogger(__name__)

def fused_group(weight_name: str) -> str | None:
    """The fused group of a quantizable weight (its members share one precision), else None: V3's
    (:func:`dsconvert.formats.deepseek_v3.fused_group`) or DeepSeek-V4's
    (:func:`dsconvert.formats.deepseek_v4.fused_group`)."""
    return v3.fused_group(weight_name) or v4_layout.fused_group(weight_name)


def default_ignore(v4: bool) -> list[str]:
    """The formats' ignore patterns for what the policy never quantizes: V3 or DeepSeek-V4 release names."""
    return list(v4_layout.KEPT_LINEARS if v4 else v3.KEPT_LINEARS)


def module_of(weight_name: str) -> str:
    """``model.layers.3.mlp.experts.7.down_proj.weight`` -> ``model.layers.3.mlp.experts.7.down_proj``."""
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module or pattern + ".weight" == module


@dataclass
class LayerPolicy:
    """``policy(name, shape) -> QuantSpec | None`` (None = keep in float).

    Args:
        spec: the spec for quantized tensors.
        ignore: ``--ignore`` patterns (exact module names or ``re:`` regexes).
    """

    spec: QuantSpec
    ignore: list[str] = field(default_factory=list)
    matched: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for p in self.ignore:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise UsageError(f"--ignore {p!r}: not a valid regular expression ({e})") from e
        self.matched = {p: 0 for p in self.ignore}

    @staticmethod
    def quantizable(name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and (v3.QUANTIZABLE.match(name) is not None
                                    or v4_layout.QUANTIZABLE.match(name) is not None)

    def __call__(self, name: str, shape: tuple[int, ...]) -> QuantSpec | None:
        if not self.quantizable(name, shape):
            return None
        mod = module_of(name)
        hit = False
        for p in self.ignore:
            if _matches(p, mod):
                self.matched[p] += 1
                hit = True
        return None if hit else self.spec

    def unmatched(self) -> list[str]:
        """Patterns that matched no quantizable module (call after the policy has seen every tensor)."""
        return [p for p, n in self.matched.items() if n == 0]


def check_fused_groups(decisions: dict[str, bool]) -> None:
    """Refuse mixed precision inside a fused group.

    Args:
        decisions: quantizable weight name -> True if quantized.

    Raises:
        UsageError: naming the group, one quantized and one unquantized member.
    """
    groups: dict[str, dict[bool, list[str]]] = defaultdict(lambda: {True: [], False: []})
    for name, q in decisions.items():
        g = fused_group(name)
        if g is not None:
            groups[g][q].append(module_of(name))
    for g, d in groups.items():
        if d[True] and d[False]:
            raise UsageError(f"{g} must share one precision, but {d[True][0]} would be quantized and "
                             f"{d[False][0]} kept ({len(d[False])} kept, {len(d[True])} quantized)",
                             hint="serving engines fuse these layers; --ignore all members of the group or none")
