"""No two dsconvert modules import each other, directly or through others: every ``import`` statement of every
module (top-level and deferred inside functions alike) is an edge, and the graph has no cycle group (strongly
connected component of more than one module). A registry and its members, a container and its codecs, two fixture
builders: each shared part lives in a module that imports neither side (docs/int-formats.md §8)."""

from __future__ import annotations

import ast
from pathlib import Path

import dsconvert

ROOT = Path(dsconvert.__file__).resolve().parent


def module_graph(pkg_dir: Path, pkg: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every ``.py`` under ``pkg_dir`` (package ``pkg``).

    ``from a.b import c`` is an edge to ``a.b`` and, when ``a.b.c`` is a module, to it; relative imports are
    resolved against the importing module's package. Imports of the package's ancestors that a submodule import
    runs implicitly (``a`` and ``a.b`` for ``import a.b.c``) are not edges: only the named modules are."""
    mods: dict[str, Path] = {}
    for p in sorted(pkg_dir.rglob("*.py")):
        parts = [pkg, *p.relative_to(pkg_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                b = ".".join(base + ([node.module] if node.module else []))
                targets = [b] + [f"{b}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != mod}
        graph[mod] = deps
    return graph


def cycle_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    groups.append(sorted(comp))
    return sorted(groups)


def test_the_walker_sees_deferred_relative_and_transitive_cycles(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")  # a -> sub.b (a submodule named in a from-import)
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")  # deferred, two levels up
    (pkg / "c.py").write_text("import p.a\n")  # closes a -> b -> c -> a
    (pkg / "d.py").write_text("from p import a\n")  # into the cycle, not part of it
    (pkg / "e.py").write_text("import os\nfrom p.d import x\n")
    graph = module_graph(pkg, "p")
    assert graph["p.e"] == {"p.d"} and graph["p.a"] == {"p.sub", "p.sub.b"}
    assert cycle_groups(graph) == [["p.a", "p.c", "p.sub.b"]]
    (pkg / "e.py").write_text("from .d import x\n")
    (pkg / "d.py").write_text("def f():\n    from . import e\n")
    assert cycle_groups(module_graph(pkg, "p")) == [["p.a", "p.c", "p.sub.b"], ["p.d", "p.e"]]


def test_dsconvert_has_no_import_cycle():
    graph = module_graph(ROOT, "dsconvert")
    assert "dsconvert.formats.compressed_tensors" in graph and len(graph) > 100
    assert cycle_groups(graph) == []
