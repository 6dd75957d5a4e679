"""A split of decoded images read batch by batch from the node's cache, with its transforms.

Training batches (`plan` with a generator) take a random `crop`×`crop` window and, with
`flip`, a random horizontal flip per image, drawn from the trial's seeded generator in the
process that plans the batch; evaluation batches take the centre window, unflipped. Pixels
become float32 in 0..1, then `(x - mean) / std` per channel with the training split's
statistics (`normalize`). All of it runs on whole uint8 batches, in a loader worker when
the split has workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .base import DataSplit, Rows


@dataclass(frozen=True)
class View:
    """How stored (3, size, size) uint8 images become model inputs (3, crop, crop)."""

    size: int
    crop: int
    flip: bool
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def augments(self) -> bool:
        return self.crop < self.size or self.flip

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 3) int64: top, left, flipped (0/1) per image."""
        corner = torch.randint(0, self.size - self.crop + 1, (count, 2), generator=generator)
        flips = (torch.randint(0, 2, (count, 1), generator=generator) if self.flip
                 else torch.zeros(count, 1, dtype=torch.int64))
        return torch.cat([corner, flips], dim=1)

    def apply(self, images: torch.Tensor, augment: torch.Tensor | None) -> torch.Tensor:
        """(b, 3, size, size) uint8 -> (b, 3, crop, crop) float32, normalised."""
        c = self.crop
        if augment is None:
            top = (self.size - c) // 2
            out = images[:, :, top:top + c, top:top + c]
        else:
            out = torch.stack([img[:, t:t + c, l:l + c] for img, (t, l) in zip(images, augment[:, :2].tolist())])
            flipped = augment[:, 2].bool()
            if flipped.any():
                out[flipped] = out[flipped].flip(-1)
        x = out.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)


@dataclass(frozen=True, eq=False)
class ImageSplit(DataSplit):
    """Rows `positions` of an `image_cache.ImageStore`, their labels `y`, read through `view`.

    Pickles small (Ray hands it to trials through the object store): the store is named by
    its folder, and a process on a machine without that folder rebuilds it from `recipe`
    (the suite's table options) once, before its first read."""

    store: object                    # image_cache.ImageStore
    positions: np.ndarray            # (n,) int64 rows of the store
    y: dict                          # task -> (n, ...) labels
    view: View
    augment: bool                    # the training split: random crop / flip when planned with a generator
    recipe: tuple = ()               # (table path, image column, label columns, size): rebuilds a missing store
    workers: int = 0

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def eval_rows(self) -> int:
        """About 8 MiB of float inputs a batch: an evaluation's peak memory stays small and
        the same whatever the split's size (a conv trunk's activations are many times that)."""
        return max(16, min(1024, (8 << 20) // (4 * 3 * self.view.crop ** 2)))

    def plan(self, rows: torch.Tensor, generator: torch.Generator | None) -> Rows:
        if generator is None or not self.augment or not self.view.augments:
            return Rows(rows, None)
        return Rows(rows, self.view.draw(len(rows), generator))

    def __getitem__(self, request: Rows):
        rows = request.rows
        images = torch.from_numpy(self._store().read(self.positions[rows.numpy()]))
        return rows, self.view.apply(images, request.augment), {t: y[rows] for t, y in self.y.items()}

    def _store(self):
        if os.path.isdir(self.store.folder) or not self.recipe:
            return self.store
        from . import image_cache
        from .image_table import read_table

        path, column, labels, size = self.recipe
        store = image_cache.prepare(read_table(path, column, list(labels)), size)
        if store.images_sha256 != self.store.images_sha256:
            from spaces.errors import PrunefuseError

            raise PrunefuseError(f"the images of {path!r} on this machine differ from those the suite was built "
                                 f"on (sha256 {store.images_sha256[:12]}..., expected {self.store.images_sha256[:12]}...)")
        object.__setattr__(self, "store", store)  # this process's copy of the split, now on this node's disk
        return store
