"""Where the reference model gets its weights: the :class:`WeightSource` protocol.

The reference forward (:mod:`dsconvert.model.forward`) never opens files. It asks a
``WeightSource`` for one tensor at a time by its Hugging Face name, e.g.
``model.layers.3.mlp.experts.7.down_proj.weight``, and drops the tensor when the layer is done.
Readers for FP8 checkpoints on disk, INT4 formats and GGUF implement the same three members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class WeightSource(Protocol):
    """Read-only, name-addressed access to a checkpoint's dequantized tensors.

    Attributes:
        config: the parsed ``config.json`` (a plain dict).
    """

    config: dict

    def has(self, name: str) -> bool:
        """True if the checkpoint holds tensor ``name`` (HF name, e.g. ``model.norm.weight``)."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The dequantized tensor ``name``, float32 or bfloat16; the model casts it.

        Raises:
            KeyError: if the checkpoint has no such tensor.
        """
        ...


class DictWeightSource:
    """A :class:`WeightSource` over an in-memory ``{name: tensor}`` mapping (tests, small models).

    Args:
        config: the parsed ``config.json``.
        state_dict: HF-named tensors. Float8 or other non-float tensors are refused at ``get``;
            dequantize before wrapping.
    """

    def __init__(self, config: Mapping, state_dict: Mapping[str, torch.Tensor]):
        self.config = dict(config)
        self._tensors = dict(state_dict)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise KeyError(f"weight source has no tensor {name!r}") from None
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"{name}: dtype {t.dtype} is not a dequantized float dtype")
        return t

    def names(self) -> list[str]:
        """All tensor names, sorted (not part of the protocol)."""
        return sorted(self._tensors)
