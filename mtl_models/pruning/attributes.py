"""Plain width attributes that a library module's own forward reads, kept equal to its pruned
tensors (torch-pruning resizes tensors and the standard layers' attributes, not these).

One entry per class, keyed by its qualified name (the libraries are optional: nothing here
imports them): `fn(module)` derives the attributes from the module's current tensors. Run
after every structured pruning round (`sync_widths`) and after a reload resized the tensors
(`mtl_models.models.resize`). Attention modules' head counts and inner widths are kept by
`attention.sync_heads`; this covers the rest.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

WIDTH_SYNCS: dict[str, Callable[[nn.Module], None]] = {}


def syncs(*qualified_names: str):
    """Register `fn(module)` for the classes named `module.QualName`."""
    def insert(fn):
        for name in qualified_names:
            WIDTH_SYNCS[name] = fn
        return fn
    return insert


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def sync_widths(model: nn.Module) -> None:
    """Every module whose class (or a base class) has an entry gets its attributes derived again."""
    for module in model.modules():
        fn = next((WIDTH_SYNCS[n] for n in map(_qualified, type(module).__mro__) if n in WIDTH_SYNCS), None)
        if fn is not None:
            fn(module)


@syncs("torchvision.models.vision_transformer.VisionTransformer")
def _torchvision_vit(m) -> None:
    # _process_input reshapes the patch embedding with (n, self.hidden_dim, n_h * n_w)
    m.hidden_dim = m.conv_proj.out_channels


@syncs("timm.layers.mixed_conv2d.MixedConv2d")
def _timm_mixed_conv(m) -> None:
    # MixNet's MixConv splits its input with `splits` (fixed at build) before its convs
    m.splits = [conv.in_channels for conv in m.values()]
    m.in_channels, m.out_channels = sum(m.splits), sum(conv.out_channels for conv in m.values())
