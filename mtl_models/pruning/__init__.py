"""Pruning a multi-task model's trunk: structured (really smaller) or unstructured (masks).

structured: whole neurons / channels are removed through torch-pruning's dependency graph
  (`tp.DependencyGraph`, `get_pruning_group`, `Group.prune`), so the coupled BatchNorm, the
  next layer's inputs and the heads' in-features shrink with them and the model runs on
  smaller dense kernels. Head output layers are never pruned.
unstructured: masks through `torch.nn.utils.prune`; the zeros count as non-zero-parameter
  and sparse-storage savings, and honestly give no latency gain (latency is always measured
  by `mtl_models.measuring.measure`, never derived from sparsity).

Which units go is decided here, not inside torch-pruning: every step scores all listed
layers with one criterion, turns the schedule into a number of units to keep per layer
(layerwise: each layer's own sparsity; global: one ranking over all layers, each layer
capped at MAX_SPARSITY) and prunes the lowest-scoring units. Every layer keeps at least
one unit, and at least (1 − MAX_SPARSITY) of its units.

Criteria (`IMPORTANCES`):
  l1, l2            group magnitude (torch-pruning's GroupMagnitudeImportance: the unit's
                    weights, its BatchNorm scale and the next layer's input weights).
  taylor            second-order (Gauss-Newton) Taylor estimate of how much the sum of the
                    task losses rises when the unit is removed (see `MultiTaskTaylor`).
  multitask_taylor  the same estimate per task, each task normalised, then aggregated over
                    tasks by `AGGREGATES` (DiSparse-style: "max" keeps what any task needs).
  Unstructured masks use |w| (l1, l2) or per-task |w·∂L_t/∂w| (taylor, multitask_taylor).
With calibration losses given, BatchNorm statistics are re-estimated on the calibration
batch after every structured round (the layers reading pruned channels see new inputs).

Schedules: `steps=1` is one-shot; `steps=n` follows Zhu & Gupta (2017)'s cubic ramp
s_t = s_f + (s_i − s_f)(1 − t/n)^3 with s_i = 0, re-scores the model before every step and
calls `after_step(step, model)` after each (the caller fine-tunes and reports: train-prune
cycles). Unstructured masks are live during `after_step` (a fine-tune there keeps the zeros)
and folded into the weights when `prune` returns.

Modules, one job each: `layers` (what is prunable), `importance` (criteria, aggregates),
`allocation` (kept units, schedules, global allocation), `structured` and `unstructured`
(the two engines). This module is the public face: the entry point `prune` and its checks.
"""
from __future__ import annotations

import torch
from torch import nn

from spaces.errors import PrunefuseError
from spaces.policy import Pruning

from .allocation import MAX_SPARSITY, cubic_schedule, kept_units, min_kept, round_units
from .groups import coupled_groups, decided_sparsity, left_unpruned
from .probe import found  # what coupled_groups left out, and why (its probe is cached per layout)
from .importance import AGGREGATES, IMPORTANCES, NEEDS_GRADS, MultiTaskTaylor, task_gradients
from .layers import PRUNABLE_TYPES, prunable_layers
from .structured import prune_structured, recalibrate_batchnorm
from .unstructured import prune_unstructured, without_masks

MODES = ("structured", "unstructured")

__all__ = ["AGGREGATES", "IMPORTANCES", "MAX_SPARSITY", "MODES", "NEEDS_GRADS", "PRUNABLE_TYPES", "MultiTaskTaylor",
           "check_sparsity", "coupled_groups", "cubic_schedule", "kept_units", "left_unpruned", "min_kept", "prunable_layers", "prune",
           "recalibrate_batchnorm", "round_units", "task_gradients", "without_masks"]


def check_sparsity(model, sparsity: dict[str, float], example_inputs: torch.Tensor, *,
                   groups: dict | None = None) -> dict[str, float]:
    """The policy's per-group sparsity ({group name: value}, see `groups.decided_sparsity`),
    every value checked; a key or value that does not fit the model raises PrunefuseError."""
    for name, value in sorted(sparsity.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_SPARSITY:
            raise PrunefuseError(f"sparsity of {name} is {value}; expected 0 <= sparsity <= {MAX_SPARSITY}")
    if groups is None:
        groups = coupled_groups(model, example_inputs)
    return decided_sparsity(groups, sparsity, prunable_layers(model), found(model, example_inputs))


def prune(model, spec: Pruning, *, example_inputs: torch.Tensor, task_losses=None, after_step=None) -> nn.Module:
    """Prune `model`'s trunk as the policy's `Pruning` section says (its ranges and its mode's
    rules were checked where it was made; what is checked here needs the model or the code).

    spec.sparsity: {coupled group name: fraction of units / weights removed} (`coupled_groups`;
      a member's name is accepted when all values given for its group agree). A group's
      channels are pruned together (structured); unstructured, every member's weights are
      masked at the group's value.
    spec.global_sparsity: rank all prunable trunk layers together to remove that fraction of
      their units (weights, when unstructured) overall, no layer beyond MAX_SPARSITY (per-layer
      values are then ignored).
    spec.round_to: structured only; each layer's kept width is rounded to a multiple of it
      (`round_units`), so that the kernels' channel blocks are full.
    task_losses: model -> {task: loss} on calibration data; needed by the gradient criteria
      (the model is scored in eval mode: BatchNorm uses its running statistics).
    after_step(step, model): called after each of the `spec.steps` steps (fine-tune, report).
    Returns the pruned model (structured pruning edits `model` in place).
    """
    IMPORTANCES.method(spec.importance)  # a criterion's name: the registry knows them, not the policy
    if spec.importance in NEEDS_GRADS and task_losses is None:
        raise PrunefuseError(f"importance {spec.importance!r} needs task_losses (calibration losses per task)")
    groups = coupled_groups(model, example_inputs)
    sparsity = decided_sparsity(groups, dict(spec.sparsity), prunable_layers(model),  # keys that fit this model
                                found(model, example_inputs))
    if spec.mode == "structured":
        return prune_structured(model, spec, sparsity, groups, example_inputs=example_inputs,
                                task_losses=task_losses, after_step=after_step)
    per_layer = {m: value for name, value in sparsity.items() for m in groups[name]}
    return prune_unstructured(model, spec, per_layer, task_losses=task_losses, after_step=after_step)
