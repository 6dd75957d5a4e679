"""Small helpers the benchmark scripts share: markdown tables, policies, seeding, timing.

Benchmarks run as `python benchmarks/<name>.py`; they call the library's public functions
(artifacts.prepare, pipeline.start_model, train.train / evaluate, measure.delta_m) and only
format what those return.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from spaces.vocabulary import POLICY_SCHEMA


def setup_threads(threads: int) -> None:
    """Pin torch's intra-op threads: benchmarks share a small machine with other work."""
    torch.set_num_threads(threads)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def stdev(values) -> float:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; every cell is str()-ed as given."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_table(goals: list[tuple[str, bool, str]]) -> str:
    """goals: (goal, met, evidence) -> a markdown table with a met / not met column."""
    return markdown_table(["goal", "status", "evidence"],
                          [[g, "met" if ok else "**not met**", ev] for g, ok, ev in goals])


def policy_for(suite, artifacts, *, fusion=None, weighting=None, seed: int = 0):
    """A policy that only starts a model: no pruning (empty sparsity), no fine-tune."""
    from spaces import Policy

    return Policy.from_dict({
        "schema": POLICY_SCHEMA, "suite": suite.spec, "model": dict(artifacts.model),
        "weighting": weighting or {"method": "equal"}, "fusion": fusion,
        "pruning": {"sparsity": {}}, "finetune": {"epochs": 0.0}, "seed": seed,
    }, source="benchmark policy")


@contextmanager
def stopwatch(label: str, log=print):
    start = time.perf_counter()
    yield
    log(f"[{label}: {time.perf_counter() - start:.1f} s]")
