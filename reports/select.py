"""Choosing a policy from an experiment: by trial id, by knee, or by constraints.

The front is computed over finished, feasible trials (those within the search's per-task
floors, if it had any). Pareto math lives in `reports.pareto`; this module only picks rows
and reads no file itself: `experiment` is the experiment's records
(`reports.experiment.records`, read once by the caller) or a path they are read from.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd

from spaces.errors import PrunefuseError
from spaces.policy import Policy
from spaces.scores import within_floors
from spaces.vocabulary import MEAN_SCORE, TASK_METRIC, is_recorded_metric

from . import pareto
from .experiment import Records, records


def finished(df: pd.DataFrame, objectives) -> pd.DataFrame:
    if df.empty or "status" not in df:
        return df.iloc[0:0]
    done = df[df["status"] == "finished"]
    cols = [name for name, _ in objectives]
    if not set(cols) <= set(done.columns):
        return done.iloc[0:0]
    ok = np.isfinite(done[cols].astype(float).to_numpy()).all(axis=1)
    return done[ok]


# What per-task floors are measured against: the dense base (the default: the search's own
# Optuna constraints were computed against it, so export agrees with what the search kept
# feasible), or the equal-budget dense control (the base fine-tuned as every trial is: what
# compression itself costs, with no credit for the trials' extra training).
FLOOR_REFERENCES = ("dense", "control")


def floor_references(experiment, against: str = "dense") -> dict[str, float] | None:
    """task -> the reference metric floors are measured from, or None if it was not recorded."""
    if against not in FLOOR_REFERENCES:
        raise PrunefuseError(f"floors against {against!r}: expected one of {', '.join(FLOOR_REFERENCES)}")
    rec = records(experiment)
    if against == "dense":
        return (rec.dense or {}).get("dense_val")
    control = rec.control
    if control is None:
        raise PrunefuseError("this experiment has no dense control (control.json; searches before it existed): "
                             "measure floors against the dense base")
    return {k.removeprefix(TASK_METRIC): v for k, v in control.items() if k.startswith(TASK_METRIC)}


def feasible(df: pd.DataFrame, experiment, floors: tuple | None = None) -> pd.Series:
    """True where every task is within the search's --max-task-drop of the dense base
    (`spaces.scores.within_floors`, the rule the search's constraints follow); `floors`
    = (max_drop, "dense" | "control") measures that instead."""
    rec = records(experiment)
    max_drop, against = floors or (rec.config.get("max_task_drop"), "dense")
    refs = floor_references(rec, against) if max_drop is not None else None
    if max_drop is None or not refs or df.empty:
        return pd.Series(True, index=df.index)
    senses = rec.senses
    refs = {t: r for t, r in refs.items() if f"{TASK_METRIC}{t}" in df}
    return df.apply(lambda row: within_floors(row.to_dict(), refs, senses, max_drop), axis=1).astype(bool)


def front(df: pd.DataFrame, objectives, experiment, floors: tuple | None = None) -> pd.DataFrame:
    """The Pareto-optimal rows among finished, feasible trials (`feasible`'s floors)."""
    done = finished(df, objectives)
    done = done[feasible(done, records(experiment), floors)]
    if done.empty:
        return done
    points = done[[n for n, _ in objectives]].astype(float).to_numpy()
    return done[pareto.pareto_front(points, [s for _, s in objectives])]


def by_trial(df: pd.DataFrame, trial_id: str) -> pd.Series:
    hit = df[df["trial_id"] == trial_id]
    if hit.empty:
        some = ", ".join(df["trial_id"].head(8)) if not df.empty else "none"
        raise PrunefuseError(f"no trial {trial_id!r} in this experiment; trials include: {some}")
    row = hit.iloc[0]
    if row["status"] != "finished":
        why = f" ({row['error']})" if isinstance(row.get("error"), str) else ""
        raise PrunefuseError(f"trial {trial_id} is {row['status']}{why}, not finished: it has no final metrics to export")
    return row


def by_knee(df: pd.DataFrame, objectives, experiment, floors: tuple | None = None) -> pd.Series:
    """The front point nearest the ideal after normalising each objective over the front
    (see `reports.pareto.knee`)."""
    f = front(df, objectives, records(experiment), floors)
    if f.empty:
        raise PrunefuseError("no finished (feasible) trial in this experiment yet: nothing to choose from")
    points = f[[n for n, _ in objectives]].astype(float).to_numpy()
    return f.iloc[pareto.knee(points, [s for _, s in objectives])]


def by_constraints(df: pd.DataFrame, objectives, experiment, *, max_params=None, max_latency_ms=None,
                   min_score=None, task_floors: dict | None = None, floors: tuple | None = None) -> pd.Series:
    """The best-scoring front point meeting every limit; if none does, an error listing the nearest.

    `task_floors` bound each task's metric on its side: a floor where higher is better, a
    ceiling where lower is (an error metric)."""
    rec = records(experiment)
    f = front(df, objectives, rec, floors)
    if f.empty:
        raise PrunefuseError("no finished (feasible) trial in this experiment yet: nothing to choose from")
    limits = []  # (column, bound, sense): violation = how far past the bound, relative
    if max_params is not None:
        limits.append(("params", max_params, "max"))
    if max_latency_ms is not None:
        limits.append(("latency_ms", max_latency_ms, "max"))
    if min_score is not None:
        limits.append((MEAN_SCORE, min_score, "min"))
    senses = rec.senses
    for task, bound in (task_floors or {}).items():
        if f"{TASK_METRIC}{task}" not in f:
            raise PrunefuseError(f"--min-task names task {task!r}, which this experiment does not have")
        limits.append((f"{TASK_METRIC}{task}", bound, "max" if senses.get(task, "max") == "min" else "min"))

    def violation(row) -> float:
        total = 0.0
        for col, bound, sense in limits:
            over = row[col] - bound if sense == "max" else bound - row[col]
            total += max(0.0, over) / max(abs(bound), 1.0 if col == MEAN_SCORE else 1e-12)
        return total

    v = f.apply(violation, axis=1)
    ok = f[v <= 0]
    if ok.empty:
        nearest = f.assign(_v=v).nsmallest(3, "_v")
        listing = "; ".join(f"{r['trial_id']} (score {r[MEAN_SCORE]:+.2f}, params {int(r['params']):,}, "
                            f"latency {r['latency_ms']:.3f} ms)" for _, r in nearest.iterrows())
        raise PrunefuseError(f"no front point meets the constraints; nearest: {listing}")
    return ok.sort_values(MEAN_SCORE, ascending=False).iloc[0]


def policy_of(row: pd.Series, experiment, objectives) -> Policy:
    """The trial's policy with provenance: where it came from and what it measured."""
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()
               if is_recorded_metric(k)}
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
    where = experiment.path if isinstance(experiment, Records) else str(experiment)
    if "://" not in where:  # absolute: `apply` finds the search's cached base from any folder
        where = os.path.abspath(where)
    provenance = {"experiment": where, "trial": row["trial_id"], "metrics": metrics}
    return Policy.from_dict({**row["policy"], "provenance": provenance}, source=f"trial {row['trial_id']}")
