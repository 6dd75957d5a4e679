"""`merge`: check the experts against the base, then merge them key by key with a method.

Statistics are not task vectors: non-learned buffers (BatchNorm's running_mean,
running_var, num_batches_tracked, any registered buffer; `buffers=`) and every non-float
tensor are copied from the base. Averaged or DARE-rescaled, a running variance goes
negative and the merged model outputs NaN.
A nan or inf in the base or an expert raises `PrunefuseError` naming the key and
model rather than silently poisoning the merge.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from spaces.errors import PrunefuseError, unknown_name

from .registry import METHODS


def layer_group(key: str) -> str:
    """`trunk.0.weight` -> `trunk.0`; a key without a dot is its own group."""
    return key.rpartition(".")[0] or key


def layer_groups(state: Mapping[str, Tensor]) -> list[str]:
    """The groups a layer-wise coefficient dict must cover (float tensors only)."""
    return list(dict.fromkeys(layer_group(k) for k, v in state.items() if v.is_floating_point()))


# --- entry point ---------------------------------------------------------------

def check_params(method: str, params: Mapping) -> None:
    """Each of `params` is a knob `method` takes (its keyword-only arguments)."""
    METHODS.check_params(method, params)


def _check_state(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> None:
    if not experts:
        raise PrunefuseError("no experts to merge; pass at least one task's state dict")
    for who, state in [("base", base), *((f"task {t!r}", sd) for t, sd in experts.items())]:
        for key in sorted(state.keys() - base.keys()):
            raise PrunefuseError(f"key {key!r} of {who} is not in the base state dict")
        for key, ref in base.items():
            if key not in state:
                raise PrunefuseError(f"key {key!r} is missing from {who}")
            t = state[key]
            if t.shape != ref.shape:
                raise PrunefuseError(f"key {key!r} of {who} has shape {tuple(t.shape)}, "
                                     f"base has {tuple(ref.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise PrunefuseError(f"key {key!r} of {who} contains nan or inf")


def _check_coefficients(base: Mapping[str, Tensor], experts: Mapping, coefficients: Mapping) -> None:
    if missing := [t for t in experts if t not in coefficients]:
        raise PrunefuseError(f"no coefficient for task(s) {', '.join(map(repr, missing))}")
    if extra := [t for t in coefficients if t not in experts]:
        raise PrunefuseError(f"coefficient for unknown task(s) {', '.join(map(repr, extra))}; "
                             f"experts are: {', '.join(map(repr, experts))}")
    groups = layer_groups(base)
    for task, coef in coefficients.items():
        if not isinstance(coef, Mapping):
            continue
        if missing := [g for g in groups if g not in coef]:
            raise PrunefuseError(f"layer-wise coefficients of task {task!r} lack group(s) "
                                 f"{', '.join(map(repr, missing))}")
        if extra := [g for g in coef if g not in groups]:
            raise PrunefuseError(f"layer-wise coefficients of task {task!r} name unknown group(s) "
                                 f"{', '.join(map(repr, extra))}; groups are: {', '.join(groups)}")


# Buffers every BatchNorm registers: what `merge` keeps from the base when not told which
# keys are buffers (a state dict alone does not say).
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def buffer_keys(model, prefix: str = "") -> set[str]:
    """State-dict keys of `model`'s buffers (non-learned state), under `prefix`."""
    state = model.state_dict()
    return {k for k, _ in model.named_buffers() if k in state and k.startswith(prefix)}


def merge(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]], method: str,
          coefficients: Mapping[str, float | Mapping[str, float]], *, buffers: Collection[str] | None = None,
          **method_params) -> dict[str, Tensor]:
    """Merge `experts` (task -> state dict, fine-tuned from `base`) with `method`.

    buffers: the keys holding non-learned state (`buffer_keys(model)`), copied from the base
      and never merged; None: the keys of BatchNorm statistics (`BATCHNORM_STATISTICS`).
    Returns a new state dict with every key, shape and dtype of `base`.
    """
    if method not in METHODS:
        raise unknown_name("fusion method", method, METHODS)
    fn = METHODS[method]
    check_params(method, method_params)
    _check_state(base, experts)
    _check_coefficients(base, experts, coefficients)
    if buffers is None:
        buffers = {k for k in base if k.rpartition(".")[2] in BATCHNORM_STATISTICS}
    kept = set(buffers)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, ref in base.items():
            if key in kept or not ref.is_floating_point():
                out[key] = ref.clone()
                continue
            dtype = torch.promote_types(ref.dtype, torch.float32)  # fp16/bf16 merge in fp32
            theta0 = ref.to(dtype)
            deltas = {}
            for task, state in experts.items():
                coef = coefficients[task]
                lam = float(coef[layer_group(key)] if isinstance(coef, Mapping) else coef)
                deltas[task] = lam * (state[key].to(device=ref.device, dtype=dtype) - theta0)
            out[key] = (theta0 + fn(deltas, key, **method_params)).to(ref.dtype)
    return out
