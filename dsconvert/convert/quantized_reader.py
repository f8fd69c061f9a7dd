"""Read quantized checkpoints (compressed-tensors pack-/int-/float-quantized, AutoAWQ GEMM, GPTQ v1/v2) back as
float weights, through the codec that ``quantization_config`` names (``IntFormat.from_config``). Used by
``validate``'s weight source. A quantized module is a prefix that has the codec's ``marker_suffix`` tensor."""

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
        fmt = detect_format(qc)
        if fmt is None:
            raise UnsupportedError(f"{ck.root}: quantization_config quant_method {qc.get('quant_method')!r} "
                                   "is not a format dsconvert reads")
        self.fmt = fmt.from_config(qc)
        self.spec = self.fmt.spec_from_config(qc)
        self.qc = qc
        suffixes = self.fmt.tensor_names("", None)
        marker = self.fmt.marker_suffix
        found: dict[str, list[str]] = {}
        for name in ck.tensors:
            mod, _, suf = name.rpartition(".")
            if suf in suffixes:
                found.setdefault(mod, []).append(name)
        self._modules = {m: ns for m, ns in found.items() if f"{m}.{marker}" in ns}

    def has(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self._modules

    def get(self, name: str) -> torch.Tensor:
        mod = name[: -len(".weight")]
        tensors = {n: self.ck.read(n) for n in self._modules[mod]}
        return self.fmt.decode(tensors, self.spec)
