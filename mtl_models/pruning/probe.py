"""Coupled groups that torch-pruning cannot prune in this model: found by trying, left unpruned.

torch-pruning's graph does not model every layout the libraries use: Swin's `PatchMerging`
(a 6-d reshape and permute of the residual channels), RegNet's grouped convs (an index out of
range inside `Group.prune`), ReXNet's residual add onto a channel slice (`x[:, :C] += s`),
MixNet's MixConv (`split_with_sizes` with fixed sizes). Pruning such a group fails, or leaves
a forward that fails. Refusing the whole model for one such group would lose every other
group, so each group that fails is left out of the decisions (never pruned), and the rest of
the model is pruned as usual.

`unprunable_groups` finds them on a copy of the model: all groups pruned together at
PROBE_SPARSITY, then a forward pass. A failure inside `Group.prune` names its group: it is
left out and the rest tried again; a forward that fails after all of them were pruned is
traced to its groups by pruning each alone (or, where only a combination fails, by
adding them one by one). A model that prunes cleanly costs one try. The
answer is kept per model layout (module types and tensor shapes), so the many calls of
`coupled_groups` in a search or a trial probe once.
"""
from __future__ import annotations

import copy

import torch

from spaces.policy import Pruning

from mtl_models.training.modes import eval_mode

from .structured import GroupPruningError, prune_structured

PROBE_SPARSITY = 0.5
_FOUND: dict[tuple, dict[str, str]] = {}  # layout fingerprint -> {group: why}


def unprunable_groups(model, example_inputs: torch.Tensor, groups: dict[str, tuple[str, ...]], *,
                      known: dict[str, str] | None = None) -> dict[str, str]:
    """{group name: why} for the groups of `groups` that cannot be pruned in `model` (whose
    pruning, or whose pruned forward, fails). The model is untouched. `known`: groups found
    unprunable already (whose search did not end), kept with the findings."""
    key = _fingerprint(model, example_inputs)
    if key not in _FOUND:
        _FOUND[key] = {**(known or {}), **_probe(model, example_inputs, groups)}
    return {g: why for g, why in _FOUND[key].items() if g in groups}


def probed(model, example_inputs) -> bool:
    """Whether this model's layout was probed in this process (`found` then has the answer)."""
    return _fingerprint(model, example_inputs) in _FOUND


def found(model, example_inputs) -> dict[str, str]:
    """What the last probe of this model's layout found ({} if it was not probed)."""
    return dict(_FOUND.get(_fingerprint(model, example_inputs), {}))


def describe(left: dict[str, str]) -> str | None:
    """One line naming the groups left unpruned and why (None: none)."""
    if not left:
        return None
    return (f"torch-pruning cannot prune {len(left)} coupled group(s) of this model, left unpruned: "
            + "; ".join(f"{g} ({why})" for g, why in left.items()))


def _probe(model, example_inputs, groups) -> dict[str, str]:
    bad: dict[str, str] = {}
    while True:
        todo = {g: m for g, m in groups.items() if g not in bad}
        failed = _try(model, example_inputs, todo) if todo else None
        if failed is None:
            return bad
        group, reason = failed
        if group is not None:
            bad[group] = reason
            continue
        # The pruned forward fails: which groups break it, each pruned alone.
        alone = {g: r[1] for g in todo if (r := _try(model, example_inputs, {g: todo[g]})) is not None}
        if alone:
            bad.update(alone)
            continue
        # Only a combination breaks it: add the groups one by one, in forward order.
        kept: dict[str, tuple[str, ...]] = {}
        for g, members in todo.items():
            failed = _try(model, example_inputs, {**kept, g: members})
            if failed is None:
                kept[g] = members
            else:
                bad[g] = f"pruned with the groups before it: {failed[1]}"
        return bad


def _try(model, example_inputs, groups) -> tuple[str | None, str] | None:
    """None when pruning `groups` (on a copy) and a forward pass work; else (the group whose
    pruning failed, or None for a failed forward, why in a few words)."""
    trial = copy.deepcopy(model)
    try:
        with eval_mode(trial):
            prune_structured(trial, Pruning(sparsity={g: PROBE_SPARSITY for g in groups}), {g: PROBE_SPARSITY for g in groups},
                             groups, example_inputs=example_inputs, task_losses=None, after_step=None)
    except GroupPruningError as exc:
        return exc.group, _short(exc.__cause__ or exc)
    except Exception as exc:  # noqa: BLE001 - any failure: the group set cannot be pruned
        return None, _short(exc)
    try:
        with eval_mode(trial), torch.no_grad():
            trial(example_inputs)
    except Exception as exc:  # noqa: BLE001
        return None, f"the pruned forward fails: {_short(exc)}"
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return text if isinstance(exc, GroupPruningError) else f"{type(exc).__name__}: {text}"


def _fingerprint(model, example_inputs) -> tuple:
    return (tuple(type(m).__qualname__ for m in model.modules()),
            tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()),
            tuple(example_inputs.shape[1:]), example_inputs.dtype)
