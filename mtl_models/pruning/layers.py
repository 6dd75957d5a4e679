"""What the pruning engines may cut: the trunk's Linear / Conv2d layers."""
from __future__ import annotations

from torch import nn

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


def prunable_layers(model) -> list[str]:
    """Names (`trunk.fc1`, `trunk.conv2`) of the trunk's Linear / Conv2d layers, in forward order,
    but those an attention module decides (its q/k/v, MultiheadAttention's `out_proj`: the
    module's heads are one decision, `attention.sites`) or keeps (`attention.unsupported`)."""
    from .attention import hidden_layers

    hidden = hidden_layers(model)
    return [f"trunk.{name}" for name, m in model.trunk.named_modules()
            if isinstance(m, PRUNABLE_TYPES) and f"trunk.{name}" not in hidden]


def maskable_layers(model) -> list[str]:
    """What unstructured masks may cover: every trunk Linear / Conv2d and MultiheadAttention
    (its `in_proj_weight`), attention modules prunefuse cannot prune by heads included."""
    return [f"trunk.{name}" for name, m in model.trunk.named_modules()
            if isinstance(m, (*PRUNABLE_TYPES, nn.MultiheadAttention))]


def weight_name(module) -> str:
    """The tensor an unstructured mask covers: `weight`, or a MultiheadAttention's q/k/v rows."""
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def width(module) -> int:
    """Units of a decision: output features / channels of a layer, heads of an attention module."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    from .attention import heads_of

    return heads_of(module)
