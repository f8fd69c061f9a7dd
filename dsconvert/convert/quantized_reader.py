"""Read INT-quantized checkpoints (compressed-tensors pack-quantized, AutoAWQ GEMM, GPTQ v1/v2) back as float
weights, through the format module that ``quantization_config`` names. Used by ``validate``'s weight source."""

from __future__ import annotations

import torch

from ..errors import UnsupportedError
from ..formats.checkpoint import Checkpoint
from ..formats.registry import detect_format


class QuantizedReader:
    """``has(name)`` / ``get(name)`` for ``<module>.weight`` names of quantized modules.

    Raises:
        UnsupportedError: ``quantization_config`` matches no registered format.
    """

    def __init__(self, ck: Checkpoint, qc: dict):
        self.ck = ck
        self.fmt = detect_format(qc)
        if self.fmt is None:
            raise UnsupportedError(f"{ck.root}: quantization_config quant_method {qc.get('quant_method')!r} "
                                   "is not a format dsconvert reads")
        self.spec = self.fmt.spec_from_config(qc)
        self.qc = qc
        suffixes = self.fmt.tensor_names("", None)
        self._modules: dict[str, list[str]] = {}
        for name in ck.tensors:
            mod, _, suf = name.rpartition(".")
            if suf in suffixes:
                self._modules.setdefault(mod, []).append(name)

    def has(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self._modules

    def get(self, name: str) -> torch.Tensor:
        mod = name[: -len(".weight")]
        tensors = {n: self.ck.read(n) for n in self._modules[mod]}
        return self.fmt.decode(tensors, self.qc)
