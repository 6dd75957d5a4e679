"""Plugin suites whose trunks have coupled channels, written the ways people write them.

- `make_resnet`: torchvision's ResNet layout (`BasicBlock` with a `downsample` 1×1 conv + BN
  branch, `layer1..layer3`, `avgpool`), small widths.
- `make_mobilenet`: torchvision's MobileNetV2 layout (`ConvBNReLU` as an `nn.Sequential`
  subclass, `InvertedResidual` with `self.conv`, `use_res_connect`, a `features` Sequential).
- `make_broken`: a CNN whose forward multiplies a conv's output by a buffer of a hard-coded
  width, which pruning cannot resize: the search's pruning check must fail before training.

All on a small `multidigits`: `prunefuse search --suite tests.plugins.coupled_suites:make_resnet`.
"""
from __future__ import annotations

import torch
from torch import nn

from mtl_models.models import MTLModel
from mtl_models.suites import get


# --- torchvision-style ResNet ---

def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, in_channels=1, widths=(8, 16, 32), layers=(2, 1, 1)):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


# --- torchvision-style MobileNetV2 ---

class ConvBNReLU(nn.Sequential):
    def __init__(self, in_planes, out_planes, kernel_size=3, stride=1, groups=1):
        padding = (kernel_size - 1) // 2
        super().__init__(nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend([ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                       nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)])
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (blocks), s (stride), as in torchvision
    setting = [[1, 8, 1, 1], [4, 16, 2, 2], [4, 24, 1, 2]]

    def __init__(self, in_channels=1, last_channel=32):
        super().__init__()
        input_channel = 8
        features = [ConvBNReLU(in_channels, input_channel, stride=1)]
        for t, c, n, s in self.setting:
            for i in range(n):
                features.append(InvertedResidual(input_channel, c, s if i == 0 else 1, expand_ratio=t))
                input_channel = c
        features.append(ConvBNReLU(input_channel, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.last_channel = last_channel

    def forward(self, x):
        x = self.features(x)
        return nn.functional.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


# --- a model that pruning breaks ---

class ChannelScale(nn.Module):
    """Scales each channel by a fixed factor kept in a buffer (torch-pruning resizes
    parameters it sees, not buffers), so the buffer stops fitting once the conv is pruned."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, channels).view(1, channels, 1, 1))

    def forward(self, x):
        return x * self.scale


class Broken(nn.Module):
    def __init__(self, in_channels=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.scale = ChannelScale(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.conv2(self.scale(torch.relu(self.conv1(x)))))).flatten(1)


# --- the suites ---

class Factory:
    """model_factory(suite, trunk=..., **spec): a class, so the suite pickles into Ray tasks."""

    def __init__(self, layout: str):
        self.layout = layout

    def __call__(self, suite, trunk: str = "mlp"):
        c = suite.input_shape[0]
        body, width = {"resnet": (lambda: (ResNet(c), 32)), "mobilenet": (lambda: (MobileNetV2(c), 32)),
                       "broken": (lambda: (Broken(c), 16))}[self.layout]()
        return MTLModel(body, {t.name: nn.Linear(width, t.num_outputs) for t in suite.tasks})


def _suite(layout, seed, train_pairs, val_pairs, test_pairs):
    suite = get("multidigits", seed=seed, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    suite.options = dict(seed=seed, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    suite.model_factory = Factory(layout)
    return suite


def make_resnet(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _suite("resnet", seed, train_pairs, val_pairs, test_pairs)


def make_mobilenet(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _suite("mobilenet", seed, train_pairs, val_pairs, test_pairs)


def make_broken(*, seed: int = 0, train_pairs: int = 1500, val_pairs: int = 300, test_pairs: int = 300):
    return _suite("broken", seed, train_pairs, val_pairs, test_pairs)
