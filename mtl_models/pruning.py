"""Pruning a multi-task model's trunk: structured (really smaller) or unstructured (masks).

structured: whole neurons / channels are removed through torch-pruning's dependency graph
  (`tp.DependencyGraph`, `get_pruning_group`, `Group.prune`), so the coupled BatchNorm, the
  next layer's inputs and the heads' in-features shrink with them and the model runs on
  smaller dense kernels. Head output layers are never pruned.
unstructured: masks through `torch.nn.utils.prune`; the zeros count as non-zero-parameter
  and sparse-storage savings, and honestly give no latency gain (latency is always measured
  by `mtl_models.measure`, never derived from sparsity).

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
"""
from __future__ import annotations

import math

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune

from spaces.errors import PrunefuseError, unknown_name

# A layer keeps at least 5% of its units (and never fewer than one): no policy may prune a
# layer to zero width.
MAX_SPARSITY = 0.95
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)
MODES = ("structured", "unstructured")


def prunable_layers(model) -> list[str]:
    """Names (`trunk.fc1`, `trunk.conv2`) of the trunk's Linear / Conv2d layers, in forward order."""
    return [f"trunk.{name}" for name, m in model.trunk.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def cubic_schedule(final: float, steps: int) -> list[float]:
    """Target sparsity after each of `steps` steps (index 0 = before pruning = 0.0).

    Zhu & Gupta (2017): s_t = s_f + (s_i − s_f)(1 − t/n)^3 with s_i = 0; s_n = s_f exactly.
    """
    values = [final + (0.0 - final) * (1.0 - t / steps) ** 3 for t in range(steps + 1)]
    values[-1] = final
    return values


def kept_units(width: int, sparsity: float, round_to: int = 1) -> int:
    """Units a layer of `width` keeps at `sparsity`: ⌊width·(1 − s)⌋, but never fewer than one;
    with `round_to` > 1, rounded to a multiple of it (see `round_units`)."""
    return round_units(max(1, min(width, math.floor(width * (1.0 - sparsity) + 1e-6))), width, round_to)


def round_units(kept: int, width: int, round_to: int) -> int:
    """`kept` rounded to the nearest multiple of `round_to`, never below `min_kept(width)`
    (the next multiple up where rounding down would cross it) and never above `width`.

    Why: CPU and GPU kernels work on channels in blocks (oneDNN blocks fp32 channels by 8
    with AVX2 and by 16 with AVX-512; tensor cores by 8), so 45 kept channels run at the
    cost of 48 and 22 at the cost of 32. Rounding the kept width to the block size turns
    removed MACs into removed time. A layer asked to keep everything, or no wider than
    `round_to`, is not rounded."""
    if round_to <= 1 or width <= round_to or kept >= width:
        return kept
    floor = -(-min_kept(width) // round_to) * round_to
    return min(width, max(floor, round_to * round(kept / round_to)))


def min_kept(width: int) -> int:
    """The fewest units MAX_SPARSITY lets a layer keep (global pruning's per-layer cap)."""
    return max(1, min(width, math.floor(width * (1.0 - MAX_SPARSITY) + 1e-6)))


# --- aggregation of per-task scores: (tasks, units) -> (units) ---

def _vote(s):
    # Each task votes for the units above its own median; ties are broken by the mean score,
    # scaled into [0, 0.5] so a tie-break never outweighs a vote.
    votes = (s > s.median(dim=1, keepdim=True).values).float().sum(0)
    mean = s.mean(0)
    return votes + 0.5 * mean / (mean.max() + 1e-12)


AGGREGATES = {
    "mean": lambda s: s.mean(0),
    # Pruned only if every task finds the unit unimportant (DiSparse's unanimous rule).
    "max": lambda s: s.max(0).values,
    # Pruned as soon as one task finds the unit unimportant.
    "min": lambda s: s.min(0).values,
    "vote": _vote,
}


# --- criteria: each scores every unit of every listed layer in one go ---

def _plain(idxs) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


class _Magnitude:
    """Group magnitude (torch-pruning's GroupMagnitudeImportance, mean-normalised per group)."""

    needs_data = False

    def __init__(self, p: int):
        self.imp = tp.importance.GroupMagnitudeImportance(p=p)

    def scores(self, model, groups: dict, task_losses) -> dict[str, torch.Tensor]:
        return {name: self.imp(group).detach().float().cpu() for name, group in groups.items()}


class MultiTaskTaylor:
    """Per-task estimate of how much each task's loss rises when a unit is removed.

    Removing unit c of a layer zeroes channel c of the activation x that the next layers read
    (the next conv / linear, or the heads for the trunk's last layer). For task t, with f_t its
    head's output on the calibration batch, the second-order Taylor estimate of the change is

        ΔL_t(c) ≈ −Σ_n x̃_c·∂L_t/∂x_c  +  ½ Σ_n (J_n x̃_c)ᵀ H_n (J_n x̃_c),   x̃_c = x_c − x̄_c

    (sums over positions inside each dot product; x̄_c, the channel's mean, is what the
    consumer's bias or BatchNorm takes over in the fine-tune, "mean replacement"): the
    first-order term, plus the Gauss-Newton second-order term with J_n = ∂f_t,n/∂x and
    H_n = ∂²L_t/∂f_t,n² the loss's own curvature in output space (computed by autograd, so any
    per-sample loss works: softmax cross-entropy, MSE, ...). Neither term alone will do: on
    the trained multidigits CNN the real loss change of removing each unit (measured on val)
    has a rank correlation per layer of 0.92–0.99 with this estimate for the `sum`
    regression, but −0.45–0.18 with the empirical Fisher E_n[(x_c·∂L/∂x_c)²] (Molchanov et al.
    2019; Theis et al. 2018) and with the curvature term alone; for the classification tasks
    0.16–0.69 against 0.08–0.75. Heads with more than `max_outputs` outputs fall back to the
    empirical Fisher.

    multitask_taylor divides each task's estimates by their mean magnitude over all listed
    units (so no task's loss scale dominates, and layers stay comparable for global
    ranking), then aggregates over tasks (`AGGREGATES`; "max" is DiSparse's unanimous rule,
    Sun et al. CVPR 2022: a unit goes only if every task can spare it). taylor (`summed`) is
    the estimate for the sum of the task losses: Σ_t ΔL_t, unnormalised.
    """

    needs_data = True
    max_outputs = 32
    # The estimates hold for small removals: a step that removes more than this fraction of
    # a layer's units is split into rounds, re-scored (on recalibrated BatchNorm) between them.
    round_fraction = 0.2

    def __init__(self, aggregate: str = "max", *, summed: bool = False):
        if aggregate not in AGGREGATES:
            raise unknown_name("importance aggregate", aggregate, AGGREGATES)
        self.aggregate, self.summed = aggregate, summed

    def per_task(self, model, groups: dict, task_losses) -> dict[str, dict[str, torch.Tensor]]:
        """task -> layer -> estimated loss change per unit (before normalisation / aggregation)."""
        consumers = {}          # module -> the activation it read in the calibration forward
        producers = {}          # listed module -> its own output (fallback when nothing consumes it)
        outputs = {}            # task -> its head's output
        listed = {group[0].dep.target.module for group in groups.values()}
        heads = getattr(model, "heads", {})

        def read_input(module, inputs):
            if inputs and torch.is_tensor(inputs[0]) and inputs[0].requires_grad:
                consumers[module] = inputs[0]

        def read_output(module, inputs, output):
            if torch.is_tensor(output) and output.requires_grad:
                producers[module] = output

        hooks = [m.register_forward_pre_hook(read_input) for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
        hooks += [m.register_forward_hook(read_output) for m in listed]
        hooks += [head.register_forward_hook(lambda m, i, o, task=task: outputs.__setitem__(task, o))
                  for task, head in (heads.items() if hasattr(heads, "items") else [])]
        try:
            with torch.enable_grad():
                losses = task_losses(model)
                activations = {}
                for t in list(consumers.values()) + list(producers.values()):
                    activations.setdefault(id(t), t)
                order = list(activations.values())

                def units(loss_or_output, weights=None):
                    # Per sample and unit of every group: Σ over positions of x·∂(·)/∂x.
                    target = loss_or_output if weights is None else (loss_or_output * weights).sum()
                    grads = torch.autograd.grad(target, order, retain_graph=True, allow_unused=True)
                    per_tensor = {id(x): _per_channel(x, g) for x, g in zip(order, grads) if g is not None}
                    return {name: _to_units(group, consumers, producers, per_tensor) for name, group in groups.items()}

                out = {}
                for task, loss in losses.items():
                    first = units(loss)
                    f = outputs.get(task)
                    if f is None or f.dim() != 2 or f.shape[1] > self.max_outputs:
                        out[task] = {n: u.pow(2).sum(0) for n, u in first.items()}  # empirical Fisher
                        continue
                    estimate = {n: -u.sum(0) for n, u in first.items()}
                    for w in _curvature_factors(loss, f):
                        for n, u in units(f, w).items():
                            estimate[n] += 0.5 * u.pow(2).sum(0)
                    out[task] = estimate
        finally:
            for h in hooks:
                h.remove()
        return out

    def scores(self, model, groups: dict, task_losses) -> dict[str, torch.Tensor]:
        raw = self.per_task(model, groups, task_losses)
        names = list(groups)
        sizes = [len(groups[n][0].idxs) for n in names]
        per_task = [torch.cat([layers[n] for n in names]) for layers in raw.values()]
        if self.summed:
            return dict(zip(names, sum(per_task).split(sizes)))
        normalised = torch.stack([s / (s.abs().mean() + 1e-30) for s in per_task])
        return dict(zip(names, AGGREGATES[self.aggregate](normalised).split(sizes)))


def _per_channel(x, g) -> torch.Tensor:
    """(N, C): Σ over positions of (x − x̄)·g, channel by channel.

    x̄ is the channel's mean over samples (and positions, for conv inputs): the part of a
    removed unit's output that the consumer's bias (or BatchNorm) takes over during the
    fine-tune ("mean replacement", Evci et al. 2018), so it is not counted as lost.
    """
    x = x.detach()
    x = x - x.mean(dim=(0, *range(2, x.dim())), keepdim=True)
    prod = x * g.detach()
    return (prod.flatten(2).sum(2) if prod.dim() > 2 else prod).float().cpu()


def _to_units(group, consumers, producers, per_tensor) -> torch.Tensor:
    """(N, units of the group's root layer): what removing each unit takes out of the
    activations that read it (through flatten / pooling, by the group's index mapping)."""
    root = group[0].dep.target.module
    width = len(group[0].idxs)
    total, seen = None, set()
    for item in group.items:
        module = item.dep.target.module
        if module not in consumers or getattr(item.dep.handler, "__name__", "") != "prune_in_channels":
            continue
        x = consumers[module]
        if id(x) in seen:
            continue  # the heads all read the same trunk output: count it once
        seen.add(id(x))
        if total is None:
            total = torch.zeros(x.shape[0], width)
        c = per_tensor.get(id(x))
        if c is not None:
            idx = torch.tensor(_plain(item.idxs))
            roots = torch.tensor([int(r) for r in item.root_idxs])
            total.index_add_(1, roots, c[:, idx].float())
    if total is None:
        # Nothing in the group reads the units (a layer at the model's output): use the
        # layer's own output instead.
        y = producers.get(root)
        c = per_tensor.get(id(y)) if y is not None else None
        total = c.float() if c is not None else torch.zeros(1, width)
    return total


def _curvature_factors(loss, f):
    """Per-sample factors w_k (N, K) with Σ_k w_k w_kᵀ = ∂²L/∂f_n² (the loss's curvature in
    output space; block-diagonal over samples for any mean of per-sample losses)."""
    g = torch.autograd.grad(loss, f, create_graph=True)[0]
    if not g.requires_grad:
        return []  # the loss is linear in f: no curvature
    k_out = f.shape[1]
    columns = [torch.autograd.grad(g[:, k].sum(), f, retain_graph=True, allow_unused=True)[0] for k in range(k_out)]
    hess = torch.stack([c if c is not None else torch.zeros_like(f) for c in columns], 2).detach()
    hess = 0.5 * (hess + hess.transpose(1, 2))
    values, vectors = torch.linalg.eigh(hess)
    values = values.clamp_min(0.0).sqrt()
    return [vectors[:, :, k] * values[:, k:k + 1] for k in range(k_out) if values[:, k].max() > 0]


# name -> factory(aggregate) -> criterion with .scores(model, groups, task_losses)
IMPORTANCES = {
    "l1": lambda aggregate: _Magnitude(1),
    "l2": lambda aggregate: _Magnitude(2),
    "taylor": lambda aggregate: MultiTaskTaylor("mean", summed=True),
    "multitask_taylor": lambda aggregate: MultiTaskTaylor(aggregate),
}
NEEDS_GRADS = {"taylor", "multitask_taylor"}


def task_gradients(model, task_losses) -> dict[str, dict[nn.Parameter, torch.Tensor]]:
    """task -> {parameter: ∂L_task/∂parameter}, from one forward over calibration data."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
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
        if not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_SPARSITY:
            raise PrunefuseError(f"sparsity of {name} is {value}; expected 0 <= sparsity <= {MAX_SPARSITY}")


def prune(model, sparsity: dict[str, float], *, mode: str = "structured", importance: str = "l2",
          example_inputs: torch.Tensor, task_losses=None, steps: int = 1,
          global_sparsity: float | None = None, aggregate: str = "max", after_step=None,
          round_to: int = 1) -> nn.Module:
    """Prune `model`'s trunk to the per-layer `sparsity` (fraction of units / weights removed).

    task_losses: model -> {task: loss} on calibration data; needed by the gradient criteria
      (the model is scored in eval mode: BatchNorm uses its running statistics).
    global_sparsity: rank all prunable trunk layers together to remove that fraction of their
      units (weights, when unstructured) overall, no layer beyond MAX_SPARSITY (per-layer
      values are then ignored).
    after_step(step, model): called after each of the `steps` steps (fine-tune, report).
    round_to: structured only; each layer's kept width is rounded to a multiple of it
      (`round_units`), so that the kernels' channel blocks are full.
    Returns the pruned model (structured pruning edits `model` in place).
    """
    if mode not in MODES:
        raise unknown_name("pruning mode", mode, MODES)
    if importance not in IMPORTANCES:
        raise unknown_name("importance", importance, IMPORTANCES)
    if aggregate not in AGGREGATES:
        raise unknown_name("importance aggregate", aggregate, AGGREGATES)
    if importance in NEEDS_GRADS and task_losses is None:
        raise PrunefuseError(f"importance {importance!r} needs task_losses (calibration losses per task)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrunefuseError(f"pruning steps={steps}; expected an integer >= 1")
    check_sparsity(model, sparsity)
    if global_sparsity is not None and not 0.0 <= global_sparsity <= MAX_SPARSITY:
        raise PrunefuseError(f"global sparsity {global_sparsity}; expected 0 <= sparsity <= {MAX_SPARSITY}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PrunefuseError(f"pruning round_to={round_to!r}; expected an integer >= 1")
    if mode == "structured":
        return _prune_structured(model, sparsity, importance, example_inputs, task_losses, steps,
                                 global_sparsity, aggregate, after_step, round_to)
    if round_to != 1:
        raise PrunefuseError(f"pruning round_to={round_to} rounds kept channels, so it needs mode 'structured' "
                             "(unstructured pruning keeps every channel)")
    return _prune_unstructured(model, sparsity, importance, task_losses, steps,
                               global_sparsity, aggregate, after_step)


# --- structured ---

def _width(module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _allocate_global(scores: dict, current: dict, initial: dict, target: float) -> dict[str, int]:
    """Units to keep per layer so that the globally lowest-scoring units go, `target` of all
    units overall, no layer below `min_kept` (a capped greedy: the lowest units that are still
    allowed to go, across layers)."""
    total_kept = math.floor(sum(initial.values()) * (1.0 - target) + 1e-6)
    to_remove = max(0, sum(current.values()) - total_kept)
    values, owners = [], []
    for i, (name, s) in enumerate(scores.items()):
        removable = max(0, current[name] - min_kept(initial[name]))
        values.append(torch.sort(s, stable=True).values[:removable])
        owners.append(torch.full((removable,), i))
    keep = dict(current)
    if to_remove == 0 or not values:
        return keep
    values, owners = torch.cat(values), torch.cat(owners)
    chosen = owners[torch.sort(values, stable=True).indices[:to_remove]]
    names = list(scores)
    for i, n in zip(*torch.unique(chosen, return_counts=True)):
        keep[names[int(i)]] -= int(n)
    return keep


def _prune_structured(model, sparsity, importance, example_inputs, task_losses, steps,
                      global_sparsity, aggregate, after_step, round_to=1):
    modules = dict(model.named_modules())
    listed = prunable_layers(model) if global_sparsity is not None else [n for n in sparsity]
    initial = {n: _width(modules[n]) for n in listed}
    criterion = IMPORTANCES[importance](aggregate)
    for step in range(1, steps + 1):
        # Fractions of each layer's initial units removed before and after this step.
        if global_sparsity is not None:
            before = {None: cubic_schedule(global_sparsity, steps)[step - 1]}
            after = {None: cubic_schedule(global_sparsity, steps)[step]}
        else:
            before = {n: cubic_schedule(sparsity[n], steps)[step - 1] for n in listed}
            after = {n: cubic_schedule(sparsity[n], steps)[step] for n in listed}
        chunk = getattr(criterion, "round_fraction", None)
        largest = max([after[k] - before[k] for k in after], default=0.0)
        rounds = max(1, math.ceil(largest / chunk - 1e-9)) if chunk else 1
        for r in range(1, rounds + 1):
            # Gradient criteria re-score the model between rounds of one step.
            now = {k: after[k] if r == rounds else before[k] + (after[k] - before[k]) * r / rounds for k in after}
            _structured_round(model, modules, listed, initial, criterion, example_inputs, task_losses,
                              None if global_sparsity is not None else now, now.get(None), round_to)
        model.zero_grad(set_to_none=True)
        if after_step:
            after_step(step, model)
    return model


def _structured_round(model, modules, listed, initial, criterion, example_inputs, task_losses, fractions,
                      global_fraction, round_to=1):
    model.eval()
    current = {n: _width(modules[n]) for n in listed}
    targets = None if fractions is None else {n: kept_units(initial[n], fractions[n], round_to) for n in listed}
    todo = listed if targets is None else [n for n in listed if targets[n] < current[n]]
    if not todo:
        return
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    groups = {n: _full_group(graph, modules[n], current[n]) for n in todo}
    groups = {n: g for n, g in groups.items() if _safe(g, modules, set(listed))}
    scores = criterion.scores(model, groups, task_losses)
    if targets is None:
        targets = _allocate_global(scores, {n: current[n] for n in groups}, {n: initial[n] for n in groups},
                                   global_fraction)
        targets = {n: min(current[n], round_units(k, initial[n], round_to)) for n, k in targets.items()}
    changed = False
    for name, s in scores.items():
        n_drop = _width(modules[name]) - targets[name]
        if n_drop <= 0 or _width(modules[name]) != len(s):
            continue  # nothing to do, or already resized through a coupled layer
        drop = torch.sort(s, stable=True).indices[:n_drop].tolist()
        group = graph.get_pruning_group(modules[name], _out_fn(graph, modules[name]), sorted(drop))
        if graph.check_pruning_group(group):
            group.prune()
            changed = True
    if changed and task_losses is not None:
        recalibrate_batchnorm(model, task_losses)


@torch.no_grad()
def recalibrate_batchnorm(model, task_losses) -> None:
    """Re-estimate BatchNorm running statistics on the calibration batch (after pruning, the
    statistics of the layers that read pruned channels are stale; Li et al. 2020, EagleEye)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    saved = [(m, m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly the calibration batch's statistics
        m.train()
    try:
        task_losses(model)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)


def _out_fn(graph, module):
    return graph.get_pruner_of_module(module).prune_out_channels


def _full_group(graph, module, width):
    return graph.get_pruning_group(module, _out_fn(graph, module), list(range(width)))


def _safe(group, modules, listed: set) -> bool:
    """False if pruning this group would cut the outputs of a layer that is not listed (a head)."""
    names = {m: n for n, m in modules.items()}
    for item in group.items:
        module, fn = item.dep.target.module, item.dep.handler
        if isinstance(module, PRUNABLE_TYPES) and names.get(module) not in listed and \
                getattr(fn, "__name__", "") == "prune_out_channels":
            return False
    return True


# --- unstructured ---

def _weight_scores(model, layers, importance, task_losses, aggregate):
    """Per-weight importance for unstructured masks: |w| (l1 / l2), or per-task |w·∂L_t/∂w|
    normalised by each task's mean over all listed weights, then aggregated."""
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight for n in layers}
    if importance in ("l1", "l2"):
        return {n: w.detach().abs() for n, w in weights.items()}
    grads = task_gradients(model, task_losses)
    if importance == "taylor":
        total = {}
        for g in grads.values():
            for p, v in g.items():
                total[p] = total.get(p, 0) + v
        grads = {"all": total}
    names = list(weights)
    per_task = []
    for g in grads.values():
        s = torch.cat([(weights[n].detach() * g[weights[n]]).abs().flatten() for n in names])
        per_task.append(s / (s.mean() + 1e-30))
    agg = AGGREGATES["mean" if importance == "taylor" else aggregate](torch.stack(per_task))
    return {n: a.view_as(weights[n]) for n, a in zip(names, agg.split([weights[n].numel() for n in names]))}


def _mask_lowest(scores, k):
    """A 0/1 mask with exactly the k lowest-scoring entries zeroed (ties broken by position)."""
    mask = torch.ones_like(scores)
    if k > 0:
        mask.view(-1)[scores.flatten().argsort(stable=True)[:k]] = 0.0
    return mask


def _global_counts(scores: dict, target: float) -> dict[str, int]:
    """Weights to zero per layer: the globally lowest `target` fraction, no layer beyond MAX_SPARSITY."""
    total = sum(s.numel() for s in scores.values())
    k = int(target * total + 1e-6)
    values, owners = [], []
    for i, s in enumerate(scores.values()):
        cap = int(MAX_SPARSITY * s.numel() + 1e-6)
        values.append(s.detach().flatten().cpu().sort(stable=True).values[:cap])
        owners.append(torch.full((cap,), i))
    counts = {n: 0 for n in scores}
    if k == 0:
        return counts
    values, owners = torch.cat(values), torch.cat(owners)
    chosen = owners[values.argsort(stable=True)[:k]]
    names = list(scores)
    for i, n in zip(*torch.unique(chosen, return_counts=True)):
        counts[names[int(i)]] = int(n)
    return counts


def _prune_unstructured(model, sparsity, importance, task_losses, steps, global_sparsity, aggregate, after_step):
    modules = dict(model.named_modules())
    layers = prunable_layers(model) if global_sparsity is not None else list(sparsity)
    masks = {}
    for step in range(1, steps + 1):
        model.eval()
        _make_masks_permanent(modules, layers)  # so `weight` is a Parameter again for scoring
        scores = _weight_scores(model, layers, importance, task_losses, aggregate)
        # Once pruned, always pruned: earlier zeros rank below everything.
        scores = {n: s.masked_fill(masks[n] == 0, -1.0) if n in masks else s for n, s in scores.items()}
        if global_sparsity is not None:
            counts = _global_counts(scores, cubic_schedule(global_sparsity, steps)[step])
        else:
            counts = {n: int(cubic_schedule(sparsity[n], steps)[step] * s.numel() + 1e-6) for n, s in scores.items()}
        for n, s in scores.items():
            masks[n] = _mask_lowest(s, counts[n])
            # custom_from_mask keeps the zeros in place through fine-tuning.
            torch_prune.custom_from_mask(modules[n], "weight", masks[n])
        model.zero_grad(set_to_none=True)
        if after_step:
            after_step(step, model)
    _make_masks_permanent(modules, layers)
    return model


def without_masks(model):
    """The model as it will be stored: a copy with the masks folded into the weights, or the
    model itself if it has no live masks. The original keeps its masks and its parameter
    objects (an optimizer holding them keeps working)."""
    import copy

    masked = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES) and torch_prune.is_pruned(m)]
    if not masked:
        return model
    # A live mask makes `weight` a computed (non-leaf) tensor, which deepcopy refuses: copy
    # with a detached stand-in, then fold the masks into the copy only.
    live = {m: m.weight for m in masked}
    try:
        for m in masked:
            m.weight = live[m].detach()
        clone = copy.deepcopy(model)
    finally:
        for m in masked:
            m.weight = live[m]
    for m in clone.modules():
        if isinstance(m, PRUNABLE_TYPES) and torch_prune.is_pruned(m):
            torch_prune.remove(m, "weight")
    return clone


def _make_masks_permanent(modules, layers):
    for n in layers:
        if isinstance(modules[n], PRUNABLE_TYPES) and torch_prune.is_pruned(modules[n]):
            torch_prune.remove(modules[n], "weight")
