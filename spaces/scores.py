"""The oriented task score, and the per-task floors built on it: one definition for all.

A task's score is its metric's relative change against a reference (the dense base), in
percent, signed so that higher is better whatever the metric's sense (as Δm does; Maninis
et al. 2019): 0 is the reference, −2 is 2 % worse. The mean over tasks is the `score`
objective; a floor of P points means no task's score may fall below −P. The search's
Optuna constraints (`search.optuna_search.TaskFloors`) and export's feasibility
(`reports.select.feasible`) both call `floor_violations`, so they cannot disagree.
Imports nothing heavy: trials, the CLI and the report all use it.
"""
from __future__ import annotations

import math

from .vocabulary import TASK_METRIC, TASK_METRICS


def sense_of(metric: str) -> str:
    """"max" or "min" for a task metric name (`spaces.vocabulary.TASK_METRICS`)."""
    from .errors import unknown_name

    if metric not in TASK_METRICS:
        raise unknown_name("task metric", metric, TASK_METRICS)
    return TASK_METRICS[metric]


def task_score(value: float, reference: float, sense: str) -> float:
    """Percent change of `value` against `reference`, positive where it is better."""
    sign = 1.0 if sense == "max" else -1.0
    return sign * (value - reference) / max(abs(reference), 1e-12) * 100.0


def task_scores(values: dict[str, float], references: dict[str, float], senses: dict[str, str]) -> dict[str, float]:
    """task -> its oriented score, for every task of `references`."""
    return {t: task_score(values[t], ref, senses.get(t, "max")) for t, ref in references.items()}


def mean_score(values: dict[str, float], references: dict[str, float], senses: dict[str, str]) -> float:
    """Mean oriented score over the tasks (Δm% against `references`)."""
    scores = task_scores(values, references, senses)
    return sum(scores.values()) / len(scores)


def floor_violations(metrics: dict, references: dict[str, float], senses: dict[str, str],
                     max_drop: float) -> list[float]:
    """Per task (in `references` order): how far its score is below −max_drop; <= 0 is feasible.

    `metrics` is a trial's result (task metrics under `metric/<task>`); a task that is missing
    or not finite counts as infinitely far below its floor."""
    out = []
    for task, ref in references.items():
        value = metrics.get(f"{TASK_METRIC}{task}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            out.append(math.inf)
            continue
        out.append(-task_score(value, ref, senses.get(task, "max")) - max_drop)
    return out


def within_floors(metrics: dict, references: dict[str, float], senses: dict[str, str], max_drop: float) -> bool:
    """True where every task is within `max_drop` points (percent of the reference) of it."""
    return all(v <= 1e-9 for v in floor_violations(metrics, references, senses, max_drop))
