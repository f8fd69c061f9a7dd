"""Weight sources over checkpoints on disk, for the reference forward (:mod:`dsconvert.model`).

:class:`CheckpointWeightSource` serves HF-named tensors from any safetensors checkpoint dsconvert reads or
writes, each through its own dequantizer:

* DeepSeek FP8 + ``weight_scale_inv``: dequantized on the fly by the exact fp8-to-bf16 rule (BF16 result), so a
  correct BF16 conversion of the same checkpoint is identical to this source;
* DeepSeek-V4 (release names): FP8 + E8M0/F32 ``.scale`` and FP4 e2m1 experts + E8M0 ``.scale``, dequantized by
  the same rule as fp8-to-bf16 (docs/checkpoint-layout.md §13);
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

from ..errors import UsageError
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..model.registry import architecture
from ..quant.fp4_decode import dequant_fp4, e8m0_grid_to_float32
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
                scale = e8m0_grid_to_float32(self.ck.read(self.ck.scale_of(name)))  # V4 E8M0; V3 F32 unchanged
                return dequant_fp8_block(t, scale, self.ck.fp8.block)
            if self.ck.is_fp4_weight(name):  # DeepSeek-V4 FP4 routed experts -> BF16 [M, N], exact
                return dequant_fp4(t, self.ck.read(self.ck.scale_of(name)))
            return t
        raise KeyError(f"{self.root}: no tensor {name!r}")


def _quantized_reader(ck: Checkpoint):
    """The decoder for an INT-quantized checkpoint written by ``dsconvert quantize``, or None."""
    qc = ck.config.get("quantization_config") or {}
    if not qc or qc.get("quant_method") == "fp8":
        return None
    from .quantized_reader import QuantizedReader

    return QuantizedReader(ck, qc)


class LayerCachedSource:
    """Wraps a weight source: keeps the tensors of the layer in use, drops them when another layer is asked for.

    Lets several sequences run through one layer's attention while its weights are read once. Routed experts are
    not kept: the MoE runs once per layer on all tokens, one expert at a time (a V3 layer's experts are 22.5 GB
    in BF16; one expert is 88 MB)."""

    def __init__(self, inner):
        self.inner = inner
        self.config = inner.config
        self._layer: int | None = None
        self._cache: dict[str, torch.Tensor] = {}
        arch = architecture(inner.config)
        self._layer_of, self._is_expert = arch.layer_of, arch.is_routed_expert

    def has(self, name: str) -> bool:
        return self.inner.has(name)

    def get(self, name: str) -> torch.Tensor:
        layer = self._layer_of(name)
        layer = -1 if layer is None else layer
        if layer != self._layer:
            self._cache.clear()
            self._layer = layer
        t = self._cache.get(name)
        if t is None:
            t = self.inner.get(name)
            if not self._is_expert(name):
                self._cache[name] = t
        return t


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value (float32/fp32/f32, bfloat16/bf16).

    Raises:
        UsageError (exit 2): another name.
    """
    table = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    if name not in table:
        raise UsageError(f"--dtype {name!r}", hint="use float32 or bfloat16")
    return table[name]
