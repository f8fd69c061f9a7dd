"""compressed-tensors (``quant_method: compressed-tensors``), as llm-compressor writes it.

The format is one ``--format`` (``compressed-tensors``) with one codec per compressed-tensors compression
format, registered in :data:`CT_COMPRESSORS` (``@register_ct_compressor("int-quantized")``, one module each):
:meth:`CompressedTensorsFormat.bind` picks the first codec whose ``accepts(scheme)`` is true, and
:meth:`CompressedTensorsFormat.from_config` the codec a checkpoint's ``format`` names. The codecs are
``pack-quantized`` (weight-only INT4/INT8, :mod:`dsconvert.formats.ct_pack_quantized`, the class the others
subclass), ``float-quantized`` (FP8_BLOCK, :mod:`dsconvert.formats.ct_float_quantized`) and ``int-quantized``
(W8A8, :mod:`dsconvert.formats.ct_int_quantized`), registered in that order.

This module imports every codec (and so registers them) and registers the format; the codecs import the
registry (:mod:`dsconvert.formats.ct_registry`, which imports no codec) and the ``pack-quantized`` codec, never
this module, so no codec and its container import each other. Look the codecs up through this module.
"""

from __future__ import annotations

from dsconvert.formats.ct_float_quantized import CTFloatQuantized
from dsconvert.formats.ct_int_quantized import CTIntQuantized
from dsconvert.formats.ct_pack_quantized import CompressedTensorsFormat
from dsconvert.formats.ct_registry import (
    CT_COMPRESSORS,
    CT_LAYOUT_VERSION,
    ct_quantization_config,
    register_ct_compressor,
)
from dsconvert.formats.format_registry import register_format

__all__ = ["CompressedTensorsFormat", "CTFloatQuantized", "CTIntQuantized", "CT_LAYOUT_VERSION",
           "ct_quantization_config", "CT_COMPRESSORS", "register_ct_compressor"]

register_format("compressed-tensors", aliases=["ct", "pack-quantized", "llm-compressor"])(CompressedTensorsFormat)
