"""Size parsing and formatting.

Convention (docs/cli-conventions.md): ``5G`` and ``5GB`` mean 10**9 bytes,
``5GiB`` means 2**30 bytes. Reports print both.
"""

from __future__ import annotations

import re

from .errors import UsageError

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """Parse ``"5G"``, ``"5GB"``, ``"4.5GiB"``, ``"300M"`` or a plain byte count into bytes (int).

    Raises:
        UsageError: the text is not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?)B?\s*", text.upper())
    if not m:
        raise UsageError(f"not a size: {text!r}", hint="use e.g. 5G (10^9 bytes), 4GiB (2^30 bytes) or 500M")
    number, unit = float(m.group(1)), m.group(2)
    factor = _BINARY.get(unit) or _DECIMAL.get(unit)
    if factor is None:
        raise UsageError(f"unknown size unit in {text!r}", hint="units: K M G T (10^3..) or KiB MiB GiB TiB")
    return int(number * factor)


def fmt_bytes(n: int | float) -> str:
    """``1368979721216`` -> ``"1.37 TB (1.25 TiB)"``: decimal first, binary in parentheses."""
    n = float(n)
    for unit, dec, binu, b in (("TB", 1e12, "TiB", 2**40), ("GB", 1e9, "GiB", 2**30), ("MB", 1e6, "MiB", 2**20)):
        if n >= dec:
            return f"{n / dec:.2f} {unit} ({n / b:.2f} {binu})"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} B"


def count(n: int, noun: str) -> str:
    """``count(1, "file")`` -> ``"1 file"``, ``count(3, "file")`` -> ``"3 files"`` (messages never say ``file(s)``)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def bytes_fields(n: int) -> dict:
    """``{"bytes": n, "gb": n/1e9, "gib": n/2**30}`` for JSON reports (both units, as the docs promise)."""
    return {"bytes": int(n), "gb": round(n / 1e9, 6), "gib": round(n / 2**30, 6)}
