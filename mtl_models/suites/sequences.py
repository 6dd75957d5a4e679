"""sequences: token sequences with two tasks of different kinds, generated offline and seeded.

Each row is `length` token ids in [0, vocab) (int64; `--trunk transformer` embeds them).
Tokens are drawn uniformly, then one of `motifs` fixed 3-token patterns is written at a
random position:
  motif    (classification, `motifs` classes): which one of `motifs` fixed 3-token patterns
           was written at a random position. Finding it needs the order of tokens (the same
           tokens elsewhere in another order mean nothing), so a bag of tokens cannot solve it.
  position (regression, scored by R²): where the motif starts. The same detector serves
           both tasks (what a shared trunk is for), and the head must read off the order.
Everything is a function of `seed`; the motifs are drawn from it too.
"""
from __future__ import annotations

import numpy as np
import torch

from spaces.errors import PrunefuseError

from .base import SUITES, Split, Task, TaskSuite


def _integer(name: str, value, low: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise PrunefuseError(f"sequences {name}={value!r}; expected an integer >= {low}")
    return int(value)


def _motifs(rng, count: int, vocab: int) -> np.ndarray:
    """`count` distinct 3-token patterns with no token repeated next to itself."""
    seen = set()
    while len(seen) < count:
        m = tuple(int(t) for t in rng.integers(0, vocab, size=3))
        if m[0] != m[1] and m[1] != m[2]:
            seen.add(m)
    return np.array(sorted(seen))


def _split(rng, n: int, length: int, vocab: int, motifs: np.ndarray) -> Split:
    x = rng.integers(0, vocab, size=(n, length))
    label = rng.integers(0, len(motifs), size=n)
    where = rng.integers(0, length - 2, size=n)
    for row in range(n):
        x[row, where[row]:where[row] + 3] = motifs[label[row]]
    return Split(torch.from_numpy(x).long(), {
        "motif": torch.from_numpy(label).long(),
        "position": torch.from_numpy(where / (length / 4)).float(),
    })


@SUITES.register("sequences")
def make_sequences(*, seed: int = 0, length: int = 16, vocab: int = 8, motifs: int = 4,
                   train_samples: int = 4000, val_samples: int = 1000, test_samples: int = 1000) -> TaskSuite:
    seed, length = _integer("seed", seed, 0), _integer("length", length, 4)
    vocab, motifs = _integer("vocab", vocab, 3), _integer("motifs", motifs, 2)
    if motifs > vocab * (vocab - 1) ** 2:
        raise PrunefuseError(f"sequences motifs={motifs}: at most {vocab * (vocab - 1) ** 2} patterns exist "
                             f"with vocab={vocab}")
    sizes = [_integer(k, v, 2) for k, v in (("train_samples", train_samples), ("val_samples", val_samples),
                                             ("test_samples", test_samples))]
    rng = np.random.default_rng(seed)
    patterns = _motifs(rng, motifs, vocab)
    train, val, test = (_split(rng, n, length, vocab, patterns) for n in sizes)
    # Positions are learned in units of length/4 (about their spread) so their MSE sits on the
    # cross-entropy's scale; R² does not depend on the unit.
    tasks = (Task("motif", "classification", motifs),
             Task("position", "regression", 1, metric="r2", unit=length / 4))
    options = dict(seed=seed, length=length, vocab=vocab, motifs=motifs, train_samples=train_samples,
                   val_samples=val_samples, test_samples=test_samples)
    return TaskSuite("sequences", options, tasks, train, val, test, input_shape=(length,))
