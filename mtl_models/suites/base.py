"""The TaskSuite contract: tasks, deterministic splits, and a model factory.

A suite is everything a trial needs to know about the problem. Built-in suites and
`module:function` plugins return the same `TaskSuite`, so nothing downstream cares
where the data came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class Task:
    """One task of a suite.

    kind: "classification" (head emits `num_outputs` logits, labels int64 of shape (n,))
    or "regression" (head emits 1 value, labels float32 of shape (n,)).
    metric: a name in `mtl_models.tasks.METRICS`; `higher_is_better` tells Δm its sense.
    unit: regression labels are stored divided by `unit` (to keep losses on one scale);
    metrics are computed after multiplying predictions and labels back.
    """

    name: str
    kind: str
    num_outputs: int
    metric: str = "accuracy"
    higher_is_better: bool = True
    unit: float = 1.0


@dataclass(frozen=True)
class Split:
    x: torch.Tensor                 # (n, *input_shape) float32
    y: dict[str, torch.Tensor]      # task name -> (n,) labels

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class TaskSuite:
    """name + options rebuild the suite: `mtl_models.suites.get(name, **options)`."""

    name: str
    options: dict
    tasks: tuple[Task, ...]
    train: Split
    val: Split
    test: Split
    input_shape: tuple[int, ...]
    # model_factory(suite, **model_spec) -> MTLModel; defaults to the built-in trunks.
    model_factory: Callable | None = field(default=None, repr=False)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        from spaces.errors import unknown_name

        raise unknown_name("task", name, self.task_names)

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def build_model(self, trunk: str = "mlp", **model_spec):
        """A fresh MTLModel for this suite (shared `trunk`, one head per task)."""
        if self.model_factory is not None:
            return self.model_factory(self, trunk=trunk, **model_spec)
        from mtl_models.models import build_model

        return build_model(self, trunk=trunk, **model_spec)

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        """Real inputs (the first `batch` validation rows, cycled if needed) for tracing and timing."""
        x = self.val.x
        reps = -(-batch // len(x))
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()
