"""Task suites by name: `get("multidigits", seed=0)`, or a `package.module:function` plugin.

A registry entry is a function `(**options) -> TaskSuite`; suites are built lazily so
that importing this package costs nothing.

Plugins: `get("my_package.module:make_suite", **options)` imports `my_package.module` from
the current working directory (and from $PRUNEFUSE_PLUGIN_PATH, which the search sets for
its Ray workers to the folder it was started in), calls `make_suite(**options)`, checks the
TaskSuite it returns and renames it to the "module:function" string, so a policy's
`suite.name` says which plugin rebuilds it. A plugin's `model_factory` is checked against
the MTLModel contract (`trunk`, `heads` ModuleDict with one head per task, dict forward)
the first time it builds a model.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys

from spaces.errors import PrunefuseError, unknown_name
from spaces.vocabulary import PLUGIN_PATH_ENV, TASK_KINDS, split_suite_spec

from .base import DataSplit, Rows, Split, Task, TaskSuite

__all__ = ["Task", "Split", "DataSplit", "Rows", "TaskSuite", "SUITES", "get"]

# name -> "module:function", imported on first use.
SUITES = {
    "multidigits": "mtl_models.suites.multidigits:make_multidigits",
    "synthetic": "mtl_models.suites.synthetic:make_synthetic",
    "tabular": "mtl_models.suites.tabular:make_tabular",
    "sequences": "mtl_models.suites.sequences:make_sequences",
    "scenes": "mtl_models.suites.scenes:make_scenes",
    "images": "mtl_models.suites.images:make_images",
}

_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def _load(target: str):
    if not _TARGET.match(target):
        raise PrunefuseError(f"suite {target!r}: a plugin is named package.module:function, e.g. "
                             f"my_package.suites:make_suite")
    module_name, _, func_name = target.partition(":")
    # Plugins live in the user's project: import them from the folder the search ran in.
    for folder in (os.environ.get(PLUGIN_PATH_ENV, ""), os.getcwd()):
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = ""
        if getattr(exc, "name", None) and module_name.startswith(str(exc.name)):
            hint = (f" (run prunefuse from the folder that holds {module_name.split('.')[0]!r}, "
                    f"or add that folder to PYTHONPATH)")
        raise PrunefuseError(f"cannot import suite plugin module {module_name!r}: {exc}{hint}") from None
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
    try:
        suite = factory(**options)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PrunefuseError):
            raise
        # A built-in suite handed a wrong type (seed=abc) fails deep in numpy; say which suite.
        raise PrunefuseError(f"suite {name!r} cannot be built with options {options}: "
                             f"{str(exc).splitlines()[0][:160]}") from None
    if not isinstance(suite, TaskSuite):
        raise PrunefuseError(f"suite {name!r} returned {type(suite).__name__}, expected a TaskSuite")
    if ":" in name:
        _check_suite(name, suite)
        suite.name = name  # so a policy names the plugin it needs to rebuild the suite
        if suite.model_factory is not None and not isinstance(suite.model_factory, CheckedModelFactory):
            suite.model_factory = CheckedModelFactory(suite.model_factory, name)
    return suite


def from_spec(spec: dict) -> TaskSuite:
    """The suite a spec (`TaskSuite.spec`, a policy's `suite`) names."""
    name, options = split_suite_spec(spec)
    return get(name, **options)


def _check_options(name, factory, options):
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for key in options:
        if key not in params:
            valid = [p for p in params if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
            raise PrunefuseError(f"suite {name!r} has no option {key!r}; valid options: {', '.join(valid)}")


def _check_suite(name: str, suite: TaskSuite) -> None:
    """What a plugin's TaskSuite must hold for the rest of prunefuse to work on it."""
    from mtl_models.training.tasks import METRICS

    where = f"suite {name!r}"
    if not suite.tasks:
        raise PrunefuseError(f"{where} has no tasks")
    seen = set()
    for t in suite.tasks:
        if not isinstance(t, Task):
            raise PrunefuseError(f"{where}: tasks must be mtl_models.suites.Task, got {type(t).__name__}")
        if not re.match(r"^[A-Za-z_]\w*$", t.name) or t.name in seen:
            raise PrunefuseError(f"{where}: task name {t.name!r} must be unique letters, digits and _")
        seen.add(t.name)
        if t.kind not in TASK_KINDS:
            raise PrunefuseError(f"{where}: task {t.name!r} has kind {t.kind!r}; expected one of: {', '.join(TASK_KINDS)}")
        if t.metric not in METRICS:
            raise PrunefuseError(f"{where}: task {t.name!r} has metric {t.metric!r}; expected one of: "
                                 f"{', '.join(sorted(METRICS))}")
    if not isinstance(suite.options, dict):
        raise PrunefuseError(f"{where}: options must be a dict (they rebuild the suite), got {type(suite.options).__name__}")
    for split_name in ("train", "val", "test"):
        _check_split(where, suite, split_name)


def _check_split(where: str, suite: TaskSuite, split_name: str) -> None:
    """A split is a DataSplit (a Split of tensors, or a dataset read in batches) with a
    label for every row and task, and inputs of the suite's `input_shape`."""
    import torch

    from .reading import first_rows

    split = suite.split(split_name)
    if not isinstance(split, DataSplit) or (isinstance(split, Split) and not isinstance(split.x, torch.Tensor)):
        raise PrunefuseError(f"{where}: {split_name} must be a Split(x=Tensor, y={{task: Tensor}}) or an "
                             f"mtl_models.suites.DataSplit")
    if len(split) == 0:
        raise PrunefuseError(f"{where}: the {split_name} split is empty")
    x, _ = first_rows(split, 2)
    if tuple(x.shape[1:]) != tuple(suite.input_shape):
        raise PrunefuseError(f"{where}: {split_name}.x has rows of shape {tuple(x.shape[1:])}, "
                             f"but input_shape is {tuple(suite.input_shape)}")
    for t in suite.tasks:
        y = split.y.get(t.name)
        if y is None:
            raise PrunefuseError(f"{where}: the {split_name} split has no labels for task {t.name!r}")
        if len(y) != len(split):
            raise PrunefuseError(f"{where}: {split_name} labels of task {t.name!r} have {len(y)} rows, "
                                 f"x has {len(split)}")


class CheckedModelFactory:
    """Wraps a plugin's model_factory: the model it builds must follow the MTLModel contract.

    A class (not a closure) so a suite holding it pickles into Ray tasks by reference.
    """

    def __init__(self, factory, suite_name: str):
        self.factory, self.suite_name = factory, suite_name
        self._forward_checked = False

    def __call__(self, suite, **spec):
        model = self.factory(suite, **spec)
        check_model(model, suite, where=f"the model of suite {self.suite_name!r}", forward=not self._forward_checked)
        self._forward_checked = True
        return model


def check_model(model, suite: TaskSuite, *, where: str = "the model", forward: bool = True) -> None:
    """`model.trunk` (nn.Module), `model.heads` (nn.ModuleDict, one per task), `forward(x) -> dict`."""
    import torch
    from torch import nn

    contract = "(a model needs `trunk`, the shared nn.Module, and `heads`, an nn.ModuleDict of one head per task)"
    if not isinstance(model, nn.Module):
        raise PrunefuseError(f"{where} is a {type(model).__name__}, not a torch nn.Module")
    if not isinstance(getattr(model, "trunk", None), nn.Module):
        raise PrunefuseError(f"{where} has no `trunk` module {contract}")
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleDict):
        raise PrunefuseError(f"{where} has no `heads` nn.ModuleDict {contract}")
    if sorted(heads.keys()) != sorted(suite.task_names):
        raise PrunefuseError(f"{where} has heads {sorted(heads.keys())}; the suite's tasks are {sorted(suite.task_names)}")
    if not forward:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(suite.example_inputs(2))
    finally:
        model.train(was_training)
    if not isinstance(out, dict) or sorted(out) != sorted(suite.task_names):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise PrunefuseError(f"{where}: forward(x) must return a dict {{task: output}} for tasks "
                             f"{sorted(suite.task_names)}; got {got}")
    for t in suite.tasks:
        shape = tuple(out[t.name].shape)
        want = expected_output_shape(t, suite.val.y[t.name][:2])
        if shape != want and not (t.kind == "regression" and shape == (2,)):
            raise PrunefuseError(f"{where}: head {t.name!r} outputs shape {shape} for a batch of 2; expected {want}")


def expected_output_shape(task: Task, labels) -> tuple[int, ...]:
    """The shape a head's output must have for these labels (see `Task` for each kind)."""
    n, rest = labels.shape[0], tuple(labels.shape[1:])
    if task.kind == "segmentation":
        return (n, task.num_outputs, *rest)
    if task.kind == "depth":
        return (n, 1, *rest)
    if task.kind == "normals":
        return tuple(labels.shape)
    return (n, task.num_outputs)
