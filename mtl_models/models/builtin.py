"""The built-in trunks, one registered function each in `TRUNKS`: `fn(suite, *, options)`
returns (trunk module, feature width). A function's keyword-only arguments are the options a
policy's `model` may give (`--model-option KEY=VALUE`), with their defaults.

Trunk layers have names (`trunk.fc1`, `trunk.conv2`) because a policy's per-layer sparsity is
keyed by them.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from spaces.errors import PrunefuseError
from spaces.registry import Registry

TRUNKS = Registry("trunk")


def mlp_trunk(in_features: int, *, width: int, depth: int) -> tuple[nn.Module, int]:
    layers = [("flatten", nn.Flatten())]
    for i in range(1, depth + 1):
        layers += [(f"fc{i}", nn.Linear(in_features if i == 1 else width, width)), (f"relu{i}", nn.ReLU())]
    return nn.Sequential(OrderedDict(layers)), width


def cnn_trunk(input_shape, *, channels, fc: int) -> tuple[nn.Module, int]:
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


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViTTrunk(nn.Module):
    """A small ViT: patch-embedding conv, cls token, learned position embedding, pre-norm
    blocks, final LayerNorm; the trunk's output is the cls token's features."""

    def __init__(self, input_shape, *, dim: int, depth: int, heads: int, mlp: int, patch: int):
        super().__init__()
        channels, height, width = input_shape
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        tokens = (height // patch) * (width // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)            # (B, tokens, dim)
        # x.shape[0], not len(x): the ONNX exporter's tracer records len() as a constant batch size
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x)[:, 0])


class TokenTrunk(nn.Module):
    """Token ids (B, length) -> nn.Embedding + learned positions -> nn.TransformerEncoder
    (batch_first, pre-norm) -> mean over tokens -> LayerNorm."""

    def __init__(self, vocab: int, length: int, *, dim: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        # On the scale of nn.Embedding's N(0, 1) rows: positions matter from the first step.
        self.pos_embed = nn.Parameter(torch.randn(1, length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        x = self.embed(tokens.long()) + self.pos_embed[:, :tokens.shape[1]]
        return self.norm(self.encoder(x).mean(dim=1))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3×3 conv-bn, a residual add, a 1×1 conv-bn
    `downsample` branch when the stride or the width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet_trunk(input_shape, *, channels, blocks: int) -> tuple[nn.Module, int]:
    """A small ResNet: 3×3 stem conv-bn-relu, one stage of `blocks` BasicBlocks per width
    (stride 2 from the second stage on, while the image is at least 2 px), global average pool."""
    side = input_shape[1]
    layers = [("conv1", nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False)),
              ("bn1", nn.BatchNorm2d(channels[0])), ("relu", nn.ReLU())]
    c_in = channels[0]
    for i, c_out in enumerate(channels, start=1):
        stride = 2 if i > 1 and side >= 2 else 1
        side //= stride
        stage = [BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1) for b in range(blocks)]
        layers.append((f"layer{i}", nn.Sequential(*stage)))
        c_in = c_out
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return nn.Sequential(OrderedDict(layers)), c_in


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand conv-bn-relu6, depthwise 3×3 (groups = channels)
    conv-bn-relu6, 1×1 project conv-bn; a residual add when input and output shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_trunk(input_shape, *, channels, expand: int) -> tuple[nn.Module, int]:
    """A small MobileNetV2: 3×3 stem conv-bn-relu6, one inverted residual per entry of
    `channels` (stride 2 where the width grows, while the image is at least 2 px), global
    average pool. The stem is as wide as the first block."""
    side = input_shape[1]
    layers = [("stem", nn.Sequential(nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False),
                                     nn.BatchNorm2d(channels[0]), nn.ReLU6()))]
    c_in = channels[0]
    for i, c_out in enumerate(channels, start=1):
        stride = 2 if c_out != c_in and side >= 2 else 1
        side //= stride
        layers.append((f"block{i}", InvertedResidual(c_in, c_out, stride, expand)))
        c_in = c_out
    layers += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return nn.Sequential(OrderedDict(layers)), c_in


def cnn_feature_trunk(input_shape, *, channels=(16, 32, 64)) -> tuple[nn.Module, int]:
    """The CNN trunk for dense tasks: conv-bn-relu blocks with a 2×2 max-pool before every block
    but the first, no fc; it returns the feature map (n, channels[-1], H / 2^(k-1), W / 2^(k-1)).
    Narrower by default than the per-image CNN: its first convolutions run at full resolution."""
    layers, c_in, side = [], input_shape[0], min(input_shape[1:])
    for i, c_out in enumerate(channels, start=1):
        if i > 1 and side >= 2:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
            side //= 2
        layers += [(f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(c_out)), (f"relu{i}", nn.ReLU())]
        c_in = c_out
    return nn.Sequential(OrderedDict(layers)), c_in


def _image_shape(suite, trunk: str) -> tuple[int, int, int]:
    if len(suite.input_shape) != 3:
        raise PrunefuseError(f"trunk {trunk!r} needs image inputs (C, H, W); suite {suite.name!r} has "
                             f"{suite.input_shape}")
    return tuple(suite.input_shape)


@TRUNKS.register("mlp")
def mlp(suite, *, width: int = 256, depth: int = 3) -> tuple[nn.Module, int]:
    return mlp_trunk(math.prod(suite.input_shape), width=width, depth=depth)


@TRUNKS.register("cnn")
def cnn(suite, *, channels=(32, 64, 128), fc: int = 128) -> tuple[nn.Module, int]:
    return cnn_trunk(_image_shape(suite, "cnn"), channels=tuple(channels), fc=fc)


@TRUNKS.register("resnet")
def resnet(suite, *, channels=(8, 16, 32), blocks: int = 1) -> tuple[nn.Module, int]:
    return resnet_trunk(_image_shape(suite, "resnet"), channels=tuple(channels), blocks=blocks)


@TRUNKS.register("mobilenet")
def mobilenet(suite, *, channels=(8, 16, 16, 24), expand: int = 4) -> tuple[nn.Module, int]:
    return mobilenet_trunk(_image_shape(suite, "mobilenet"), channels=tuple(channels), expand=expand)


@TRUNKS.register("vit")
def vit(suite, *, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128, patch: int = 2) -> tuple[nn.Module, int]:
    shape = _image_shape(suite, "vit")
    _divisible_heads("vit", dim, heads)
    if patch > min(shape[1:]):
        raise PrunefuseError(f"trunk 'vit': patch={patch} is larger than the images {shape[1:]}")
    return ViTTrunk(shape, dim=dim, depth=depth, heads=heads, mlp=mlp, patch=patch), dim


@TRUNKS.register("transformer")
def transformer(suite, *, dim: int = 64, depth: int = 2, heads: int = 4, mlp: int = 128) -> tuple[nn.Module, int]:
    """The vocabulary is read off the data (the largest token id in any split, plus one)."""
    _divisible_heads("transformer", dim, heads)
    vocab = token_vocab(suite)
    if vocab is None:
        x = getattr(suite.train, "x", None)  # a split read in batches has none
        raise PrunefuseError(f"trunk 'transformer' needs token ids (int64 rows of shape (length,)); suite "
                             f"{suite.name!r} has {x.dtype if x is not None else 'batched'} rows of shape {suite.input_shape}")
    return TokenTrunk(vocab, suite.input_shape[0], dim=dim, depth=depth, heads=heads, mlp=mlp), dim


def _divisible_heads(trunk: str, dim: int, heads: int) -> None:
    if dim % heads:
        raise PrunefuseError(f"trunk {trunk!r}: dim={dim} is not divisible by heads={heads}")


def token_vocab(suite) -> int | None:
    """For a suite of token ids (int rows of shape (length,)): the largest id in any split + 1;
    None for any other suite."""
    # Token ids are read off splits held in memory (a split read in batches, as images are, has no `x`).
    splits = [getattr(suite.split(s), "x", None) for s in ("train", "val", "test")]
    if len(suite.input_shape) != 1 or any(x is None or x.is_floating_point() or x.is_complex() for x in splits):
        return None
    return int(max(int(x.max()) for x in splits)) + 1
