"""The dependency arrows README states (section "Where things happen"), checked on the code.

Every import counts, also one inside a function (a lazy import is still an arrow).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> what it must never import (README: "Dependencies point one way").
FORBIDDEN = {
    "spaces": {"torch", "ray", "mtl_models", "search", "reports"},
    "mtl_models": {"ray", "search", "reports"},
    "reports": {"torch", "ray", "mtl_models", "search"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """module path -> the top-level packages it imports (absolute imports only)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    bad = {module: sorted(names & FORBIDDEN[package]) for module, names in imported_packages(package).items()
           if names & FORBIDDEN[package]}
    assert not bad, f"{package} must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_the_readme_states_the_arrows_this_test_checks():
    readme = (ROOT / "README.md").read_text()
    assert "`spaces` ← `mtl_models` ← `search`; `spaces` ← `reports` ← `search`" in readme


def test_a_forbidden_import_is_caught(tmp_path, monkeypatch):
    # The checker itself: a lazy `import ray` inside a function is an arrow too.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    import ray.tune\n    from torch import nn\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert imported_packages("pkg") == {"pkg/m.py": {"ray", "torch"}}


# --- no import circles: A importing B while B imports A (directly or around a loop), lazily or not ---

CHECKED = ("spaces", "mtl_models", "search", "reports")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=CHECKED) -> dict[str, set[str]]:
    """module -> the library modules it imports (every import, also one inside a function).

    `from a.b import c` points at the module a.b.c where there is one, else at a.b. Importing
    a.b.c from outside the package a.b also runs a/b/__init__.py: that is an arrow too (how
    `training.tasks` → `suites.base` closes a circle through `suites/__init__`)."""
    files = {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                # a parent package imported from inside it is already running: no arrow
                if module in files and (i == len(parts) or not (name + ".").startswith(module + ".")):
                    edges.add(module)
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_library_has_no_import_circle():
    found = circles(import_graph())
    assert not found, f"import circles (each group imports itself around a loop): {found}"


def test_a_lazy_circle_is_caught(tmp_path, monkeypatch):
    # The checker itself: a circle closed by an import inside a function, and one closed through
    # a package's __init__, are both found; a package importing its own submodules is not one.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from pkg.b import g\ndef f():\n    pass\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("def h():\n    from pkg.c import k\n")
    (pkg / "sub" / "base.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("from pkg.sub.base import X\ndef k():\n    pass\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert circles(import_graph(("pkg",))) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub"]]


# --- shared literals have one home: spaces/vocabulary.py ---

SHARED_LITERALS = ('"metric/', "'metric/", '"test/', "'test/", "prunefuse.policy/1")


def test_shared_literals_are_spelled_only_in_the_vocabulary():
    home = ROOT / "spaces" / "vocabulary.py"
    spelled = [f"{p.relative_to(ROOT)}:{n}" for pkg in (*CHECKED, "benchmarks")
               for p in sorted((ROOT / pkg).rglob("*.py")) if p != home
               for n, line in enumerate(p.read_text().splitlines(), 1) if any(s in line for s in SHARED_LITERALS)]
    assert not spelled, f"spell these with spaces.vocabulary's names: {spelled}"
