"""The repository is self-contained: code, tests and benches cite its own ``docs/``, and every cited document,
section and known-failure item exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("dsconvert", "tests", "bench") for p in (ROOT / d).rglob("*.py")] + [ROOT / "README.md"]
CITE = re.compile(r"docs/([A-Za-z0-9_-]+\.md)(?: §(\d+))?(?: items? (\d+))?")


def _sections(doc: Path) -> set[str]:
    return set(re.findall(r"^## (\d+)\.", doc.read_text(), flags=re.M))


def _items(doc: Path) -> set[str]:
    return set(re.findall(r"^(\d+)\. \*\*", doc.read_text(), flags=re.M))


def test_nothing_cites_files_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p != Path(__file__).resolve()
           for i, line in enumerate(p.read_text().splitlines(), 1) if "shared/reference" in line]
    assert not bad, f"cite docs/ instead of files outside the repository: {bad}"


def test_every_cited_document_section_and_item_exists():
    missing = []
    for p in SOURCES:
        for m in CITE.finditer(p.read_text()):
            doc = ROOT / "docs" / m.group(1)
            where = f"{p.relative_to(ROOT)} cites {m.group(0)}"
            if not doc.is_file():
                missing.append(where)
            elif m.group(2) and m.group(2) not in _sections(doc):
                missing.append(where + " (no such section)")
            elif m.group(3) and not m.group(2) and m.group(3) not in _items(doc):
                missing.append(where + " (no such item)")
    assert not missing, missing


def test_the_checks_see_citations():
    """Guard against a regex that matches nothing: the package does cite docs/ sections and items."""
    text = "\n".join(p.read_text() for p in SOURCES)
    found = CITE.findall(text)
    assert any(s for _, s, _ in found) and any(i for _, _, i in found)
