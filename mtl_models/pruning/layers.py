"""What the pruning engines may cut: the trunk's Linear / Conv2d layers."""
from __future__ import annotations

from torch import nn

PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


def prunable_layers(model) -> list[str]:
    """Names (`trunk.fc1`, `trunk.conv2`) of the trunk's Linear / Conv2d layers, in forward order."""
    return [f"trunk.{name}" for name, m in model.trunk.named_modules() if isinstance(m, PRUNABLE_TYPES)]


def width(module) -> int:
    """Units (output features / channels) of a prunable layer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels
