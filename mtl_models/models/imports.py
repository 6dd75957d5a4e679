"""The one place that imports timm, torchvision and transformers (optional: the `zoo` extra).

torchvision's wheels here are CUDA builds whose C++ ops cannot load against the CPU torch;
its import then fails in `_meta_registrations.py`, which registers fake kernels for
`torchvision::nms` and `torchvision::qnms` and needs their schemas. `_torchvision_schemas`
declares the two schemas first, only where the ops library does not load (on a machine with a
matching torchvision it is a no-op). The ops stay absent: no trunk calls them. timm imports
torchvision, so every import of either goes through here.
"""
from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import os

from spaces.errors import PrunefuseError

EXTRA = "zoo"  # pyproject.toml's extra that installs them (scripts/setup.sh installs it)
_DECLARED: list = []  # the torch.library.Library holding the schemas: dropping it would drop them
_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


@functools.cache
def _torchvision_schemas() -> None:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")) + \
            glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.pyd")):
        try:
            torch.ops.load_library(path)
            return  # the real ops loaded: torchvision imports as it is
        except (OSError, RuntimeError):
            pass
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # declared already (by another copy of this module, or a test)
    except RuntimeError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _DECLARED.append(library)


def _load(name: str, for_what: str):
    if importlib.util.find_spec(name) is None:
        raise PrunefuseError(f"{for_what} needs the {name} package, which is not installed: "
                             f"pip install -e '.[{EXTRA}]' (scripts/setup.sh installs it)")
    if name in ("torchvision", "timm", "transformers"):  # transformers imports torchvision where it is installed
        _torchvision_schemas()
    return importlib.import_module(name)


def torchvision(for_what: str = "this trunk"):
    """The torchvision module (its `models` loaded), importable beside the CPU torch."""
    module = _load("torchvision", for_what)
    importlib.import_module("torchvision.models")
    return module


def timm(for_what: str = "this trunk"):
    return _load("timm", for_what)


def transformers(for_what: str = "this trunk"):
    return _load("transformers", for_what)
