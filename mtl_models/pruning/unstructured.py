"""The unstructured engine: masks through `torch.nn.utils.prune`, folded into the weights
when pruning ends (`without_masks` folds a copy while masks are live)."""
from __future__ import annotations

import torch
from torch.nn.utils import prune as torch_prune

from .allocation import cubic_schedule, global_counts
from . import attention
from .importance import weight_scores
from .layers import maskable_layers, weight_name


def _mask_lowest(scores, k):
    """A 0/1 mask with exactly the k lowest-scoring entries zeroed (ties broken by position)."""
    mask = torch.ones_like(scores)
    if k > 0:
        mask.view(-1)[scores.flatten().argsort(stable=True)[:k]] = 0.0
    return mask


def prune_unstructured(model, spec, sparsity, *, task_losses, after_step):
    """`spec`: the policy's Pruning section; `sparsity`: {layer: value} (each member of a group at its value)."""
    steps, global_sparsity = spec.steps, spec.global_sparsity
    modules = dict(model.named_modules())
    # MultiheadAttention reads `out_proj.weight` without calling `out_proj`, so a mask's hook
    # there never reran: the prunable form calls it (and recomputes in_proj_weight's mask).
    attention.to_prunable(model)
    layers = maskable_layers(model) if global_sparsity is not None else list(sparsity)
    masks = {}
    for step in range(1, steps + 1):
        model.eval()
        _make_masks_permanent(modules, layers)  # so `weight` is a Parameter again for scoring
        scores = weight_scores(model, layers, spec.importance, task_losses, spec.aggregate)
        # Once pruned, always pruned: earlier zeros rank below everything.
        scores = {n: s.masked_fill(masks[n] == 0, -1.0) if n in masks else s for n, s in scores.items()}
        if global_sparsity is not None:
            counts = global_counts(scores, cubic_schedule(global_sparsity, steps)[step])
        else:
            counts = {n: int(cubic_schedule(sparsity[n], steps)[step] * s.numel() + 1e-6) for n, s in scores.items()}
        for n, s in scores.items():
            masks[n] = _mask_lowest(s, counts[n])
            # custom_from_mask keeps the zeros in place through fine-tuning.
            torch_prune.custom_from_mask(modules[n], weight_name(modules[n]), masks[n])
        model.zero_grad(set_to_none=True)
        if after_step:
            after_step(step, model)
    _make_masks_permanent(modules, layers)
    attention.to_native(model)
    return model


def without_masks(model):
    """The model as it will be stored: a copy with the masks folded into the weights, or the
    model itself if it has no live masks. The original keeps its masks and its parameter
    objects (an optimizer holding them keeps working)."""
    import copy

    masked = {(m, name) for m in model.modules() for name in _masked_names(m)}
    if not masked:
        return model
    # A live mask makes the weight a computed (non-leaf) tensor, which deepcopy refuses: copy
    # with a detached stand-in, then fold the masks into the copy only.
    live = {(m, name): getattr(m, name) for m, name in masked}
    try:
        for (m, name), value in live.items():
            setattr(m, name, value.detach())
        clone = copy.deepcopy(model)
    finally:
        for (m, name), value in live.items():
            setattr(m, name, value)
    for m in clone.modules():
        for name in _masked_names(m):
            torch_prune.remove(m, name)
    return clone


def _masked_names(module) -> list[str]:
    """Tensors of `module` under a live `torch.nn.utils.prune` mask (`weight`, `in_proj_weight`)."""
    return [name[:-len("_mask")] for name, _ in module.named_buffers(recurse=False) if name.endswith("_mask")]


def _make_masks_permanent(modules, layers):
    for n in layers:
        for name in _masked_names(modules[n]):
            torch_prune.remove(modules[n], name)
