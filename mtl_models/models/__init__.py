"""The multi-task model: a shared `trunk` and one head per task.

The contract user models follow too: `model.trunk` (shared), `model.heads`
(`nn.ModuleDict`, task name -> module), `forward(x) -> dict[task, Tensor]`.
Trunk layers have names (`trunk.fc1`, `trunk.conv2`) because a policy's per-layer
sparsity is keyed by them.

Trunks by name (`build_model(suite, trunk=NAME, **options)`, a policy's `model`):
  built-in   `TRUNKS` (mlp, cnn, resnet, mobilenet, vit, transformer; `models.builtin`)
  libraries  "timm:NAME", "torchvision:NAME", "hf:MODEL_TYPE" (`LIBRARIES`; `models.library`),
             the library's own classes with random weights; `library_trunk` builds one alone.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from spaces.errors import PrunefuseError, unknown_name

from .builtin import TRUNKS, cnn_feature_trunk, token_vocab
from .library import LIBRARIES, LibraryTrunk, is_library_trunk, library_trunk, split_name
from .versions import with_versions

__all__ = ["LIBRARIES", "TRUNKS", "LibraryTrunk", "MTLModel", "build_model", "dense_head", "is_library_trunk",
           "library_trunk", "pooled_head", "token_vocab"]


class MTLModel(nn.Module):
    def __init__(self, trunk: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(x)
        return {task: head(shared) for task, head in self.heads.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A plain dict of tensors (cached base, merged experts, a checkpoint) carries no module
        # versions; a library module that checks its own (torchvision's MNASNet) needs them.
        return super().load_state_dict(with_versions(self, state_dict), strict=strict, assign=assign)


def dense_head(c_in: int, num_outputs: int, size: tuple[int, int], *, hidden: int = 32) -> nn.Module:
    """A light decoder: conv 3×3 + BN + ReLU on the trunk's map, bilinear upsampling to the
    input's size, a 1×1 conv to the task's channels (class logits, depth, a normal)."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(c_in, hidden, 3, padding=1, bias=False)), ("bn", nn.BatchNorm2d(hidden)),
        ("relu", nn.ReLU()), ("up", nn.Upsample(size=tuple(size), mode="bilinear", align_corners=False)),
        ("out", nn.Conv2d(hidden, num_outputs, 1))]))


def pooled_head(c_in: int, num_outputs: int) -> nn.Module:
    """A per-image task on a feature map: global average pool, then a linear layer."""
    return nn.Sequential(OrderedDict([("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                                      ("out", nn.Linear(c_in, num_outputs))]))


def _dense_outputs(task) -> int:
    return {"depth": 1, "normals": 3}.get(task.kind, task.num_outputs)


def build_dense_model(suite, *, trunk: str, spec: dict) -> MTLModel:
    """Dense mode (a suite with segmentation / depth / normals tasks): the trunk returns its
    feature map; each dense task gets a `dense_head`, every other task a `pooled_head`.
    Structured pruning keeps each head's input channels in step with the trunk's output,
    because the heads are part of the model torch-pruning traces."""
    from spaces.vocabulary import DENSE_KINDS

    conv_trunks = ("cnn", "resnet", "mobilenet")
    if trunk not in conv_trunks or len(suite.input_shape) != 3:
        raise PrunefuseError(f"suite {suite.name!r} has dense tasks (segmentation / depth / normals): use "
                             f"--trunk {' | '.join(conv_trunks)}, whose feature map the built-in decoder heads upsample")
    if "fc" in spec:
        raise PrunefuseError("trunk 'cnn' on dense tasks has no fc layer (the heads read its feature map); "
                             "leave out fc")
    if trunk == "cnn":
        body, c_out = cnn_feature_trunk(suite.input_shape, **spec)
    else:  # the residual trunks without their global pool: the last stage's map
        body, c_out = TRUNKS[trunk](suite, **spec)
        body = nn.Sequential(OrderedDict((n, m) for n, m in body.named_children() if n not in ("avgpool", "flatten")))
    size = tuple(suite.input_shape[1:])
    heads = {t.name: dense_head(c_out, _dense_outputs(t), size) if t.kind in DENSE_KINDS else pooled_head(c_out, t.num_outputs)
             for t in suite.tasks}
    return MTLModel(body, heads)


def build_model(suite, *, trunk: str = "mlp", **spec) -> MTLModel:
    """A fresh MTLModel for `suite`: the trunk `trunk` (a built-in name or LIBRARY:NAME) with
    its options `spec`, one Linear head per task on its features."""
    from spaces.vocabulary import DENSE_KINDS

    dense = any(t.kind in DENSE_KINDS for t in suite.tasks)
    if is_library_trunk(trunk):
        if dense:
            raise PrunefuseError(f"suite {suite.name!r} has dense tasks (segmentation / depth / normals), whose "
                                 f"decoder heads need a feature map: use --trunk cnn | resnet | mobilenet, not {trunk!r}")
        body, out = library_trunk(trunk, input_shape=suite.input_shape, vocab=token_vocab(suite), **spec)
    else:
        if trunk not in TRUNKS:
            if isinstance(trunk, str) and ":" in trunk:
                split_name(trunk)  # names the libraries
            raise unknown_name("trunk", trunk, TRUNKS)
        valid = TRUNKS.method(trunk).params
        for key in spec:
            if key not in valid:
                raise PrunefuseError(f"trunk {trunk!r} has no option {key!r}; valid options: {', '.join(valid)}")
        spec = {k: _checked_size(trunk, k, v) for k, v in spec.items()}
        if dense:
            return build_dense_model(suite, trunk=trunk, spec=spec)
        body, out = TRUNKS[trunk](suite, **spec)
    return MTLModel(body, {t.name: nn.Linear(out, t.num_outputs) for t in suite.tasks})


def _checked_size(trunk: str, key: str, value):
    """Widths, depth, channels: whole numbers >= 1 (a tuple of them for channels)."""
    from spaces.knobs import coerce_number

    if key == "channels":
        if not isinstance(value, (list, tuple)) or not value:
            raise PrunefuseError(f"trunk {trunk!r} channels={value!r}: expected a list such as [32, 64, 128]")
        return tuple(coerce_number(f"trunk {trunk!r}", "channels", c, int, low=1) for c in value)
    return coerce_number(f"trunk {trunk!r}", key, value, int, low=1)
