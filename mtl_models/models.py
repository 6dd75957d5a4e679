"""The multi-task model: a shared `trunk` and one head per task.

The contract user models follow too: `model.trunk` (shared), `model.heads`
(`nn.ModuleDict`, task name -> module), `forward(x) -> dict[task, Tensor]`.
Trunk layers have names (`trunk.fc1`, `trunk.conv2`) because a policy's per-layer
sparsity is keyed by them.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from spaces.errors import PrunefuseError, unknown_name


class MTLModel(nn.Module):
    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(x)
        return {task: head(shared) for task, head in self.heads.items()}


def mlp_trunk(in_features: int, *, width: int = 256, depth: int = 3) -> tuple[nn.Module, int]:
    layers = [("flatten", nn.Flatten())]
    for i in range(1, depth + 1):
        layers += [(f"fc{i}", nn.Linear(in_features if i == 1 else width, width)), (f"relu{i}", nn.ReLU())]
    return nn.Sequential(OrderedDict(layers)), width


def cnn_trunk(input_shape, *, channels=(32, 64, 128), fc: int = 128) -> tuple[nn.Module, int]:
    """conv-bn-relu blocks, 2×2 max-pool after every block but the first, then one fc layer."""
    layers, c_in = [], input_shape[0]
    side = input_shape[1]
    for i, c_out in enumerate(channels, start=1):
        layers += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(c_out)), (f"relu{i}", nn.ReLU())]
        if i > 1 and side >= 2:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
            side //= 2
        c_in = c_out
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(c_in * side * side, fc)), ("relu_fc", nn.ReLU())]
    return nn.Sequential(OrderedDict(layers)), fc


TRUNKS = {"mlp": ("width", "depth"), "cnn": ("channels", "fc")}


def _checked_size(trunk: str, key: str, value):
    """Widths, depth, channels: whole numbers >= 1 (a list of them for channels)."""
    from spaces.knobs import coerce_number

    if key == "channels":
        if not isinstance(value, (list, tuple)) or not value:
            raise PrunefuseError(f"trunk {trunk!r} channels={value!r}: expected a list such as [32, 64, 128]")
        return [coerce_number(f"trunk {trunk!r}", "channels", c, int, low=1) for c in value]
    return coerce_number(f"trunk {trunk!r}", key, value, int, low=1)


def build_model(suite, *, trunk: str = "mlp", **spec) -> MTLModel:
    """A fresh MTLModel for `suite`; `spec` holds the trunk's own options (width, depth / channels, fc)."""
    if trunk not in TRUNKS:
        raise unknown_name("trunk", trunk, TRUNKS)
    for key in spec:
        if key not in TRUNKS[trunk]:
            raise PrunefuseError(f"trunk {trunk!r} has no option {key!r}; valid options: {', '.join(TRUNKS[trunk])}")
    spec = {k: _checked_size(trunk, k, v) for k, v in spec.items()}
    if trunk == "mlp":
        in_features = 1
        for d in suite.input_shape:
            in_features *= d
        body, out = mlp_trunk(in_features, **spec)
    else:
        if len(suite.input_shape) != 3:
            raise PrunefuseError(f"trunk 'cnn' needs image inputs (C, H, W); suite {suite.name!r} has {suite.input_shape}")
        if "channels" in spec:
            spec = {**spec, "channels": tuple(spec["channels"])}
        body, out = cnn_trunk(suite.input_shape, **spec)
    heads = {t.name: nn.Linear(out, t.num_outputs) for t in suite.tasks}
    return MTLModel(body, heads)
