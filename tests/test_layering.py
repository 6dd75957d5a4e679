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
