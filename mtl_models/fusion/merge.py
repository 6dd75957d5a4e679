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

from . import cache
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


def _finite(t: Tensor) -> bool:
    """No nan or inf in `t`: its float64 sum is finite (float32 entries cannot overflow a float64
    sum), one pass without the bool tensor `isfinite` makes (46 s of a BERT-base TIES merge)."""
    if t.dtype == torch.float64:  # its sum could overflow where no entry does
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


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
            if t.is_floating_point() and not _finite(t):
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
            deltas = TaskDeltas(key=key, base=ref, experts={t: state[key] for t, state in experts.items()})
            for task, state in experts.items():
                coef = coefficients[task]
                lam = float(coef[layer_group(key)] if isinstance(coef, Mapping) else coef)
                deltas.lambdas[task] = lam
                deltas[task] = torch.sub(state[key].to(device=ref.device, dtype=dtype), theta0).mul_(lam)
            merged = fn(deltas, key, **method_params)
            del deltas  # the task vectors of this key go before the next key's are made
            out[key] = merged.add_(theta0).to(ref.dtype)
    return out


class TaskDeltas(dict):
    """task -> lambda_t * tau_t for one key: what a method merges. The tensors are `merge`'s own
    temporaries, freed after the method returns: a method may overwrite them (TIES trims in
    place). `singular(task, rank)` gives a vector's top singular triplets, from `cache` when
    these experts were merged before."""

    def __init__(self, *, key: str, base: Tensor, experts: Mapping[str, Tensor]):
        super().__init__()
        self.key, self.base, self.experts = key, base, experts
        self.lambdas: dict[str, float] = {}

    def singular(self, task: str, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        lam = self.lambdas[task]
        u, s, vh = cache.top_singular(self.key, self.base, self.experts[task], rank, self[task].dtype)
        return u, abs(lam) * s, (vh if lam >= 0 else -vh)
