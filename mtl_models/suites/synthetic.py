"""synthetic: the MMoE paper's generator with a task-correlation knob (Ma et al., KDD 2018).

Orthonormal u_1..u_T; w_1 = c·u_1, w_t = c·(p·u_1 + √(1 − p²)·u_t); x ~ N(0, I);
y_t = w_tᵀx + Σ_j sin(α_j·w_tᵀx + β_j) + ε, ε ~ N(0, noise²); α_j, β_j ~ N(0, 1) are shared
by all tasks (j = 1..`sines`), as in the paper. With T = 2 the Pearson correlation of the two
label functions grows with p (the sines make it differ from p itself). With T > 2, w_1 has
cosine p with every other w_t, and w_s, w_t (s, t >= 2) have cosine p²: a negative p makes
task 1 conflict with all the others. `label_scale` multiplies each task's labels, so one
task's loss can dwarf another's (what task weighting is for). Tasks are regressions scored
by R², which a label scale does not change. Everything is a function of `seed`; the same
seed (and tasks, dim, sines) gives the same u, α, β, x and ε for every p and label_scale,
so suites differing only in those are comparable.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from spaces.errors import PrunefuseError

from .base import SUITES, Split, Task, TaskSuite, check_sizes


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value > high):
        bound = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise PrunefuseError(f"synthetic {name}={value!r}; expected {bound}")
    return int(value)


def _real(name: str, value, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise PrunefuseError(f"synthetic {name}={value!r}; expected a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def _scales(label_scale, tasks: int) -> list[float]:
    if label_scale is None:
        return [1.0] * tasks
    if not isinstance(label_scale, (list, tuple)):
        raise PrunefuseError(f"synthetic label_scale={label_scale!r}; expected a list with one factor per task "
                             f"({tasks}), e.g. {[1.0] * (tasks - 1) + [10.0]}")
    if len(label_scale) != tasks:
        raise PrunefuseError(f"synthetic label_scale has {len(label_scale)} values; expected one per task ({tasks})")
    return [_real(f"label_scale[{i}]", v, positive=True) for i, v in enumerate(label_scale)]


@SUITES.register("synthetic")
def make_synthetic(*, seed: int = 0, tasks: int = 2, correlation: float = 0.5, dim: int = 100, c: float = 1.0,
                   sines: int = 10, noise: float = 0.1, label_scale: list | None = None,
                   train_samples: int = 8000, val_samples: int = 2000, test_samples: int = 2000) -> TaskSuite:
    ok = isinstance(correlation, (int, float)) and not isinstance(correlation, bool)
    if not ok or not -1.0 <= correlation <= 1.0:  # nan fails the comparison too
        raise PrunefuseError(f"synthetic correlation={correlation!r}; expected -1 <= correlation <= 1")
    dim = _integer("dim", dim, 1)
    tasks = _integer("tasks", tasks, 1, dim)  # u_1..u_T must be orthonormal in R^dim
    seed, sines = _integer("seed", seed, 0), _integer("sines", sines, 0)
    c, noise = _real("c", c, positive=True), _real("noise", noise)
    for name, n in (("train_samples", train_samples), ("val_samples", val_samples), ("test_samples", test_samples)):
        _integer(name, n, 2)  # R² needs at least two labels
    check_sizes("synthetic", {"train_samples": train_samples, "val_samples": val_samples,
                              "test_samples": test_samples}, bytes_per_row=4 * dim + 8 * tasks, low=2)
    scales = _scales(label_scale, tasks)
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((dim, tasks)))     # orthonormal columns u_1..u_T
    w = [c * u[:, 0]] + [c * (correlation * u[:, 0] + np.sqrt(1 - correlation ** 2) * u[:, t]) for t in range(1, tasks)]
    alpha, beta = rng.standard_normal(sines), rng.standard_normal(sines)
    names = [f"task{t + 1}" for t in range(tasks)]

    def split(n):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        ys = {}
        for t, name in enumerate(names):
            z = x @ w[t]
            y = z + np.sin(np.outer(z, alpha) + beta).sum(axis=1) + noise * rng.standard_normal(n)
            ys[name] = torch.from_numpy((scales[t] * y).astype(np.float32))
        return Split(torch.from_numpy(x), ys)

    train, val, test = split(train_samples), split(val_samples), split(test_samples)
    options = dict(seed=seed, tasks=tasks, correlation=correlation, dim=dim, c=c, sines=sines, noise=noise,
                   label_scale=scales, train_samples=train_samples, val_samples=val_samples, test_samples=test_samples)
    return TaskSuite("synthetic", options, tuple(Task(n, "regression", 1, metric="r2") for n in names),
                     train, val, test, input_shape=(dim,))
