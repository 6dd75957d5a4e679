"""torch-pruning's group search, bounded.

`DependencyGraph.get_pruning_group` follows dependencies until every (layer, indices) pair it
reaches was seen. Through some index mappings the indices never repeat: transformers' Llama
rotary embedding (`rotate_half`: slices, then a cat) and torchvision's Swin sent it into a
search that grew until memory ran out (7.7 GB in three minutes). A group of more than
MAX_GROUP_ITEMS items (or MAX_GROUP_INDICES indices over them) is no real layout (ViT-B's largest has about a hundred): the search
stops there with `RunawayGroup`, and the group is left unpruned with that reason.
"""
from __future__ import annotations

import torch_pruning.dependency.graph as _graph
from torch_pruning.dependency.group import Group

MAX_GROUP_ITEMS = 10_000
MAX_GROUP_INDICES = 5_000_000  # indices over all items: a mapping that doubles them each step


class RunawayGroup(RuntimeError):
    """torch-pruning's search for one group passed MAX_GROUP_ITEMS items."""


class BoundedGroup(Group):
    def add_dep(self, dep, idxs):
        self._indices = getattr(self, "_indices", 0) + len(idxs)
        if len(self._group) >= MAX_GROUP_ITEMS or self._indices > MAX_GROUP_INDICES:
            raise RunawayGroup(f"torch-pruning's search for its coupled layers does not end (over {MAX_GROUP_ITEMS:,} "
                               f"items or {MAX_GROUP_INDICES:,} indices; an index mapping that never repeats, such as a rotary embedding's)")
        super().add_dep(dep, idxs)


_graph.Group = BoundedGroup  # the name get_pruning_group builds its groups with
