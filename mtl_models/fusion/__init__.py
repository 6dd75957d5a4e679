"""Merge task experts fine-tuned from one base model into a single multi-task model.

Every method works on task vectors tau_t = theta_t - theta_0 (Ilharco et al. 2023,
"Editing Models with Task Arithmetic"). The per-task coefficient lambda_t scales
tau_t *before* a method combines them; lambda_t may be one float or, AdaMerging
style (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning"), a dict giving one float per layer group (see `layer_group`).

Methods (registered in `METHODS`, a `spaces.registry.Registry`; their searchable knobs in `KNOBS`):
  average          theta_0 + mean_t(lambda_t tau_t); at lambda_t = 1 this is exactly
                   the plain mean of the experts (weight averaging / model soup).
  task_arithmetic  theta_0 + sum_t lambda_t tau_t.
  ties             TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving
                   Interference When Merging Models"): trim each vector to its
                   top-`density` entries by magnitude (per tensor), elect a sign per
                   entry from the sum, average only the entries agreeing with it
                   (disjoint mean), and add `scale` times the result.
  dare_linear      DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing
  dare_ties        Abilities from Homologous Models as a Free Lunch"): drop each delta
                   entry with probability `drop_rate`, rescale survivors by
                   1/(1 - drop_rate), then combine by task arithmetic or by TIES.
                   Masks come from a generator seeded per (seed, task, key), so one
                   seed reproduces a merge and tasks/keys never share a mask.

Statistics are not task vectors: non-learned buffers (BatchNorm's running_mean,
running_var, num_batches_tracked, any registered buffer; `buffers=`) and every non-float
tensor are copied from the base. Averaged or DARE-rescaled, a running variance goes
negative and the merged model outputs NaN.
A nan or inf in the base or an expert raises `PrunefuseError` naming the key and
model rather than silently poisoning the merge.
"""
from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from spaces.errors import PrunefuseError, unknown_name
from spaces.knobs import Knob
from spaces.registry import Registry

# name -> method (deltas, key, *, knobs) -> merged delta; knob defaults are the signatures'.
METHODS = Registry("fusion method")
register = METHODS.register

_TIES_KNOBS = {"density": Knob(0.05, 1.0), "scale": Knob(0.3, 1.5)}
_DARE_KNOBS = {"drop_rate": Knob(0.0, 0.95)}


def layer_group(key: str) -> str:
    """`trunk.0.weight` -> `trunk.0`; a key without a dot is its own group."""
    return key.rpartition(".")[0] or key


def layer_groups(state: Mapping[str, Tensor]) -> list[str]:
    """The groups a layer-wise coefficient dict must cover (float tensors only)."""
    return list(dict.fromkeys(layer_group(k) for k, v in state.items() if v.is_floating_point()))


# --- building blocks ---------------------------------------------------------

def _trim(delta: Tensor, density: float) -> Tensor:
    """Keep the top-`density` fraction of entries by magnitude, at least one per tensor."""
    if not 0.0 < density <= 1.0:
        raise PrunefuseError(f"density={density} is out of range; expected 0 < density <= 1")
    flat = delta.flatten()
    k = max(1, round(density * flat.numel()))  # round, not ceil: 0.3 * 10 is 3.0000000000000004
    if k >= flat.numel():
        return delta
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True  # topk, not a threshold: exactly k survive ties
    return (flat * keep).view_as(delta)


def _ties_combine(deltas: list[Tensor], density: float, scale: float) -> Tensor:
    trimmed = torch.stack([_trim(d, density) for d in deltas])
    elected = trimmed.sum(dim=0).sign()
    agree = trimmed.sign() == elected  # trimmed zeros have sign 0 and so never agree with +-1
    count = agree.sum(dim=0).clamp(min=1)  # entries nobody keeps stay 0, not 0/0
    return scale * (trimmed * agree).sum(dim=0) / count


def _stream_seed(seed: int, task: str, key: str) -> int:
    """A stable 63-bit seed per (seed, task, key); Python's hash() is salted per process."""
    digest = hashlib.blake2b(f"{seed}\0{task}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _int_seed(seed) -> int:
    """An int seed; a whole float (3.0), as hand-written YAML or JSON may give, counts."""
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrunefuseError(f"seed must be an int, got {seed!r}")
    return seed


def _dare(deltas: Mapping[str, Tensor], key: str, drop_rate: float, seed: int) -> list[Tensor]:
    if not 0.0 <= drop_rate < 1.0:
        raise PrunefuseError(f"drop_rate={drop_rate} is out of range; expected 0 <= drop_rate < 1")
    seed = _int_seed(seed)
    out = []
    for task, d in deltas.items():
        gen = torch.Generator().manual_seed(_stream_seed(seed, task, key))
        keep = torch.rand(d.shape, generator=gen) >= drop_rate  # P(keep) = 1 - drop_rate
        out.append(d * keep.to(d.device) / (1.0 - drop_rate))  # rescale keeps E[delta]
    return out


# --- methods: (deltas by task, key, *, params) -> merged delta ------------------

@register("average")
def average(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    return torch.stack(list(deltas.values())).mean(dim=0)


@register("task_arithmetic")
def task_arithmetic(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    return torch.stack(list(deltas.values())).sum(dim=0)


@register("ties", knobs=_TIES_KNOBS)
def ties(deltas: Mapping[str, Tensor], key: str, *, density: float = 0.2, scale: float = 1.0) -> Tensor:
    return _ties_combine(list(deltas.values()), density, scale)


@register("dare_linear", knobs=_DARE_KNOBS, needs=("seed",))
def dare_linear(deltas: Mapping[str, Tensor], key: str, *, drop_rate: float = 0.5, seed: int = 0) -> Tensor:
    return torch.stack(_dare(deltas, key, drop_rate, seed)).sum(dim=0)


@register("dare_ties", knobs={**_DARE_KNOBS, **_TIES_KNOBS}, needs=("seed",))
def dare_ties(deltas: Mapping[str, Tensor], key: str, *, drop_rate: float = 0.5, density: float = 0.2,
              scale: float = 1.0, seed: int = 0) -> Tensor:
    return _ties_combine(_dare(deltas, key, drop_rate, seed), density, scale)


KNOBS = METHODS.knobs  # method -> {knob: Knob}, defaults from the signatures


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
