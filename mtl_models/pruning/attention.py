"""Attention heads: which trunk modules are attention, how whole heads are pruned, and the
MultiheadAttention forward that still runs once heads or the residual width are pruned.

Three layouts are recognised (`sites`), each a decision of its own (named by the attention
module; a policy's sparsity for it is the fraction of its heads removed):
  mha    torch.nn.MultiheadAttention (torchvision's ViT, nn.TransformerEncoderLayer): the q/k/v
         rows of `in_proj_weight` are (3·heads·head_dim, embed), `out_proj` is (embed, heads·head_dim).
         torch-pruning sees the module as one node tied to the residual stream (its embed_dim),
         so heads are cut here, and the residual channels by `ResidualPruner` (registered with
         torch-pruning's graph as the module's pruner).
  fused  a module with a `qkv` Linear (3·heads·head_dim outputs, reshaped to (B, N, 3, heads,
         head_dim)) and an int `num_heads` (timm's Attention).
  split  a module with separate q / k / v Linears (`SPLIT_NAMES`: BERT's query/key/value, HF
         ViT's q_proj/k_proj/v_proj, DistilBERT's q_lin/k_lin/v_lin) and an int head count
         (`HEAD_COUNT_ATTRS`: num_attention_heads, num_heads, n_heads).
For fused and split, torch-pruning's dependency graph already ties q, k, v and the output
Linear that reads the heads (timm's `proj`, BERT's `dense` in a sibling module): the
channels of whole heads are pruned through `get_pruning_group` on the q layer, and the
module's head count and inner width are updated (`sync_heads`: timm's `num_heads` and
`attn_dim`, BERT's `num_attention_heads` and `all_head_size`) so its reshape sees the new
layout. (torch-pruning's own head support, `num_heads=` / `prune_num_heads` of its
MetaPruner, is not used: prunefuse decides which heads go itself, by `head_scores`, and
prunes through the graph directly.)

The residual width stays free of the head count: a pruned `nn.MultiheadAttention` becomes a
`PrunedMultiheadAttention`, whose forward works with heads·head_dim != embed_dim, so no
residual width has to be a multiple of the heads. Modules that look like attention but fit
none of these (`unsupported`) are left out of pruning, and `describe_unsupported` says which
and why in one line.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from spaces.errors import PrunefuseError

from . import bounded  # noqa: F401  (torch-pruning's group search, bounded: every graph here is built after it)

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")  # timm, HF BERT / ViT, DistilBERT
# q / k / v Linears of the split layout: HF BERT, HF ViT / CLIP / most newer HF models, DistilBERT, plain code
SPLIT_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"))
# Attributes that hold heads · head_dim and that a forward may reshape with (timm's `attn_dim`,
# HF BERT's `all_head_size`): kept equal to the pruned width by `sync_heads`.
INNER_WIDTH_ATTRS = ("attn_dim", "all_head_size")


# --- the forward of a pruned nn.MultiheadAttention ---

class PrunedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with `num_heads · head_dim` (the heads' width) apart from
    `embed_dim` (the residual width), which torch's own forward requires to be equal. Same
    parameters and state-dict keys; `out_proj` is called as a module, so its hooks (pruning
    masks, the Taylor criteria's activation probes) run. Modules become this class by
    `to_prunable` (instance class swap, so the user's model keeps every other attribute)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        self_attention = query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if self_attention:  # one GEMM for q, k and v, as torch's own forward packs them
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            q, k, v = (F.linear(t, w[i * inner:(i + 1) * inner], None if b is None else b[i * inner:(i + 1) * inner])
                       for i, t in enumerate((query, key, value)))
        batch, length, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, length, source, q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
            if causal:
                scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            weights = (scores if mask is None else scores + mask).softmax(-1)
            ctx = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(ctx.transpose(1, 2).reshape(batch, length, inner))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _count_macs(m, inputs, output) -> None:
    """torch-pruning's MAC counter for the pruned form, as it counts nn.MultiheadAttention:
    q/k/v projections, q scaling and the heads' two matmuls and softmax (`out_proj` is called
    as a module here, so its own Linear counter counts it)."""
    q, k = inputs[0], inputs[1]
    batched = q.dim() == 3
    batch = (q.shape[0] if m.batch_first else q.shape[1]) if batched else 1
    length, source = (q.shape[-2], k.shape[-2]) if m.batch_first or not batched else (q.shape[0], k.shape[0])
    inner = m.num_heads * m.head_dim
    macs = length * inner + (length + 2 * source) * m.embed_dim * inner
    if m.in_proj_bias is not None:
        macs += (length + 2 * source) * inner
    macs += m.num_heads * (2 * length * source * m.head_dim + length * source)
    m.__flops__ += int(macs * batch)


tp.utils.op_counter.MODULES_MAPPING[PrunedMultiheadAttention] = _count_macs


def _additive_mask(attn_mask, key_padding_mask, batch, heads, length, source, dtype):
    """MultiheadAttention's masks (bool: True = may not attend; float: added) as one additive
    mask broadcastable to (B, heads, L, S), or None."""
    def additive(m):
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(1, 1, length, source) if mask.dim() == 2 else mask.view(batch, -1, length, source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _native_ok(module: nn.MultiheadAttention) -> str | None:
    """Why this MultiheadAttention's heads cannot be pruned here (None: they can)."""
    if not module._qkv_same_embed_dim and getattr(module, "in_proj_weight", None) is None:
        return "separate key/value widths (kdim/vdim)"
    if module.bias_k is not None or module.add_zero_attn:
        return "bias_k/bias_v or add_zero_attn"
    return None


def to_prunable(model) -> None:
    """Every nn.MultiheadAttention that can be pruned gets the forward that survives pruning
    (numerically the same function). Fast paths that assume embed_dim == heads·head_dim are
    switched off for it (`_qkv_same_embed_dim`, which nn.TransformerEncoderLayer checks)."""
    for module in model.modules():
        if type(module) is nn.MultiheadAttention and _native_ok(module) is None:
            module.__class__ = PrunedMultiheadAttention
            module._qkv_same_embed_dim = False


def to_native(model) -> None:
    """Back to torch's own nn.MultiheadAttention (and its fast paths) wherever the shapes still
    allow it (heads·head_dim == embed_dim, no live pruning masks): what `to_prunable` did is
    undone for every module pruning did not resize."""
    for module in model.modules():
        if type(module) is PrunedMultiheadAttention and module.num_heads * module.head_dim == module.embed_dim \
                and not _masked(module) and not _masked(module.out_proj):
            module.__class__ = nn.MultiheadAttention
            module._qkv_same_embed_dim = True


def _masked(module) -> bool:
    return any(name.endswith("_mask") for name, _ in module.named_buffers(recurse=False))


class ResidualPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's pruner for a MultiheadAttention's residual (embed) channels: the input
    columns of q/k/v and the output rows of `out_proj`; the heads keep their width."""

    def prune_out_channels(self, layer, idxs):
        keep = sorted(set(range(layer.embed_dim)) - set(int(i) for i in idxs))
        layer.in_proj_weight = self._prune_parameter_and_grad(layer.in_proj_weight, keep, 1)
        out = layer.out_proj
        out.weight = self._prune_parameter_and_grad(out.weight, keep, 0)
        if out.bias is not None:
            out.bias = self._prune_parameter_and_grad(out.bias, keep, 0)
        out.out_features = len(keep)
        layer.embed_dim = layer.kdim = layer.vdim = len(keep)
        if type(layer) is nn.MultiheadAttention:
            layer.__class__ = PrunedMultiheadAttention
            layer._qkv_same_embed_dim = False
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer):
        return layer.embed_dim

    get_in_channels = get_out_channels


RESIDUAL_PRUNER = ResidualPruner()


def dependency_graph(model, example_inputs) -> tp.DependencyGraph:
    """torch-pruning's graph of `model`, with MultiheadAttention's residual channels pruned by
    `ResidualPruner` and every bare trunk parameter pruned along its channel axis
    (`channel_axis`): a cls token or position embedding (…, features), a layer scale
    (channels, 1, 1)."""
    modules = dict(model.named_modules())
    per_head = [getattr(modules[n], p) for n, site in sites(model, within="").items() if site.kind != "mha"
                for p in head_params(modules[n], heads_of(modules[n]))]
    wrapped = {id(p) for m in model.modules() if _is_layer(m) for p in m.parameters(recurse=False)}
    wrapped |= {id(p) for p in per_head}
    unwrapped = [(p, channel_axis(p)) for p in model.parameters()
                 if id(p) not in wrapped and channel_axis(p) is not None]
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, unwrapped_parameters=unwrapped, ignored_params=per_head,
            customized_pruners={nn.MultiheadAttention: RESIDUAL_PRUNER, PrunedMultiheadAttention: RESIDUAL_PRUNER})
    except Exception as exc:  # noqa: BLE001 - torch-pruning's tracer: its own errors say nothing of the model
        raise PrunefuseError(f"torch-pruning cannot trace the channel dependencies of this model, so it cannot be "
                             f"pruned structurally: {type(exc).__name__}: {' '.join(str(exc).split())[:160]} "
                             f"(in {_where(exc)})") from None


def _where(exc: BaseException) -> str:
    """Where in torch-pruning a trace failed, and what that part of it handles."""
    import traceback

    frame = traceback.extract_tb(exc.__traceback__)[-1]
    what = {"index_mapping.py": "a reshape / view that splits or shuffles the channel axis, such as ShuffleNet's "
                                "channel shuffle"}.get(frame.filename.rsplit("/", 1)[-1])
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}" + (f": {what}" if what else "")


def channel_axis(p: torch.Tensor) -> int | None:
    """The axis of a bare parameter that holds channels: its last axis wider than 1 (features of
    a (1, tokens, features) position embedding; channels of a (channels, 1, 1) scale that
    broadcasts over an image). None for a parameter of size 1 on every axis."""
    return next((axis for axis in range(p.dim() - 1, -1, -1) if p.shape[axis] > 1), None)


_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                nn.Embedding, nn.PReLU, nn.MultiheadAttention)


def _is_layer(module) -> bool:
    return isinstance(module, _LAYER_TYPES)


# --- the attention modules of a trunk ---

@dataclass(frozen=True)
class Site:
    """One attention module: `kind` is mha / fused / split, `q` the layers whose outputs are
    the heads' channels (q-space; k and v follow through the graph), `head_dim` their width."""
    name: str
    kind: str
    q: tuple[str, ...]
    head_dim: int


def _head_count_attr(module) -> str | None:
    return next((a for a in HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int)
                 and not isinstance(getattr(module, a), bool)), None)


def heads_of(module) -> int:
    attr = "num_heads" if isinstance(module, nn.MultiheadAttention) else _head_count_attr(module)
    return getattr(module, attr)


def _classify(name: str, module) -> tuple[Site | None, str | None]:
    """(site, None) for a recognised attention module, (None, why) for one that looks like
    attention but cannot be head-pruned, (None, None) for anything else."""
    if isinstance(module, nn.MultiheadAttention):
        why = _native_ok(module)
        return (None, why) if why else (Site(name, "mha", (name,), module.head_dim), None)
    attr = _head_count_attr(module)
    if attr is None:
        if _is_int(getattr(module, "head_dim", None)) and any(
                all(isinstance(getattr(module, p, None), nn.Linear) for p in names) for names in SPLIT_NAMES):
            # transformers' Llama-style attention (reshapes with -1 and head_dim, no head count):
            # torch-pruning's index search through its rotary embedding (rotate_half's
            # slices and cat) never ends, so its q/k/v/o stay out of the graph's roots
            return None, "q / k / v Linears with rotary position embeddings and no head count: heads not pruned"
        return None, None
    heads = getattr(module, attr)
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear):
        if qkv.out_features % (3 * heads):
            return None, f"qkv has {qkv.out_features} outputs, not 3 × {attr}={heads} heads"
        return Site(name, "fused", (f"{name}.qkv",), _head_dim(module, qkv.out_features // 3 // heads)), None
    for names in SPLIT_NAMES:
        parts = [getattr(module, p, None) for p in names]
        if not all(isinstance(p, nn.Linear) for p in parts):
            continue
        if len({p.out_features for p in parts}) > 1 or parts[0].out_features % heads:
            return None, (f"{'/'.join(names)} widths {[p.out_features for p in parts]} do not split into {heads} "
                          f"heads alike (grouped-query attention is not pruned by heads)")
        return Site(name, "split", tuple(f"{name}.{p}" for p in names),
                    _head_dim(module, parts[0].out_features // heads)), None
    if any(_classify(f"{name}.{n}", m) != (None, None) for n, m in module.named_children()):
        return None, None  # a block that only holds the attention (torchvision's EncoderBlock has num_heads too)
    return None, (f"has {attr}={heads} but neither a fused `qkv` Linear nor separate q / k / v Linears "
                  f"({', '.join('/'.join(n) for n in SPLIT_NAMES)}: the layouts prunefuse prunes by heads)")


def _head_dim(module, derived: int) -> int:
    """The module's own head width attribute (timm's `head_dim`, BERT's `attention_head_size`)
    when it has one: after pruning, width / heads is stale until `sync_heads` ran."""
    for attr in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return derived


def sites(model, *, within: str = "trunk") -> dict[str, Site]:
    """Recognised attention modules of the trunk (`within`; "" for the whole model), by name
    (`trunk.blocks.0.attn`)."""
    out = {}
    root = model.get_submodule(within) if within else model
    for name, module in root.named_modules():
        site, _ = _classify(".".join(p for p in (within, name) if p), module)
        if site is not None:
            out[site.name] = site
    return out


def unsupported(model) -> dict[str, str]:
    """Trunk modules that look like attention but cannot be head-pruned: name -> why."""
    out = {}
    for name, module in model.trunk.named_modules():
        _, why = _classify(f"trunk.{name}", module)
        if why:
            out[f"trunk.{name}"] = f"{type(module).__name__}: {why}"
    return out


def head_groups(model) -> dict[str, tuple[str, ...]]:
    """Decision name (the attention module) -> the layers it covers: a MultiheadAttention and
    its `out_proj`, or the q/k/v Linears of a fused / split site (unstructured masks cover
    these at the decision's sparsity)."""
    return {name: (name, f"{name}.out_proj") if site.kind == "mha" else site.q for name, site in sites(model).items()}


def hidden_layers(model) -> set[str]:
    """Linear layers inside attention modules that are decided with their module (mha's
    `out_proj`, which torch-pruning sees only as part of the attention node; q/k/v Linears
    of a recognised site) or inside an unsupported attention module (never pruned)."""
    modules = dict(model.named_modules())
    out = set()
    owners = {**{n: None for n in unsupported(model)}, **{n: s for n, s in sites(model).items()}}
    for owner, site in owners.items():
        if site is not None and site.kind != "mha":
            out |= set(site.q)
            continue
        out |= {f"{owner}.{n}" for n, m in modules[owner].named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))}
    return out


def head_matmul_macs(model, example_inputs: torch.Tensor) -> int:
    """MACs of the heads' own work in fused and split sites, q·kᵀ, the softmax and weights·v
    (counted as torch-pruning counts them for nn.MultiheadAttention), over one forward of
    `example_inputs`. torch-pruning's counter sees layers only, and these matmuls run in the
    attention module's own forward: without them, cutting heads would look cheaper than it is."""
    from mtl_models.training.modes import hooked_forward

    modules = dict(model.named_modules())
    total = [0]

    def counter(site):
        def count(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)  # (…, tokens, features)
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                tokens, batch = x.shape[-2], x[..., 0, 0].numel()
                total[0] += batch * heads_of(module) * (2 * site.head_dim + 1) * tokens * tokens
        return count

    hooks = [modules[name].register_forward_pre_hook(counter(site), with_kwargs=True)
             for name, site in sites(model, within="").items() if site.kind != "mha"]
    if hooks:
        hooked_forward(model, example_inputs, hooks)
    return total[0]


def describe_unsupported(model) -> str | None:
    """One line naming the attention modules that are left unpruned and why (None: none)."""
    bad = unsupported(model)
    if not bad:
        return None
    return ("prunefuse cannot prune the heads of " + "; ".join(f"{n} ({why})" for n, why in bad.items())
            + ": these modules and the layers inside them are left unpruned")


# --- scoring and pruning heads ---

def full_group(graph, model, site: Site):
    """What the criteria score for a site: torch-pruning's group of all q-space channels (fused
    and split: q, k, v and the output layer's inputs), or for mha a `HeadGroup` standing in."""
    modules = dict(model.named_modules())
    if site.kind == "mha":
        return HeadGroup(modules[site.name])
    q = modules[site.q[0]]
    width = heads_of(modules[site.name]) * site.head_dim
    return graph.get_pruning_group(q, graph.get_pruner_of_module(q).prune_out_channels, list(range(width)))


class _Target:
    def __init__(self, module):
        self.module = module


class _Handler:
    __name__ = "prune_in_channels"


class _Dep:
    def __init__(self, module):
        self.target, self.handler = _Target(module), _Handler()


class _Item:
    def __init__(self, module, width):
        self.dep, self.idxs, self.root_idxs = _Dep(module), list(range(width)), list(range(width))


class HeadGroup:
    """The q-space channels of an nn.MultiheadAttention, shaped like the torch-pruning group
    the criteria read: one item, `out_proj` reading the heads' channels (the Taylor criteria
    probe its input); `magnitude(p)` is torch-pruning's group magnitude over q/k/v rows and
    `out_proj` columns."""

    def __init__(self, module: nn.MultiheadAttention):
        self.module = module
        self.items = [_Item(module.out_proj, module.num_heads * module.head_dim)]

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)

    @torch.no_grad()
    def magnitude(self, p: int) -> torch.Tensor:
        m = self.module
        inner = m.num_heads * m.head_dim
        w = m.in_proj_weight.detach().abs().pow(p)
        per_channel = w.view(3, inner, -1).sum((0, 2)) + m.out_proj.weight.detach().abs().pow(p).sum(0)
        return (per_channel / (per_channel.mean() + 1e-12)).float().cpu()


def head_scores(model, site: Site, channel_scores: torch.Tensor) -> torch.Tensor:
    """A head's score: the mean of its channels' scores (q-space channels h·head_dim … )."""
    heads = heads_of(dict(model.named_modules())[site.name])
    return channel_scores[:heads * site.head_dim].reshape(heads, site.head_dim).mean(1)


def prune_heads(graph, model, site: Site, drop: list[int]) -> None:
    """Remove whole heads `drop` (indices among the current heads): q, k, v rows and the
    output layer's columns of each, then the module's head count."""
    modules = dict(model.named_modules())
    module = modules[site.name]
    channels = [h * site.head_dim + j for h in sorted(drop) for j in range(site.head_dim)]
    if not channels:
        return
    if site.kind == "mha":
        _prune_mha_heads(module, channels)
        return
    q = modules[site.q[0]]
    heads = heads_of(module)
    group = graph.get_pruning_group(q, graph.get_pruner_of_module(q).prune_out_channels, channels)
    group.prune()
    _prune_head_params(module, heads, sorted(drop))
    sync_heads(model, [site])


def head_params(module, heads: int) -> dict[str, int]:
    """The attention module's own parameters with one value per head (a relative-position bias
    table (positions, heads), Swin V2's logit scale (heads, 1, 1)): name -> the head axis.
    They are left out of torch-pruning's graph (`dependency_graph`) and cut with the heads."""
    out = {}
    for name, p in module.named_parameters(recurse=False):
        axes = [a for a, n in enumerate(p.shape) if n == heads]
        if heads > 1 and len(axes) == 1:
            out[name] = axes[0]
    return out


def _prune_head_params(module, heads: int, drop: list[int]) -> None:
    keep = torch.tensor(sorted(set(range(heads)) - set(drop)))
    for name, axis in head_params(module, heads).items():
        p = getattr(module, name)
        setattr(module, name, nn.Parameter(p.detach().index_select(axis, keep).clone(), requires_grad=p.requires_grad))


def _prune_mha_heads(m, channels: list[int]) -> None:
    inner = m.num_heads * m.head_dim
    keep = sorted(set(range(inner)) - set(channels))
    rows = torch.tensor([c + i * inner for i in range(3) for c in keep])
    cols = torch.tensor(keep)
    if type(m) is nn.MultiheadAttention:
        m.__class__ = PrunedMultiheadAttention
        m._qkv_same_embed_dim = False
    m.in_proj_weight = nn.Parameter(m.in_proj_weight.detach()[rows].clone())
    if m.in_proj_bias is not None:
        m.in_proj_bias = nn.Parameter(m.in_proj_bias.detach()[rows].clone())
    m.out_proj.weight = nn.Parameter(m.out_proj.weight.detach()[:, cols].clone())
    m.out_proj.in_features = len(keep)
    m.num_heads = len(keep) // m.head_dim


def sync_heads(model, known) -> None:
    """Each fused / split attention module of `known` (its `Site`s, taken before pruning or a
    reload changed the widths) gets its head count (every attribute of `HEAD_COUNT_ATTRS` it
    has) and its inner width (`INNER_WIDTH_ATTRS`: timm's `attn_dim`, BERT's `all_head_size`)
    from its q layer's width; head_dim never changes."""
    modules = dict(model.named_modules())
    for site in known:
        if site.kind == "mha":
            continue
        module, width = modules[site.name], modules[site.q[0]].out_features
        width //= 3 if site.kind == "fused" else 1
        for attr in HEAD_COUNT_ATTRS:
            if _is_int(getattr(module, attr, None)):
                setattr(module, attr, width // site.head_dim)
        for attr in INNER_WIDTH_ATTRS:
            if _is_int(getattr(module, attr, None)):
                setattr(module, attr, width)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resize_mha(m: nn.MultiheadAttention) -> None:
    """After a reload gave `in_proj_weight` its saved shape (3·heads·head_dim, embed): the
    module's widths and head count, and the pruned forward where torch's needs equal widths."""
    inner, embed = m.in_proj_weight.shape[0] // 3, m.in_proj_weight.shape[1]
    m.embed_dim = m.kdim = m.vdim = embed
    m.num_heads = inner // m.head_dim  # head_dim is what the fresh model was built with
    if inner != embed and type(m) is nn.MultiheadAttention:
        m.__class__ = PrunedMultiheadAttention
        m._qkv_same_embed_dim = False


def probe(model, example_inputs) -> dict[str, str]:
    """Recognised sites whose forward fails with one head fewer (a reshape that hard-codes the
    input width, say): name -> why. Tried on a copy; the model is untouched."""
    out = {}
    for site in sites(model).values():
        if heads_of(dict(model.named_modules())[site.name]) < 2:
            continue
        trial = copy.deepcopy(model).eval()
        try:
            to_prunable(trial)
            graph = dependency_graph(trial, example_inputs)
            prune_heads(graph, trial, site, [0])
            with torch.no_grad():
                trial(example_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure means: not prunable this way
            out[site.name] = f"its forward fails with one head fewer: {str(exc).splitlines()[0][:120]}"
    return out
