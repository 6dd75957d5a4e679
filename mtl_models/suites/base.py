"""The TaskSuite contract: tasks, deterministic splits, and a model factory.

A suite is everything a trial needs to know about the problem. Built-in suites and
`module:function` plugins return the same `TaskSuite`, so nothing downstream cares
where the data came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from spaces.registry import Registry
from spaces.vocabulary import suite_spec

# Built-in suites by name: each module's `make_<name>(**options) -> TaskSuite` registers itself.
SUITES = Registry("suite")


@dataclass(frozen=True)
class Task:
    """One task of a suite.

    kind (`spaces.vocabulary.TASK_KINDS`; losses and metrics in `mtl_models.training.tasks.KINDS`):
      "classification": the head emits `num_outputs` logits; labels int64 (n,)
      "regression":     1 value per row; labels float32 (n,)
      "multilabel":     `num_outputs` logits, one per label; labels float32 0/1 (n, K)
      "segmentation":   `num_outputs` class logits per pixel (n, K, H, W); labels int64 (n, H, W),
                        IGNORE_INDEX (-1) where unlabelled
      "depth":          1 value per pixel (n, 1, H, W); labels float32 (n, H, W), 0 where unknown
      "normals":        3 values per pixel (n, 3, H, W); labels unit vectors float32 (n, 3, H, W),
                        all-zero where unknown
    metric: one of the kind's metrics (default: the first). `higher_is_better` is read from
    the metric's sense in `spaces.vocabulary.TASK_METRICS`; stating it is allowed only if it agrees.
    unit: regression / depth labels are stored divided by `unit` (to keep losses on one scale);
    metrics are computed after multiplying predictions and labels back.
    """

    name: str
    kind: str
    num_outputs: int
    metric: str | None = None
    higher_is_better: bool | None = None
    unit: float = 1.0

    def __post_init__(self):
        from spaces.errors import PrunefuseError
        from spaces.vocabulary import TASK_KINDS, TASK_METRICS

        if self.kind not in TASK_KINDS:
            raise PrunefuseError(f"task {self.name!r} has kind {self.kind!r}; expected one of: {', '.join(TASK_KINDS)}")
        metric = TASK_KINDS[self.kind][0] if self.metric is None else self.metric
        if metric not in TASK_KINDS[self.kind]:
            raise PrunefuseError(f"task {self.name!r} ({self.kind}) has metric {metric!r}; expected one of: "
                                 f"{', '.join(TASK_KINDS[self.kind])}")
        higher = TASK_METRICS[metric] == "max"
        if self.higher_is_better is not None and bool(self.higher_is_better) != higher:
            raise PrunefuseError(f"task {self.name!r}: higher_is_better={self.higher_is_better} contradicts its "
                                 f"metric {metric!r}, for which {'higher' if higher else 'lower'} is better; "
                                 f"leave it out, it follows the metric")
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "higher_is_better", higher)

    @property
    def sense(self) -> str:
        """"max" or "min": which way this task's metric is better."""
        return "max" if self.higher_is_better else "min"


class Rows(NamedTuple):
    """One batch to read: which rows of a split, and how to augment each (or not).

    Drawn in the reading process from the training loop's seeded generator
    (`DataSplit.plan`), so a batch's contents never depend on which loader worker reads it."""
    rows: torch.Tensor               # (b,) int64 positions in the split
    augment: torch.Tensor | None     # (b, k) the split's own per-row draws; None: the deterministic view


class DataSplit:
    """What training, evaluation and calibration read: a map-style dataset of batches.

    `split[Rows(...)]` -> (rows, x, y): the batch's row positions, its inputs (b, *input_shape)
    and {task: labels (b, ...)}. Read through `mtl_models.suites.reading`, which puts a
    `torch.utils.data.DataLoader` (with `workers` processes) in front of it. `y` holds every
    row's labels in memory (labels are small; inputs need not be)."""

    y: dict[str, torch.Tensor]
    workers: int = 0                 # DataLoader worker processes; 0 reads in the calling process
    eval_rows: int = 1024            # rows a batch when evaluating or predicting (no gradients kept)

    def __len__(self) -> int:
        raise NotImplementedError

    def plan(self, rows: torch.Tensor, generator: torch.Generator | None) -> Rows:
        """The request for `rows`; a training read (`generator` given) may draw augmentation."""
        return Rows(rows, None)

    def __getitem__(self, request: Rows):
        raise NotImplementedError


@dataclass(frozen=True)
class Split(DataSplit):
    """A split held whole in memory (the built-in suites): a batch is `x[rows]`, `y[rows]`."""

    x: torch.Tensor                 # (n, *input_shape) float32, or int64 token ids
    y: dict[str, torch.Tensor]      # task name -> (n,) labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, request: Rows):
        rows = request.rows
        return rows, self.x[rows], {t: y[rows] for t, y in self.y.items()}


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
    def spec(self) -> dict:
        """{"name": ..., **options}: the plain data that rebuilds this suite (`suites.from_spec`)."""
        return suite_spec(self.name, self.options)

    @property
    def senses(self) -> dict[str, str]:
        """task -> "max" / "min", the sense of its metric."""
        return {t.name: t.sense for t in self.tasks}

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
        # the rows read directly (deterministic view): suites.reading builds on this module
        _, x, _ = self.val[self.val.plan(torch.arange(min(batch, len(self.val))), None)]
        reps = -(-batch // len(x))
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()


def check_sizes(suite: str, sizes: dict, bytes_per_row: int, *, low: int = 1) -> None:
    """Split sizes are whole numbers >= `low` whose data fits in a quarter of the memory free
    now: a size with three zeros too many fails here in one line, not in the allocator."""
    import os

    from spaces.errors import PrunefuseError

    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise PrunefuseError(f"{suite} {name}={n!r} is out of range; expected a whole number >= {low}")
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    need = sum(sizes.values()) * bytes_per_row
    if need > free // 4:
        names = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise PrunefuseError(f"{suite} {names} needs about {need / 2**30:.1f} GiB of data; "
                             f"{free / 2**30:.1f} GiB of memory is free (at most a quarter of it is used)")
