"""Saving and loading a compressed model without pickle.

A structurally pruned model no longer fits a fresh model's shapes, and torch-pruning's own
loader needs pickle. Instead the folder holds a plain state dict (`model.pt`, loadable with
`torch.load(..., weights_only=True)`) and the policy: `load` rebuilds the fresh model from the
policy, resizes each layer to the saved shapes, and loads the weights strictly.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from spaces.errors import PrunefuseError
from spaces.policy import Policy

# The attribute that holds each dimension, per layer type: (out dim attr, in dim attr).
_DIMS = {nn.Linear: ("out_features", "in_features"), nn.Conv2d: ("out_channels", "in_channels")}


def save(model, policy: Policy, metrics: dict, out_dir) -> Path:
    """Write model.pt + policy.yaml + metrics.json into `out_dir`, replacing it only when complete."""
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or not _replaceable(out)):
        raise PrunefuseError(f"{str(out_dir)!r} exists and is not a saved prunefuse model; "
                             f"choose a new or empty folder for -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, staging / "model.pt")
        policy.to_yaml(staging / "policy.yaml")
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replaceable(folder: Path) -> bool:
    """Only an empty folder or an earlier `save` may be replaced: never a user's other files."""
    names = {p.name for p in folder.iterdir()}
    return not names or names <= {"model.pt", "policy.yaml", "metrics.json"} and "model.pt" in names


def resize_to(model, state: dict) -> None:
    """Give every layer the shapes found in `state` (a pruned model's state dict)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if weight is None:
            continue
        for attr in ("weight", "bias", "running_mean", "running_var"):
            key = prefix + attr
            current = getattr(module, attr, None)
            if key in state and current is not None and current.shape != state[key].shape:
                fresh = torch.empty_like(state[key], dtype=current.dtype)
                if isinstance(current, nn.Parameter):
                    setattr(module, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
                else:
                    module.register_buffer(attr, fresh)
        for cls, (out_attr, in_attr) in _DIMS.items():
            if isinstance(module, cls):
                setattr(module, out_attr, weight.shape[0])
                groups = getattr(module, "groups", 1)
                setattr(module, in_attr, weight.shape[1] * groups)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(weight.shape)


def load(out_dir):
    """(model, policy) from a folder written by `save` / `prunefuse apply`."""
    from . import suites

    folder = Path(out_dir)
    if not (folder / "model.pt").is_file() or not (folder / "policy.yaml").is_file():
        raise PrunefuseError(f"{str(folder)!r} is not a saved prunefuse model (needs model.pt and policy.yaml)")
    policy = Policy.from_yaml(folder / "policy.yaml")
    suite = suites.from_spec(policy.suite)
    model = suite.build_model(**policy.model)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    resize_to(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval(), policy
