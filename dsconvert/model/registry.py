"""Which reference forward runs a checkpoint: one table keyed by ``config.json``'s ``model_type``.

An entry names the model class and the two layout facts a layer-streaming driver needs (which decoder layer a
tensor belongs to, and whether it is a routed expert, which is never kept resident). Model types not listed use
the DeepSeek V2/V3 entry (``deepseek_v2``, ``deepseek_v3``, ``deepseek_v32`` and configs without a model type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsconvert.formats import deepseek_v3, deepseek_v4


@dataclass(frozen=True)
class Architecture:
    """``model``: class built as ``model(source, dtype=..., device=...)`` with ``embed`` / ``layer_forward_many``
    (keyword ``token_ids``) / ``head`` and ``cfg.num_hidden_layers``; ``layer_of(name)``: decoder layer index of a
    tensor name or None; ``is_routed_expert(name)``."""

    name: str
    model: Callable[[], type]
    layer_of: Callable[[str], int | None]
    is_routed_expert: Callable[[str], bool]


def _v3_model() -> type:
    from dsconvert.model.forward import ReferenceModel

    return ReferenceModel


def _v4_model() -> type:
    from dsconvert.model.v4 import V4ReferenceModel

    return V4ReferenceModel


V3 = Architecture("deepseek_v3", _v3_model, deepseek_v3.layer_index, lambda n: ".mlp.experts." in n)
V4 = Architecture("deepseek_v4", _v4_model, deepseek_v4.layer_index, deepseek_v4.is_routed_expert)

ARCHITECTURES: dict[str, Architecture] = {deepseek_v4.MODEL_TYPE: V4}


def architecture(config: dict) -> Architecture:
    """The :class:`Architecture` for a parsed ``config.json`` (V2/V3 unless its ``model_type`` is listed)."""
    return ARCHITECTURES.get(str(config.get("model_type", "")), V3)


def reference_model(source, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
    """The reference forward for ``source`` (a :class:`~dsconvert.model.source.WeightSource`), chosen by
    :func:`architecture` of ``source.config``. Raises what the model's constructor raises."""
    return architecture(source.config).model()(source, dtype=dtype, device=device)
