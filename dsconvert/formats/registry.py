"""Lookups in the registry of on-disk output formats (:mod:`dsconvert.formats.format_registry`, where the
formats register with ``@register_format("compressed-tensors", aliases=[...])``).

The built-in integer formats are imported (and so registered) on first use of :func:`get_format`,
:func:`registered_formats`, :func:`describe_formats` or :func:`detect_format`; they import the registry
module, not this one, so there is no import cycle.
"""

from __future__ import annotations

from typing import Any

from dsconvert.formats.format_registry import FORMATS, register_format

__all__ = ["FORMATS", "register_format", "get_format", "registered_formats", "describe_formats", "detect_format"]

def get_format(name: str) -> Any:
    """An instance of the format registered as ``name`` or an alias.

    Raises:
        KeyError: unknown name; lists every name and alias.
    """
    _load_builtins()
    return FORMATS.get(name)()


def registered_formats() -> list[str]:
    """Canonical format names, in registration order."""
    _load_builtins()
    return FORMATS.names()


def describe_formats() -> str:
    """Every format with its aliases, for ``--help`` and hints: ``"autoawq (aliases: awq, awq-gemm), ..."``."""
    _load_builtins()
    return FORMATS.describe()


def detect_format(quantization_config: dict) -> Any | None:
    """The format instance whose ``detect(quantization_config)`` is true, or None.

    Raises:
        ValueError: more than one format claims the config (a registry bug).
    """
    _load_builtins()
    hits = [cls for _, cls in FORMATS.items() if hasattr(cls, "detect") and cls.detect(quantization_config)]
    if len(hits) > 1:
        raise ValueError(f"several formats claim this quantization_config: {[c.name for c in hits]}")
    if not hits:  # compressed-tensors with FP4 or several formats: read per config group (written by quantize)
        from dsconvert.formats.ct_groups import CompressedTensorsGroupsReader

        if CompressedTensorsGroupsReader.detect(quantization_config):
            return CompressedTensorsGroupsReader()
    return hits[0]() if hits else None


def _load_builtins() -> None:
    # Import for the registration side effect (deferred: importing this module stays cheap).
    import dsconvert.formats.autoawq  # noqa: F401
    import dsconvert.formats.compressed_tensors  # noqa: F401
    import dsconvert.formats.deepseek_fp8  # noqa: F401
    import dsconvert.formats.gptq  # noqa: F401
