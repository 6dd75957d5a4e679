"""Module versions for a state dict that lost them.

`Module.state_dict()` records each module's `_version` in the dict's `_metadata`, and
`load_state_dict` hands it to the module's `_load_from_state_dict`. A plain dict built from
a state dict (a cached base, merged experts, a checkpoint saved as a dict of tensors) has no
`_metadata`: every module then loads as version None. torch's own modules accept that, but a
library module that checks its version refuses (torchvision's MNASNet: "version should be
set to 1 or 2 instead of None"). The state always comes from a model of the same code, so
each module gets the version of the module it loads into.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def with_versions(model: nn.Module, state: dict) -> OrderedDict:
    """`state` as an OrderedDict whose `_metadata` gives every module of `model` its own
    `_version`, where `state` does not already say (what it says wins)."""
    metadata = {name: {"version": module._version} for name, module in model.named_modules()}
    for name, local in (getattr(state, "_metadata", None) or {}).items():
        metadata[name] = {**metadata.get(name, {}), **local}
    out = OrderedDict(state)
    out._metadata = metadata
    return out
