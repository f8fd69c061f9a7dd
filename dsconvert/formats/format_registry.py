"""The registry the on-disk output formats register into: ``@register_format("compressed-tensors", aliases=[...])``.

It imports no format, so every format module can import it; the lookups that load the built-in formats first
(:func:`~dsconvert.formats.registry.get_format`, ``registered_formats``, ``describe_formats``,
``detect_format``) are in :mod:`dsconvert.formats.registry`. Same rules as the scheme registry
(:mod:`dsconvert.quant.registry`): normalised names, duplicates raise, unknown names raise a ``KeyError``
listing every name and alias.
"""

from __future__ import annotations

from typing import Iterable

from dsconvert.quant.registry import Registry

__all__ = ["FORMATS", "register_format"]

FORMATS: Registry[type] = Registry("format")


def register_format(name: str, aliases: Iterable[str] = ()):
    """Class decorator; sets ``cls.name = name`` and registers the class."""
    return FORMATS.register_class(name, aliases)
