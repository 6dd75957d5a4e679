"""synthetic: the MMoE paper's generator with a task-correlation knob (Ma et al., KDD 2018).

Orthonormal u_1..u_T; w_1 = c·u_1, w_t = c·(p·u_1 + √(1 − p²)·u_t); x ~ N(0, I);
y_t = w_tᵀx + Σ_j sin(α_j·w_tᵀx + β_j) + ε. With T = 2 the Pearson correlation of the two
label functions grows with p. `label_scale` multiplies each task's labels, so one task's
loss can dwarf another's (what task weighting is for). Tasks are regressions scored by R².
"""
from __future__ import annotations

import numpy as np
import torch

from spaces.errors import PrunefuseError

from .base import Split, Task, TaskSuite


def make_synthetic(*, seed: int = 0, tasks: int = 2, correlation: float = 0.5, dim: int = 100, c: float = 1.0,
                   sines: int = 10, noise: float = 0.1, label_scale: list | None = None,
                   train_samples: int = 8000, val_samples: int = 2000, test_samples: int = 2000) -> TaskSuite:
    if not -1.0 <= correlation <= 1.0:
        raise PrunefuseError(f"synthetic correlation={correlation}; expected -1 <= correlation <= 1")
    if not 1 <= tasks <= dim:
        raise PrunefuseError(f"synthetic tasks={tasks}; expected 1 <= tasks <= dim ({dim})")
    scales = list(label_scale) if label_scale is not None else [1.0] * tasks
    if len(scales) != tasks:
        raise PrunefuseError(f"synthetic label_scale has {len(scales)} values; expected one per task ({tasks})")
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
