"""The structured engine: whole units removed through torch-pruning's dependency graph, so
coupled layers, BatchNorms, the next layers' inputs and the heads' in-features shrink with them."""
from __future__ import annotations

import math

import torch
from torch import nn

from spaces.errors import PrunefuseError

from . import attention
from .attributes import sync_widths
from .allocation import allocate_global, cubic_schedule, kept_units, round_units
from .importance import IMPORTANCES
from .layers import width as _width


class GroupPruningError(PrunefuseError):
    """Structured pruning of one coupled group failed; `group` names it."""

    def __init__(self, group: str, message: str):
        super().__init__(message)
        self.group = group


def prune_structured(model, spec, sparsity, groups, *, example_inputs, task_losses, after_step):
    """`spec`: the policy's Pruning section; `sparsity`: {group name: value}; `groups`:
    `coupled_groups(model)`. Each group is pruned through its first member (its name):
    torch-pruning removes the same channels from every member and from every layer that reads them."""
    steps, global_sparsity, round_to = spec.steps, spec.global_sparsity, spec.round_to
    modules = dict(model.named_modules())
    attention.to_prunable(model)  # MultiheadAttention that survives losing heads / residual channels
    # Forward order, never the policy's key order: the same policy prunes the same way.
    listed = [n for n in groups if global_sparsity is not None or n in sparsity]
    initial = {n: _width(modules[n]) for n in listed}
    criterion = IMPORTANCES[spec.importance](spec.aggregate)
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
    attention.to_native(model)
    return model


def _structured_round(model, modules, listed, initial, criterion, example_inputs, task_losses, fractions,
                      global_fraction, round_to=1):
    model.eval()
    current = {n: _width(modules[n]) for n in listed}
    targets = None if fractions is None else {n: kept_units(initial[n], fractions[n], round_to) for n in listed}
    todo = listed if targets is None else [n for n in listed if targets[n] < current[n]]
    if not todo:
        return
    graph = attention.dependency_graph(model, example_inputs)
    sites = attention.sites(model)  # attention modules: their units are heads
    groups = {n: attention.full_group(graph, model, sites[n]) if n in sites else _full_group(graph, modules[n], current[n])
              for n in todo}
    scores = criterion.scores(model, groups, task_losses)
    scores = {n: attention.head_scores(model, sites[n], s) if n in sites else s for n, s in scores.items()}
    if targets is None:
        targets = allocate_global(scores, {n: current[n] for n in groups}, {n: initial[n] for n in groups},
                                   global_fraction)
        targets = {n: min(current[n], round_units(k, initial[n], round_to)) for n, k in targets.items()}
    targets = {n: _divisible(targets[n], current[n], _channel_multiple(groups[n])) if n not in sites else targets[n]
               for n in groups}
    changed = False
    for name, s in scores.items():
        n_drop = _width(modules[name]) - targets[name]
        if n_drop <= 0 or _width(modules[name]) != len(s):
            continue  # nothing to do, or already resized through a coupled layer
        drop = _lowest(s, n_drop, 1 if name in sites else _conv_channel_groups(groups[name]))
        try:
            if name in sites:
                attention.prune_heads(graph, model, sites[name], drop)
                changed = True
                continue
            group = graph.get_pruning_group(modules[name], _out_fn(graph, modules[name]), sorted(drop))
            if not graph.check_pruning_group(group):
                raise GroupPruningError(name, f"structured pruning of the coupled group {name!r} cannot remove "
                                              f"{n_drop} channels: {_too_narrow(graph, group)}")
            group.prune()
            changed = True
        except PrunefuseError:
            raise
        except Exception as exc:  # torch-pruning's own errors say nothing of where
            raise GroupPruningError(name, f"structured pruning of the coupled group {name!r} failed: "
                                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    if changed:
        sync_widths(model)  # width attributes library forwards read (torchvision ViT's hidden_dim)
    if changed and task_losses is not None:
        recalibrate_batchnorm(model, task_losses)


def _channel_multiple(group) -> int:
    """What a group's kept channels must be a multiple of: each GroupNorm's number of groups
    and each grouped (not depthwise) conv's groups, that read or write these channels."""
    multiple = _conv_channel_groups(group)
    for item in getattr(group, "items", []):
        if isinstance(item.dep.target.module, nn.GroupNorm):
            multiple = math.lcm(multiple, item.dep.target.module.num_groups)
    return multiple


def _conv_channel_groups(group) -> int:
    """How many channel groups a group's channels fall into at the grouped (not depthwise)
    convs that read or write them: the lcm of their `groups` (1: none)."""
    multiple = 1
    for item in getattr(group, "items", []):
        module = item.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups < module.in_channels:
            multiple = math.lcm(multiple, module.groups)
    return multiple


def _lowest(scores: torch.Tensor, n_drop: int, channel_groups: int = 1) -> list[int]:
    """The `n_drop` lowest-scoring units. Where the channels feed or leave a grouped conv
    (`channel_groups` > 1), the same offsets go in every channel group: torch-pruning cuts a
    grouped conv's input weights by keeping the first kept/groups offsets (`ConvPruner.
    prune_in_channels`), right only when each group loses the same offsets (else an index out
    of range, RegNet's "INDICES element is out of DATA bounds", or silently wrong weights), and
    a grouped conv's output rows stay aligned with its groups only then."""
    width = len(scores)
    if channel_groups <= 1 or width % channel_groups or n_drop % channel_groups:
        return torch.sort(scores, stable=True).indices[:n_drop].tolist()
    period = width // channel_groups
    offsets = torch.sort(scores.view(channel_groups, period).sum(0), stable=True).indices[:n_drop // channel_groups]
    return sorted(g * period + int(j) for g in range(channel_groups) for j in offsets)


def _divisible(kept: int, width: int, multiple: int) -> int:
    """`kept` made a multiple of `multiple`; a width no larger than it cannot be cut at all."""
    if multiple <= 1 or kept % multiple == 0:
        return kept
    return width if width <= multiple else min(width, round_units(kept, width, multiple))


def _too_narrow(graph, group) -> str:
    """The member of a group that torch-pruning refuses to prune (it would lose every channel
    it has along the pruned axis), named as the model names it."""
    names = {id(m): n for n, m in [*graph.model.named_modules(), *graph.model.named_parameters()]}
    for dep, idxs in group:
        module = dep.target.module
        for side, is_side, count in (("output", graph.is_out_channel_pruning_fn, graph.get_out_channels),
                                     ("input", graph.is_in_channel_pruning_fn, graph.get_in_channels)):
            have = count(module) if is_side(dep.handler) else None
            if have is not None and have <= len(idxs):
                shape = tuple(module.shape) if isinstance(module, torch.Tensor) else type(module).__name__
                return f"{names.get(id(module), '?')} ({shape}) has only {have} {side} channels there"
    return "torch-pruning refused the group"


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
