"""multidigits: MultiMNIST-style pairs built offline from scikit-learn's bundled digits.

The MultiMNIST recipe (Sabour et al. 2017; Sener & Koltun 2018) scaled down to 8×8
digits: a `left` digit sits at the top-left of a (8+offset)² canvas, a `right` digit is
shifted by `offset` pixels down and right, and the two overlap by element-wise max. The
third task, `sum`, is of another kind: regressing the sum of the two digits (scored by R²).

Source images are split disjointly *before* pairing, so no test pair shares a digit
image with a training pair. Everything is a function of `seed`.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SUITES, Split, Task, TaskSuite, check_sizes

TASKS = (
    Task("left", "classification", 10),
    Task("right", "classification", 10),
    # The sum (0..18) is learned in units of 4 (about its standard deviation) so its MSE
    # sits on the CE losses' scale; it is scored by R² (1 = perfect, higher is better).
    Task("sum", "regression", 1, metric="r2", unit=4.0),
)


def _pairs(images, labels, n, offset, rng):
    i, j = rng.integers(0, len(images), size=(2, n))
    size = 8 + offset
    canvas = np.zeros((n, size, size), dtype=np.float32)
    canvas[:, :8, :8] = images[i]
    canvas[:, offset:offset + 8, offset:offset + 8] = np.maximum(
        canvas[:, offset:offset + 8, offset:offset + 8], images[j])
    y = {
        "left": torch.from_numpy(labels[i]).long(),
        "right": torch.from_numpy(labels[j]).long(),
        "sum": torch.from_numpy((labels[i] + labels[j]) / TASKS[2].unit).float(),
    }
    return Split(torch.from_numpy(canvas).unsqueeze(1), y)


def source_parts(n: int, rng) -> dict[str, np.ndarray]:
    """70 / 15 / 15 of the source images' indices, disjoint across splits."""
    order = rng.permutation(n)
    cut1, cut2 = int(0.7 * n), int(0.85 * n)
    return {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}


@SUITES.register("multidigits")
def make_multidigits(*, seed: int = 0, offset: int = 2, train_pairs: int = 20000,
                     val_pairs: int = 3000, test_pairs: int = 3000) -> TaskSuite:
    from sklearn.datasets import load_digits
    from spaces.errors import PrunefuseError

    if not 0 <= offset <= 8:
        raise PrunefuseError(f"multidigits offset={offset} is out of range; expected 0 <= offset <= 8")
    sizes = {"train_pairs": train_pairs, "val_pairs": val_pairs, "test_pairs": test_pairs}
    check_sizes("multidigits", sizes, bytes_per_row=4 * (8 + offset) ** 2 + 3 * 8)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts = source_parts(len(images), rng)
    sizes = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
    splits = {name: _pairs(images[idx], labels[idx], sizes[name], offset, rng) for name, idx in parts.items()}
    options = dict(seed=seed, offset=offset, train_pairs=train_pairs, val_pairs=val_pairs, test_pairs=test_pairs)
    return TaskSuite("multidigits", options, TASKS, splits["train"], splits["val"], splits["test"],
                     input_shape=(1, 8 + offset, 8 + offset))

