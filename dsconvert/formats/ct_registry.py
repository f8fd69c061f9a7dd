"""The registry the compressed-tensors codecs register into (``@register_ct_compressor("int-quantized")``, one
compression format each), and the ``quantization_config`` they share.

It imports no codec, so every codec module can import it; :mod:`dsconvert.formats.compressed_tensors` imports
the codecs (and so registers them) and is where the format is looked up. Same rules as the format registry
(:mod:`dsconvert.formats.format_registry`).

Source: compressed-tensors 0.20.1 ``compressors/model_compressors/model_compressor.py::update_config``.
"""

from __future__ import annotations

from typing import Iterable

from dsconvert.quant.registry import Registry

__all__ = ["CT_COMPRESSORS", "register_ct_compressor", "CT_LAYOUT_VERSION", "ct_quantization_config"]


#: compression format name (the ``format`` written in ``quantization_config``) -> codec class.
CT_COMPRESSORS: Registry[type] = Registry("compressed-tensors compression format")


def register_ct_compressor(compression_format: str):
    """Class decorator: register a :class:`CompressedTensorsFormat` subclass as the codec of one
    compressed-tensors compression format (``"int-quantized"``); sets ``cls.compression_format``."""
    inner = CT_COMPRESSORS.register(compression_format)

    def deco(cls):
        cls.compression_format = compression_format
        return inner(cls)

    return deco


#: compressed-tensors release whose on-disk layout and config this module reproduces (written as
#: ``quantization_config.version``, as ``ModelCompressor.update_config`` writes its own version).
CT_LAYOUT_VERSION = "0.20.1"


def ct_quantization_config(config_groups: dict[str, dict], fmt: str, ignore: Iterable[str] = ()) -> dict:
    """A compressed-tensors ``quantization_config`` around ``config_groups``, with the keys and nesting of
    compressed-tensors 0.20.1's ``ModelCompressor.update_config``; ``fmt`` is the top-level ``format`` (one
    compressor's name, or ``mixed-precision``)."""
    return {
        "config_groups": config_groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_LAYOUT_VERSION,
    }
