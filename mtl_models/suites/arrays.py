"""A split whose inputs are rows of a `.npy` file on disk, read a batch at a time.

For a plugin suite whose inputs do not fit in memory: save them once with `np.save` (or
`np.lib.format.open_memmap`), and return `ArraySplit(path, positions, labels)` for each
split. The file is memory-mapped read-only in each process that reads it (nothing is
loaded whole, and loader workers and trials on one machine share its pages through the
page cache); the split pickles as its path, so Ray hands it to trials without copying rows.

    x = np.lib.format.open_memmap("x.npy", mode="w+", dtype=np.float32, shape=(n, 64))
    ...  # fill x in chunks
    train = ArraySplit("x.npy", np.arange(0, 800), {"label": labels[:800]})
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .base import DataSplit, Rows


@dataclass(frozen=True, eq=False)
class ArraySplit(DataSplit):
    """Rows `positions` of the array in `path` (n, *input_shape); labels `y` {task: (len(positions), ...)}."""

    path: str
    positions: np.ndarray
    y: dict
    workers: int = 0

    def __post_init__(self):
        from spaces.errors import PrunefuseError

        if not os.path.isfile(self.path):
            raise PrunefuseError(f"array file {self.path!r} not found")
        object.__setattr__(self, "positions", np.asarray(self.positions, dtype=np.int64))
        rows = _mapped(self.path).shape[0]
        if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= rows):
            raise PrunefuseError(f"array file {self.path!r} has {rows} rows; positions reach {int(self.positions.max())}")

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, request: Rows):
        rows = request.rows
        x = torch.from_numpy(np.ascontiguousarray(_mapped(self.path)[self.positions[rows.numpy()]]))
        return rows, x, {t: y[rows] for t, y in self.y.items()}


_maps: dict[str, np.ndarray] = {}


def _mapped(path: str) -> np.ndarray:
    """The file memory-mapped read-only, once per process."""
    if path not in _maps:
        _maps[path] = np.load(path, mmap_mode="r")
    return _maps[path]
