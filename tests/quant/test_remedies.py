"""Kernels state facts; the convert layer words the fix with command-line flags (docs/cli-conventions.md).

Checks: no error raised in ``dsconvert/quant/`` names a command-line flag or carries a hand-written hint that
does; every ``remedy`` key the kernels raise has a hint; and the CLI prints the hint of a kernel's remedy.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from dsconvert.convert.remedies import HINTS, add_hint
from dsconvert.errors import ShapeError
from dsconvert.quant.rtn import QuantSpec, quantize

from ..conftest import run_cli

QUANT = Path(__file__).resolve().parents[2] / "dsconvert" / "quant"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def _raises():
    """(file:line, exception call node) of every ``raise X(...)`` in dsconvert/quant/."""
    for p in sorted(QUANT.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                yield f"{p.relative_to(QUANT.parent)}:{node.lineno}", node.exc


def _strings(node):
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_kernel_errors_name_no_command_line_flag():
    found = list(_raises())
    assert len(found) > 20  # the walk sees the kernels' raises
    bad = [(where, s) for where, call in found for s in _strings(call) if FLAG.search(s)]
    assert not bad, f"quant/ must state facts; word flags in convert/remedies.py: {bad}"


def test_every_remedy_the_kernels_raise_has_a_hint():
    keys = set()
    for _, call in _raises():
        for kw in call.keywords:
            if kw.arg == "remedy" and isinstance(kw.value, ast.Constant):
                keys.add(kw.value.value)
            elif kw.arg is None and isinstance(kw.value, ast.Dict):  # **{"remedy": ...}
                keys |= {v.value for k, v in zip(kw.value.keys, kw.value.values)
                         if isinstance(k, ast.Constant) and k.value == "remedy" and isinstance(v, ast.Constant)}
    assert len(keys) >= 10
    assert not keys - HINTS.keys(), f"remedies without a hint: {sorted(keys - HINTS.keys())}"


def test_hint_is_worded_from_the_facts():
    with pytest.raises(ShapeError) as ei:
        quantize(torch.randn(4, 96), QuantSpec(bits=4, group_size=128), name="w")
    e = add_hint(ei.value)
    assert e.remedy == "smaller-group" and e.facts == {"group_size": 32}
    assert "--group-size 32" in e.hint and "--group-size" not in e.message


def test_cli_prints_the_kernel_remedy(tiny_src, tmp_path):
    r = run_cli("quantize", tiny_src, "-o", tmp_path / "o", "--scheme", "W4A16", "--scale-fmt", "ue8m0")
    assert r.rc == 2, r
    text = " ".join(r.stderr.split())
    assert "no scale_fmt option" in text and "hint: drop --scale-fmt" in text, r
