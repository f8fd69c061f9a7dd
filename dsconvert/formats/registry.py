"""Registry of on-disk output formats: ``@register_format("compressed-tensors", aliases=[...])``.

Same rules as the scheme registry (:mod:`dsconvert.quant.registry`): normalised names, duplicates
raise, unknown names raise a ``KeyError`` listing every name and alias.

The built-in integer formats register themselves on first use of :func:`get_format`,
:func:`registered_formats` or :func:`detect_format` (deferred import, no cycle).
"""

from __future__ import annotations

from typing import Any, Iterable

from dsconvert.quant.registry import Registry

__all__ = ["FORMATS", "register_format", "get_format", "registered_formats", "detect_format"]

FORMATS: Registry[type] = Registry("format")


def register_format(name: str, aliases: Iterable[str] = ()):
    """Class decorator; sets ``cls.name = name`` and registers the class."""
    return FORMATS.register_class(name, aliases)


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
    # Import for the registration side effect; deferred to avoid an import cycle.
    import dsconvert.formats.autoawq  # noqa: F401
    import dsconvert.formats.compressed_tensors  # noqa: F401
    import dsconvert.formats.deepseek_fp8  # noqa: F401
    import dsconvert.formats.gptq  # noqa: F401
