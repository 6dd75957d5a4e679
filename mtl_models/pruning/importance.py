"""Importance criteria (`IMPORTANCES`) and the aggregates of per-task scores (`AGGREGATES`):
each criterion scores every unit of every listed layer in one go (structured), or every
weight (`weight_scores`, unstructured)."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from spaces.errors import unknown_name
from spaces.registry import Registry

from .layers import PRUNABLE_TYPES, weight_name


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

    def __init__(self, p: int):
        self.imp = tp.importance.GroupMagnitudeImportance(p=p)

    def scores(self, model, groups: dict, task_losses) -> dict[str, torch.Tensor]:
        # A MultiheadAttention's heads have no torch-pruning group: they score themselves.
        return {name: group.magnitude(self.imp.p) if hasattr(group, "magnitude") else self.imp(group).detach().float().cpu()
                for name, group in groups.items()}


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

        axes = {}               # id(activation) -> its feature axis

        def read_input(module, inputs):
            if inputs and torch.is_tensor(inputs[0]) and inputs[0].requires_grad:
                consumers[module] = inputs[0]
                axes[id(inputs[0])] = _feature_axis(module)

        def read_output(module, inputs, output):
            if torch.is_tensor(output) and output.requires_grad:
                producers[module] = output
                axes.setdefault(id(output), _feature_axis(module))

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
                    per_tensor = {id(x): _per_channel(x, g, axes.get(id(x), 1)) for x, g in zip(order, grads)
                                  if g is not None}
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
        sizes = [_units(groups[n]) for n in names]
        per_task = [torch.cat([layers[n] for n in names]) for layers in raw.values()]
        if self.summed:
            return dict(zip(names, sum(per_task).split(sizes)))
        normalised = torch.stack([s / (s.abs().mean() + 1e-30) for s in per_task])
        return dict(zip(names, AGGREGATES[self.aggregate](normalised).split(sizes)))


def _feature_axis(module) -> int:
    """Where a layer's features are: dim 1 for convs (N, C, H, W), the last dim for anything
    else (Linear, attention: (N, features) or token activations (N, tokens, features))."""
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _units(group) -> int:
    """Units of a group's root: its root indices (a fused qkv Linear lists each q-space channel
    three times, once per q / k / v row)."""
    return len({int(r) for r in group[0].root_idxs}) if hasattr(group[0], "root_idxs") else len(group[0].idxs)


def _per_channel(x, g, axis: int = 1) -> torch.Tensor:
    """(N, C): Σ over positions of (x − x̄)·g, channel by channel; `axis` is x's feature axis
    (1 for conv activations, -1 for Linear inputs and token activations (N, tokens, C)).

    x̄ is the channel's mean over samples (and positions, for conv inputs): the part of a
    removed unit's output that the consumer's bias (or BatchNorm) takes over during the
    fine-tune ("mean replacement", Evci et al. 2018), so it is not counted as lost.
    """
    if x.dim() > 2:
        x, g = x.movedim(axis, 1), g.movedim(axis, 1)
    x = x.detach()
    x = x - x.mean(dim=(0, *range(2, x.dim())), keepdim=True)
    prod = x * g.detach()
    return (prod.flatten(2).sum(2) if prod.dim() > 2 else prod).float().cpu()


def _to_units(group, consumers, producers, per_tensor) -> torch.Tensor:
    """(N, units of the group's root layer): what removing each unit takes out of the
    activations that read it (through flatten / pooling, by the group's index mapping)."""
    root = group[0].dep.target.module
    width = _units(group)
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


# name -> factory(aggregate) -> criterion with .scores(model, groups, task_losses);
# "grads": the criterion differentiates the calibration losses (`prune` needs task_losses).
IMPORTANCES = Registry("importance")
IMPORTANCES.register("l1")(lambda aggregate: _Magnitude(1))
IMPORTANCES.register("l2")(lambda aggregate: _Magnitude(2))
IMPORTANCES.register("taylor", needs=("grads",))(lambda aggregate: MultiTaskTaylor("mean", summed=True))
IMPORTANCES.register("multitask_taylor", needs=("grads",))(lambda aggregate: MultiTaskTaylor(aggregate))
NEEDS_GRADS = IMPORTANCES.needing("grads")


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


def weight_scores(model, layers, importance, task_losses, aggregate):
    """Per-weight importance for unstructured masks: |w| (l1 / l2), or per-task |w·∂L_t/∂w|
    normalised by each task's mean over all listed weights, then aggregated."""
    modules = dict(model.named_modules())
    weights = {n: getattr(modules[n], weight_name(modules[n])) for n in layers}
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
