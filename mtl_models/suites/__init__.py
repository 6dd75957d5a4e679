"""Task suites by name: `get("multidigits", seed=0)`, or a `package.module:function` plugin.

A registry entry is a function `(**options) -> TaskSuite`; suites are built lazily so
that importing this package costs nothing.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from spaces.errors import PrunefuseError, unknown_name

from .base import Split, Task, TaskSuite

__all__ = ["Task", "Split", "TaskSuite", "SUITES", "get"]

# name -> "module:function", imported on first use.
SUITES = {
    "multidigits": "mtl_models.suites.multidigits:make_multidigits",
    "synthetic": "mtl_models.suites.synthetic:make_synthetic",
    "tabular": "mtl_models.suites.tabular:make_tabular",
}


def _load(target: str):
    module_name, _, func_name = target.partition(":")
    # Plugins live in the user's project: import them from the folder the search ran in.
    for folder in (os.environ.get("PRUNEFUSE_PLUGIN_PATH", ""), os.getcwd()):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PrunefuseError(f"cannot import suite plugin module {module_name!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PrunefuseError(f"suite plugin {target!r}: module {module_name!r} has no function {func_name!r}")
    return func


def get(name: str, **options) -> TaskSuite:
    """Build a suite by registry name or `module:function`, with its options checked."""
    if ":" in name:
        factory = _load(name)
    elif name in SUITES:
        factory = _load(SUITES[name])
    else:
        raise unknown_name("suite", name, list(SUITES) + ["<package.module:function>"])
    _check_options(name, factory, options)
    suite = factory(**options)
    if not isinstance(suite, TaskSuite):
        raise PrunefuseError(f"suite {name!r} returned {type(suite).__name__}, expected a TaskSuite")
    if ":" in name:
        suite.name = name  # so a policy names the plugin it needs to rebuild the suite
    return suite


def _check_options(name, factory, options):
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in options:
        if key not in params:
            valid = [p for p in params if params[p].kind is not p.VAR_POSITIONAL]
            raise PrunefuseError(f"suite {name!r} has no option {key!r}; valid options: {', '.join(valid)}")
