"""Coupled groups: the trunk layers whose output channels can only be pruned together.

A residual add ties the channels of every layer feeding it (the block's last conv, the
downsample branch, the previous block's output); a depthwise conv (`groups == channels`)
ties its channels to the layer before it. torch-pruning's dependency graph finds these
couplings (`get_pruning_group`): the layers in one group are the prunable layers whose
`prune_out_channels` it lists. A search decides one sparsity per group, so the policy keys
`pruning.sparsity` by group: a group's name is its first member in forward order (a plain
MLP / CNN has one group per layer, named by that layer, so its policies read as before).

Keys are matched by name only, never by position: a policy read back from a file with
sorted keys (Ray's params.json) decides exactly the same pruning.
"""
from __future__ import annotations

import torch

from spaces.errors import PrunefuseError

from mtl_models.training.modes import eval_mode, hooked_forward

from .attention import dependency_graph, head_groups
from .layers import PRUNABLE_TYPES, prunable_layers, width
from .bounded import RunawayGroup
from .probe import found, probed, unprunable_groups


def coupled_groups(model, example_inputs: torch.Tensor) -> dict[str, tuple[str, ...]]:
    """Group name -> its members (prunable trunk layers, in forward order), groups in forward
    order. A group that also holds a head's output layer is left out: heads are never pruned;
    so is a group whose pruning torch-pruning gets wrong (`probe.unprunable_groups`)."""
    order = _forward_order(model, example_inputs)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    with eval_mode(model):
        graph = dependency_graph(model, example_inputs)
    seen, out, runaway = set(), {}, {}
    for name in order:
        if name in seen:
            continue
        module = modules[name]
        if module not in graph.module2node:
            seen.add(name)  # never run in the forward: nothing to prune it with
            continue
        pruner = graph.get_pruner_of_module(module)
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(width(module))))
        except RunawayGroup as exc:  # left unpruned, said with the probe's findings
            runaway[name] = str(exc)
            seen.add(name)
            continue
        members = {names[item.dep.target.module] for item in group.items
                   if isinstance(item.dep.target.module, PRUNABLE_TYPES)
                   and getattr(item.dep.handler, "__name__", "") == "prune_out_channels"} | {name}
        seen |= members
        if all(m.startswith("trunk.") for m in members):
            out[name] = tuple(m for m in order if m in members)
    out.update(head_groups(model))  # each attention module's heads: one decision
    left = unprunable_groups(model, example_inputs, out, known=runaway)  # layouts torch-pruning gets wrong: kept whole
    return {g: members for g, members in out.items() if g not in left}


def left_unpruned(model, example_inputs: torch.Tensor) -> dict[str, str]:
    """The coupled groups of `model` that torch-pruning cannot prune, left out of
    `coupled_groups` (so never pruned): group name -> why (`probe.describe` makes it a line).
    Probed once per layout and process: every later call only reads the answer."""
    if not probed(model, example_inputs):
        coupled_groups(model, example_inputs)
    return found(model, example_inputs)


def decided_sparsity(groups: dict[str, tuple[str, ...]], sparsity: dict, layers: list[str],
                     left: dict[str, str] | None = None) -> dict[str, float]:
    """The policy's `pruning.sparsity` as {group name: sparsity}, groups in forward order.

    A key is a group's name or one of its members; all the values given for one group must
    agree (its channels go together, so one value decides it). Anything else is refused:
    a key that is no layer of the model, or a layer that decides nothing (a group coupled to
    a head's outputs, or one of `left`: the groups torch-pruning cannot prune, name -> why)."""
    owner = {m: g for g, members in groups.items() for m in members}
    owner.update({g: g for g in groups})  # an attention module's heads: named by the module, not a member
    given: dict[str, dict[str, float]] = {}
    for key in sorted(sparsity):
        if key not in owner:
            if key in (left or {}):
                raise PrunefuseError(f"policy prunes {key!r}, a coupled group torch-pruning cannot prune in this model "
                                     f"(left unpruned): {left[key]}")
            if key in layers:
                raise PrunefuseError(f"policy prunes layer {key!r}, whose channels cannot be pruned (they are "
                                     f"coupled to a head's outputs, or torch-pruning cannot prune their group); its coupled groups (one sparsity each): {', '.join(groups)}")
            raise PrunefuseError(f"policy prunes layer {key!r}, which this model does not have; "
                                 f"its coupled groups (one sparsity each): {', '.join(groups)}")
        given.setdefault(owner[key], {})[key] = sparsity[key]
    out = {}
    for name in groups:
        if name not in given:
            continue
        values = given[name]
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{k}={v}" for k, v in values.items())
            raise PrunefuseError(f"policy gives the coupled group {name!r} different sparsities ({listed}); "
                                 f"its members {', '.join(groups[name])} are pruned together: give one value, "
                                 f"keyed {name!r}")
        out[name] = next(iter(values.values()))
    return out


def _forward_order(model, example_inputs) -> list[str]:
    """Prunable trunk layers in the order the forward first calls them (then any never called)."""
    layers = prunable_layers(model)
    modules = dict(model.named_modules())
    order: list[str] = []
    hooks = [modules[n].register_forward_pre_hook(lambda m, i, n=n: order.append(n) if n not in order else None)
             for n in layers]
    hooked_forward(model, example_inputs, hooks)
    return order + [n for n in layers if n not in order]
