"""A small name -> object registry with aliases, shared by schemes and formats (docs/design.md §2).

Names are normalised before lookup: case, ``_``, ``-`` and spaces are ignored, so
``pack_quantized``, ``Pack-Quantized`` and ``packquantized`` are the same key. Registering a name or
alias twice raises; an unknown name raises a ``KeyError`` listing every name and alias.
"""

from __future__ import annotations

import re
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "normalize_name"]


def normalize_name(name: str) -> str:
    """``"W4A16_ASYM"`` / ``"w4a16-asym"`` / ``"w4a16 asym"`` -> ``"w4a16asym"``."""
    return re.sub(r"[\s_\-]+", "", name).lower()


class Registry(Generic[T]):
    """Maps canonical names and aliases to registered objects (classes, usually).

    Args:
        kind: what is registered, for messages (``"scheme"``, ``"format"``).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}  # canonical name -> object, in registration order
        self._aliases: dict[str, list[str]] = {}  # canonical name -> aliases as written
        self._keys: dict[str, str] = {}  # normalised name or alias -> canonical name

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator: ``@registry.register("W4A16", aliases=["int4"])``.

        Raises:
            ValueError: the name or an alias (normalised) is already taken, or is empty.
        """
        aliases = list(aliases)

        def deco(obj: T) -> T:
            keys = [normalize_name(n) for n in [name, *aliases]]
            for raw, key in zip([name, *aliases], keys):
                if not key:
                    raise ValueError(f"empty {self.kind} name {raw!r}")
                if key in self._keys:
                    raise ValueError(f"{self.kind} name {raw!r} is already registered "
                                     f"(by {self._keys[key]!r})")
            if len(set(keys)) != len(keys):
                raise ValueError(f"{self.kind} {name!r}: aliases {aliases} repeat a name after normalisation")
            self._items[name] = obj
            self._aliases[name] = aliases
            for key in keys:
                self._keys[key] = name
            return obj

        return deco

    def register_class(self, name: str, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Class decorator: like :meth:`register`, and sets ``cls.name = name`` (schemes, formats)."""
        inner = self.register(name, aliases)

        def deco(cls: T) -> T:
            cls.name = name
            return inner(cls)

        return deco

    def canonical(self, name: str) -> str:
        """The canonical name for ``name`` or any alias of it.

        Raises:
            KeyError: unknown name; the message lists every name and alias.
        """
        key = normalize_name(name)
        if key not in self._keys:
            close = self.suggest(name)
            guess = f"did you mean {' or '.join(close)}? " if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}; {guess}choose one of: {self.describe()}")
        return self._keys[key]

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """Canonical names whose name or an alias is close to ``name`` (``difflib``, after normalisation),
        closest first: the "did you mean" of an unknown name."""
        import difflib

        hits = difflib.get_close_matches(normalize_name(name), list(self._keys), n=2 * n, cutoff=0.6)
        out: list[str] = []
        for h in hits:
            if self._keys[h] not in out:
                out.append(self._keys[h])
        return out[:n]

    def get(self, name: str) -> T:
        """The object registered under ``name`` or an alias. Raises KeyError like :meth:`canonical`."""
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        """Canonical names, in registration order (CLI choices, ``--help``)."""
        return list(self._items)

    def aliases(self, name: str) -> list[str]:
        return list(self._aliases[self.canonical(name)])

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def describe(self) -> str:
        """``"W4A16 (aliases: int4), W8A16"`` - every name with its aliases."""
        parts = []
        for n in self._items:
            al = self._aliases[n]
            parts.append(f"{n} (aliases: {', '.join(al)})" if al else n)
        return ", ".join(parts)

    def __contains__(self, name: str) -> bool:
        return normalize_name(name) in self._keys

    def __len__(self) -> int:
        return len(self._items)
