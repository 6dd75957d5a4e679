"""Reading a split in batches: the one path training, evaluation and calibration take.

Every split (`base.DataSplit`) is read through a `torch.utils.data.DataLoader` that is handed
whole batch requests (`base.Rows`) as its "indices" (`batch_size=None`): the requests, and
any augmentation they carry, are drawn here in the reading process from the caller's seeded
generator, and the split (in a loader worker when it has `workers`) turns each into a
batch. So the same seed gives the same batches whatever the number of workers, and an
in-memory split read with no workers gives exactly `x[rows]`, as indexing it directly would.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import torch

from .base import DataSplit, Rows

# Overrides every split's own number of loader workers (0: read in the calling process).
WORKERS_ENV = "PRUNEFUSE_LOADER_WORKERS"


def loader_workers(split: DataSplit) -> int:
    value = os.environ.get(WORKERS_ENV)
    if value is None or not value.strip():
        return int(split.workers)
    try:
        return max(0, int(value))
    except ValueError:
        from spaces.errors import PrunefuseError

        raise PrunefuseError(f"{WORKERS_ENV}={value!r}: expected a whole number of loader workers") from None


def read(split: DataSplit, requests: Iterable[Rows], *, pin: bool = False) -> Iterator[tuple]:
    """(rows, x, y) for each request, in order: through a DataLoader over the split."""
    from torch.utils.data import DataLoader

    workers = loader_workers(split)
    loader = DataLoader(split, batch_size=None, sampler=requests, num_workers=workers,
                        pin_memory=pin and workers > 0, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    return iter(loader)


def shuffled(split: DataSplit, *, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Rows]:
    """`steps` training requests: each epoch a fresh permutation drawn from `generator`, cut into
    batches (the last one short), each planned by the split (which may draw augmentation)."""
    n, step = len(split), 0
    while step < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield split.plan(order[start:start + batch_size], generator)
            step += 1
            if step >= steps:
                return


def in_order(split: DataSplit, *, batch_size: int, rows: int | None = None) -> Iterator[Rows]:
    """Requests for the first `rows` rows (all by default) in order, deterministic view."""
    n = len(split) if rows is None else min(rows, len(split))
    for start in range(0, n, batch_size):
        yield split.plan(torch.arange(start, min(start + batch_size, n)), None)


def first_rows(split: DataSplit, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x, y) of the split's first `n` rows (fewer if it has fewer), deterministic view:
    calibration data, examples for tracing and timing."""
    _, x, y = split[next(in_order(split, batch_size=max(1, n), rows=n))]
    return x, y


@torch.no_grad()
def predict_split(model, split: DataSplit, *, device: str = "cpu", batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The model's outputs on every row of the split, in row order (on the CPU), `batch_size`
    rows at a time (default: the split's `eval_rows`)."""
    model.to(device).eval()
    requests = in_order(split, batch_size=batch_size or split.eval_rows)
    chunks = [model(x.to(device)) for _, x, _ in read(split, requests)]
    return {t: torch.cat([c[t] for c in chunks]).cpu() for t in chunks[0]}
