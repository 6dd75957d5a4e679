"""Pruning a multi-task model's trunk: structured (really smaller) or unstructured (masks).

structured: torch-pruning's dependency graph removes whole neurons / channels, so the
  model really shrinks and runs on smaller dense kernels. Head output layers are never
  pruned (their in-features shrink with the trunk, their outputs stay).
unstructured: magnitude-style masks through `torch.nn.utils.prune`; the zeros count as
  non-zero-parameter and sparse-storage savings, and honestly give no latency gain.

Schedules: `steps=1` is one-shot; `steps=n` follows Zhu & Gupta (2017)'s cubic ramp
s_t = s_f + (s_i − s_f)(1 − t/n)^3 with s_i = 0, and calls `after_step` between steps
so the caller can fine-tune and report (train-prune cycles).
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from spaces.errors import PrunefuseError, unknown_name

# A layer keeps at least 5% of its units: no policy may prune a layer to zero width.
MAX_SPARSITY = 0.95
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


def prunable_layers(model) -> list[str]:
    """Names (`trunk.fc1`, `trunk.conv2`) of the trunk's Linear / Conv2d layers, in forward order."""
    return [f"trunk.{name}" for name, m in model.trunk.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def cubic_schedule(final: float, steps: int) -> list[float]:
    """Target sparsity after each of `steps` steps (index 0 = before pruning = 0.0)."""
    return [final + (0.0 - final) * (1.0 - t / steps) ** 3 for t in range(steps + 1)]


def _tp_cubic(ratio: float, steps: int) -> list[float]:
    return cubic_schedule(ratio, steps)


# --- importance criteria: name -> factory(task_grads, aggregate) -> tp.importance.Importance ---

AGGREGATES = {
    "mean": lambda s: s.mean(0),
    "min": lambda s: s.min(0).values,
    # A unit that any one task relies on is kept (DiSparse's "unanimous to prune").
    "max": lambda s: s.max(0).values,
    # Each task votes for the units above its own median; ties broken by the mean score.
    "vote": lambda s: (s > s.median(dim=1, keepdim=True).values).float().sum(0) + s.mean(0) / (s.mean(0).max() + 1e-12),
}


class MultiTaskTaylor(tp.importance.Importance):
    """DiSparse-style (Sun et al., CVPR 2022) importance: first-order Taylor |w·∂L_t/∂w| scored
    per task on that task's own loss, each task's scores normalised to sum 1 within the group
    so no task's loss scale dominates, then aggregated across tasks."""

    def __init__(self, task_grads: dict[str, dict], aggregate: str = "max"):
        if aggregate not in AGGREGATES:
            raise unknown_name("importance aggregate", aggregate, AGGREGATES)
        self.task_grads, self.aggregate = task_grads, aggregate
        self.taylor = tp.importance.GroupTaylorImportance(normalizer=None)

    @torch.no_grad()
    def __call__(self, group):
        scores = []
        for grads in self.task_grads.values():
            for param, grad in grads.items():
                param.grad = grad
            s = self.taylor(group)
            scores.append(s / (s.sum() + 1e-12))
        return AGGREGATES[self.aggregate](torch.stack(scores))


def _summed(task_grads):
    # Single-objective Taylor: gradient of the sum of task losses.
    total = {}
    for grads in task_grads.values():
        for p, g in grads.items():
            total[p] = total.get(p, 0) + g
    return {"all": total}


IMPORTANCES = {
    "l1": lambda grads, agg: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda grads, agg: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda grads, agg: MultiTaskTaylor(_summed(grads), "mean"),
    "multitask_taylor": lambda grads, agg: MultiTaskTaylor(grads, agg),
}
NEEDS_GRADS = {"taylor", "multitask_taylor"}


def task_gradients(model, task_losses) -> dict[str, dict[nn.Parameter, torch.Tensor]]:
    """task -> {parameter: ∂L_task/∂parameter}, from one forward over calibration data."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = task_losses(model)
    out = {}
    for i, (task, loss) in enumerate(losses.items()):
        grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
        # Another task's head gets no gradient from this task's loss: it scores zero here.
        out[task] = {p: torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)}
    return out


# --- the pruning entry point ---

def check_sparsity(model, sparsity: dict[str, float]) -> None:
    layers = prunable_layers(model)
    for name, value in sparsity.items():
        if name not in layers:
            raise PrunefuseError(f"policy prunes layer {name!r}, which this model does not have; "
                                 f"prunable layers: {', '.join(layers)}")
        if not 0.0 <= value <= MAX_SPARSITY:
            raise PrunefuseError(f"sparsity of {name} is {value}; expected 0 <= sparsity <= {MAX_SPARSITY}")


def prune(model, sparsity: dict[str, float], *, mode: str = "structured", importance: str = "l2",
          example_inputs: torch.Tensor, task_losses=None, steps: int = 1,
          global_sparsity: float | None = None, aggregate: str = "max", after_step=None) -> nn.Module:
    """Prune `model`'s trunk to the per-layer `sparsity` (fraction of units / weights removed).

    task_losses: model -> {task: loss} on calibration data; needed by gradient criteria.
    global_sparsity: rank all listed layers together to remove that fraction overall
      (per-layer values are then ignored).
    after_step(step, model): called after each of the `steps` steps (fine-tune, report).
    Returns the pruned model (structured pruning edits `model` in place).
    """
    if importance not in IMPORTANCES:
        raise unknown_name("importance", importance, IMPORTANCES)
    if importance in NEEDS_GRADS and task_losses is None:
        raise ValueError(f"importance {importance!r} needs task_losses")
    if steps < 1:
        raise PrunefuseError(f"pruning steps={steps}; expected an integer >= 1")
    check_sparsity(model, sparsity)
    if global_sparsity is not None and not 0.0 <= global_sparsity <= MAX_SPARSITY:
        raise PrunefuseError(f"global sparsity {global_sparsity}; expected 0 <= sparsity <= {MAX_SPARSITY}")
    if mode == "structured":
        return _prune_structured(model, sparsity, importance, example_inputs, task_losses, steps,
                                 global_sparsity, aggregate, after_step)
    if mode == "unstructured":
        return _prune_unstructured(model, sparsity, importance, task_losses, steps,
                                   global_sparsity, aggregate, after_step)
    raise unknown_name("pruning mode", mode, ["structured", "unstructured"])


def _prune_structured(model, sparsity, importance, example_inputs, task_losses, steps,
                      global_sparsity, aggregate, after_step):
    modules = dict(model.named_modules())
    listed = prunable_layers(model) if global_sparsity is not None else list(sparsity)
    ignored = [m for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES) and n not in listed]
    grads = {}
    imp = IMPORTANCES[importance](grads, aggregate)
    kwargs = dict(pruning_ratio=global_sparsity, global_pruning=True) if global_sparsity is not None else \
        dict(pruning_ratio=0.0, pruning_ratio_dict={modules[n]: s for n, s in sparsity.items()})
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=imp, iterative_steps=steps,
        iterative_pruning_ratio_scheduler=_tp_cubic, ignored_layers=ignored,
        max_pruning_ratio=MAX_SPARSITY, **kwargs)
    for step in range(1, steps + 1):
        if importance in NEEDS_GRADS:
            # Parameters are new tensors after every step: score with fresh gradients.
            grads.clear()
            grads.update(task_gradients(model, task_losses))
            imp.task_grads = _summed(grads) if importance == "taylor" else grads
        pruner.step()
        model.zero_grad(set_to_none=True)
        if after_step:
            after_step(step, model)
    return model


def _weight_scores(model, layers, importance, task_losses, aggregate):
    """Per-weight importance for unstructured masks, same criteria as structured."""
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in layers}
    if importance in ("l1", "l2"):
        return {n: w.detach().abs() for n, w in weights.items()}
    grads = task_gradients(model, task_losses)
    if importance == "taylor":
        grads = _summed(grads)
    scores = {}
    for n, w in weights.items():
        per_task = [(w.detach() * g[w]).abs() if w in g else torch.zeros_like(w) for g in grads.values()]
        per_task = [s / (s.sum() + 1e-12) for s in per_task]
        scores[n] = AGGREGATES["mean" if importance == "taylor" else aggregate](torch.stack(per_task))
    return scores


def _lowest_masked(scores, k):
    """A 0/1 mask with exactly the k lowest-scoring entries zeroed (ties broken by position)."""
    mask = torch.ones_like(scores)
    if k > 0:
        mask.view(-1)[scores.flatten().argsort(stable=True)[:k]] = 0.0
    return mask


def _prune_unstructured(model, sparsity, importance, task_losses, steps, global_sparsity, aggregate, after_step):
    modules = dict(model.named_modules())
    layers = prunable_layers(model) if global_sparsity is not None else list(sparsity)
    for step in range(1, steps + 1):
        _make_masks_permanent(modules, layers)  # so `weight` is a Parameter again for scoring
        scores = _weight_scores(model, layers, importance, task_losses, aggregate)
        if global_sparsity is not None:
            # One ranking across layers, but never more than MAX_SPARSITY of any one layer.
            target = cubic_schedule(global_sparsity, steps)[step]
            flat = torch.cat([s.flatten() for s in scores.values()])
            cut = flat.sort().values[int(target * flat.numel()) - 1] if target > 0 else flat.min() - 1
            masks = {n: _lowest_masked(s, min(int((s <= cut).sum()), int(MAX_SPARSITY * s.numel())))
                     for n, s in scores.items()}
        else:
            masks = {n: _lowest_masked(s, int(cubic_schedule(sparsity[n], steps)[step] * s.numel()))
                     for n, s in scores.items()}
        for n, mask in masks.items():
            # custom_from_mask keeps the zeros in place through fine-tuning.
            torch_prune.custom_from_mask(modules[n], "weight", mask)
        if after_step:
            after_step(step, model)
    _make_masks_permanent(modules, layers)
    return model


def without_masks(model):
    """The model as it will be stored: masks folded into the weights (a copy if any were live).

    Live masks make `weight` a computed tensor that deepcopy refuses, so they are folded in,
    the model copied, and the same masks put back on the original to keep fine-tuning sparse.
    """
    import copy

    modules = dict(model.named_modules())
    masks = {n: m.weight_mask.clone() for n, m in modules.items()
             if isinstance(m, PRUNABLE_TYPES) and torch_prune.is_pruned(m)}
    if not masks:
        return model
    _make_masks_permanent(modules, list(masks))
    clone = copy.deepcopy(model)
    for n, mask in masks.items():
        torch_prune.custom_from_mask(modules[n], "weight", mask)
    return clone


def _make_masks_permanent(modules, layers):
    for n in layers:
        if isinstance(modules[n], PRUNABLE_TYPES) and torch_prune.is_pruned(modules[n]):
            torch_prune.remove(modules[n], "weight")
