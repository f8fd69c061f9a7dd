"""Weight sources over checkpoints on disk, for the reference forward (:mod:`dsconvert.model`).

:class:`CheckpointWeightSource` serves HF-named tensors from any safetensors checkpoint dsconvert reads or
writes, each through its own dequantizer:

* DeepSeek FP8 + ``weight_scale_inv``: dequantized on the fly by the exact fp8-to-bf16 rule (BF16 result), so a
  correct BF16 conversion of the same checkpoint is identical to this source;
* BF16 / F16 / F32 tensors: as stored;
* formats written by ``dsconvert quantize`` (compressed-tensors pack-/int-/float-quantized, AutoAWQ GEMM, GPTQ):
  decoded by the codec the checkpoint's ``quantization_config`` names (W8A8 and FP8_BLOCK weights dequantized
  as their loaders do; activation quantization is not emulated here). A quantized module's tensors take
  precedence over a stored tensor of the same name (compressed-tensors int/float-quantized store the quantized
  payload itself as ``weight``).

Only the requested tensor is read, so memory follows the model's layer streaming.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..quant.fp8_block import dequant_fp8_block


class CheckpointWeightSource:
    """A :class:`dsconvert.model.WeightSource` over a checkpoint directory.

    Args:
        root: checkpoint directory.
        check_values: read every FP8 scale up front and refuse NaN/Inf/non-positive ones.

    Raises:
        BadInputError / UnsupportedError: the checkpoint fails the same pre-flight checks as conversion.
    """

    def __init__(self, root: str | Path, *, check_values: bool = True):
        self.ck: Checkpoint = open_checkpoint(root, check_values=check_values)
        self.config = self.ck.config
        self.root = Path(root)
        self._quant = _quantized_reader(self.ck)

    def has(self, name: str) -> bool:
        if self._quant is not None and self._quant.has(name):
            return True
        return name in self.ck.tensors and not self.ck.is_scale(name)

    def has_raw(self, name: str) -> bool:
        """A tensor stored under exactly this name (quantization parameters included)."""
        return name in self.ck.tensors

    def get_raw(self, name: str) -> torch.Tensor:
        """The stored tensor ``name`` as is (e.g. an NVFP4 module's ``input_global_scale``)."""
        return self.ck.read(name)

    def get(self, name: str) -> torch.Tensor:
        if self._quant is not None and self._quant.has(name):
            return self._quant.get(name)
        if name in self.ck.tensors and not self.ck.is_scale(name):
            t = self.ck.read(name)
            if t.dtype == torch.float8_e4m3fn:
                return dequant_fp8_block(t, self.ck.read(self.ck.scale_of(name)), self.ck.fp8.block)
            return t
        raise KeyError(f"{self.root}: no tensor {name!r}")


def _quantized_reader(ck: Checkpoint):
    """The decoder for an INT-quantized checkpoint written by ``dsconvert quantize``, or None."""
    qc = ck.config.get("quantization_config") or {}
    if not qc or qc.get("quant_method") == "fp8":
        return None
    from .quantized_reader import QuantizedReader

    return QuantizedReader(ck, qc)
