"""Folding eval-mode BatchNorm into the conv / linear layer that feeds it.

An eval-mode BatchNorm is a per-channel affine map, so `norm(layer(x))` equals one layer with
scaled weights and a shifted bias: a deployment runs that and skips a pass over the
activations. The pairs come from the traced graph (`torch.fx.symbolic_trace` of the whole
model), so they are found wherever they sit: inside residual blocks, nested modules, a
ModuleList. A pair folds only when the graph proves it safe:

- the BatchNorm's one input is the output of a conv (Conv1d/2d/3d with BatchNorm1d/2d/3d)
  or a Linear (with BatchNorm1d over its features);
- that output feeds nothing else (a conv whose output is also added elsewhere keeps its
  BatchNorm), and each of the two modules is called once (shared modules stay);
- the BatchNorm uses running statistics (`track_running_stats`).

A BatchNorm after an add, a concat or a pooling stays. A model fx cannot trace (data-dependent
control flow, say) falls back to the pairs that are adjacent in an `nn.Sequential`, which are
safe by construction.
"""
from __future__ import annotations

from collections import Counter
from itertools import pairwise

import torch
from torch import nn

# layer type -> the BatchNorm type that normalises its output channels
_NORM_OF = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
            nn.Linear: nn.BatchNorm1d}


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, norm) module names of every pair `fold_batchnorms` folds, in forward order."""
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  untraceable Python in some forward: only what Sequentials prove
        return _sequential_pairs(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] == 1 and calls[node.target] == 1 and \
                _fits(modules[src.target], modules[node.target]):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every foldable pair of an eval-mode `model` in place (the norm becomes Identity);
    returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    pairs = foldable_pairs(model)
    for layer_name, norm_name in pairs:
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        fused = fuse_linear_bn_eval(layer, norm) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, norm)
        _replace(model, layer_name, fused)
        _replace(model, norm_name, nn.Identity())
    return len(pairs)


def _fits(layer, norm) -> bool:
    if type(norm) is not _NORM_OF.get(type(layer)) or not norm.track_running_stats or norm.running_mean is None:
        return False
    width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    return norm.num_features == width


def _sequential_pairs(model) -> list[tuple[str, str]]:
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq._modules.items())
        for (a, layer), (b, norm) in pairwise(children):
            if _fits(layer, norm):
                pairs.append((f"{name}.{a}".lstrip("."), f"{name}.{b}".lstrip(".")))
    return pairs


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = module
