"""Give a fresh model the shapes of a pruned one's state dict, so the state dict loads strictly.

Pruning changes tensors (weights, biases, BatchNorm statistics, a cls token, a position
embedding) and, with them, the plain attributes a module's forward reads (`in_features`,
a conv's `groups`, a LayerNorm's `normalized_shape`). `resize_to` does both in two steps:

1. every parameter or buffer whose saved shape differs is replaced by an empty tensor of the
   saved shape (same dtype, same `requires_grad`, same persistence), whatever module holds it;
2. the module's own attributes are derived from its new tensors by the resizer registered
   for its type in `RESIZERS` (the most specific type in its MRO wins).

Another module type is one entry: `@resizes(MyModule)` on `fn(module)`, which reads the
module's new tensors and its still-unchanged attributes (what it was built with).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spaces.errors import PrunefuseError

RESIZERS: dict[type, Callable[[nn.Module], None]] = {}


def resizes(*types: type):
    """Register `fn(module)` as the resizer of `types`."""
    def insert(fn):
        for t in types:
            RESIZERS[t] = fn
        return fn
    return insert


def resize_to(model: nn.Module, state: dict) -> None:
    """Give every module the shapes found in `state` (a pruned model's state dict)."""
    from mtl_models.pruning.attention import sites, sync_heads
    from mtl_models.pruning.attributes import sync_widths

    attention = list(sites(model, within="").values())  # head widths as built: pruning keeps them
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if not _resize_tensors(module, prefix, state):
            continue
        fn = next((RESIZERS[t] for t in type(module).__mro__ if t in RESIZERS), None)
        if fn is not None:
            fn(module)
    sync_heads(model, attention)  # attention modules whose q/k/v Linears lost heads
    sync_widths(model)  # width attributes of library classes (torchvision ViT's hidden_dim)


def _resize_tensors(module: nn.Module, prefix: str, state: dict) -> bool:
    """Step 1 for one module's own tensors; True if any changed shape."""
    changed = False
    for attr, current in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        saved = state.get(prefix + attr)
        if saved is None or current is None or current.shape == saved.shape:
            continue
        fresh = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        if isinstance(current, nn.Parameter):
            setattr(module, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            module.register_buffer(attr, fresh, persistent=attr not in module._non_persistent_buffers_set)
        changed = True
    return changed


def _misfit(module, why: str) -> PrunefuseError:
    return PrunefuseError(f"saved shapes do not fit {type(module).__name__}: {why}")


@resizes(nn.Linear)
def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


@resizes(nn.modules.conv._ConvNd)
def _conv(m) -> None:
    """Conv weights are (out, in / groups, *k), transposed ones (in, out / groups, *k). A
    depthwise conv (groups == in_channels) pruned to C channels has groups = C (times its
    channel multiplier); any other grouped conv keeps its number of groups."""
    lead, per_group = m.weight.shape[:2]
    depthwise = m.groups > 1 and m.groups == m.in_channels
    if not m.transposed:
        if depthwise:
            multiplier = m.out_channels // m.groups
            if lead % multiplier:
                raise _misfit(m, f"{lead} output channels for a depthwise multiplier of {multiplier}")
            m.groups = lead // multiplier
            m.in_channels = m.groups * per_group
        else:
            m.in_channels = per_group * m.groups
        m.out_channels = lead
    else:
        if depthwise:
            m.groups = lead
        m.in_channels, m.out_channels = lead, per_group * m.groups
    if m.in_channels % m.groups or m.out_channels % m.groups:
        raise _misfit(m, f"{m.in_channels} → {m.out_channels} channels in {m.groups} groups")


@resizes(nn.modules.batchnorm._NormBase)
def _norm(m) -> None:  # BatchNorm*d, InstanceNorm*d: one value per channel
    per_channel = m.weight if m.weight is not None else m.running_mean
    if per_channel is not None:
        m.num_features = per_channel.shape[0]


@resizes(nn.LayerNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def _layer_norm(m) -> None:
    if m.weight is not None:  # without affine weights the saved state says nothing of the shape
        m.normalized_shape = tuple(m.weight.shape)


@resizes(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]
        if m.num_channels % m.num_groups:
            raise _misfit(m, f"{m.num_channels} channels in {m.num_groups} groups")


@resizes(nn.Embedding, nn.EmbeddingBag)
def _embedding(m) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@resizes(nn.PReLU)
def _prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


@resizes(nn.MultiheadAttention)
def _multihead_attention(m: nn.MultiheadAttention) -> None:
    from mtl_models.pruning.attention import resize_mha

    resize_mha(m)
