"""Choosing a policy from an experiment: by trial id, by knee, or by constraints.

The front is computed over finished, feasible trials (those within the search's per-task
floors, if it had any). Pareto math lives in `reports.pareto`; this module only picks rows.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from spaces.errors import PrunefuseError
from spaces.policy import Policy
from spaces.vocabulary import is_recorded_metric

from . import pareto
from .experiment import load_config, load_dense


def finished(df: pd.DataFrame, objectives) -> pd.DataFrame:
    if df.empty or "status" not in df:
        return df.iloc[0:0]
    done = df[df["status"] == "finished"]
    cols = [name for name, _ in objectives]
    if not set(cols) <= set(done.columns):
        return done.iloc[0:0]
    ok = np.isfinite(done[cols].astype(float).to_numpy()).all(axis=1)
    return done[ok]


def feasible(df: pd.DataFrame, experiment) -> pd.Series:
    """True where every task is within the search's --max-task-drop of the dense base."""
    max_drop = load_config(experiment).get("max_task_drop")
    dense = load_dense(experiment)
    mask = pd.Series(True, index=df.index)
    if max_drop is None or not dense:
        return mask
    for task, ref in dense["dense_val"].items():
        col = f"metric/{task}"
        if col in df:
            mask &= (ref - df[col].astype(float)) * 100.0 <= max_drop + 1e-9
    return mask


def front(df: pd.DataFrame, objectives, experiment) -> pd.DataFrame:
    """The Pareto-optimal rows among finished, feasible trials."""
    done = finished(df, objectives)
    done = done[feasible(done, experiment)]
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
        raise PrunefuseError(f"trial {trial_id} is {row['status']}, not finished: it has no final metrics to export")
    return row


def by_knee(df: pd.DataFrame, objectives, experiment) -> pd.Series:
    """The front point nearest the ideal after normalising each objective over the front
    (see `reports.pareto.knee`)."""
    f = front(df, objectives, experiment)
    if f.empty:
        raise PrunefuseError("no finished (feasible) trial in this experiment yet: nothing to choose from")
    points = f[[n for n, _ in objectives]].astype(float).to_numpy()
    return f.iloc[pareto.knee(points, [s for _, s in objectives])]


def by_constraints(df: pd.DataFrame, objectives, experiment, *, max_params=None, max_latency_ms=None,
                   min_accuracy=None, task_floors: dict | None = None) -> pd.Series:
    """The most accurate front point meeting every limit; if none does, an error listing the nearest."""
    f = front(df, objectives, experiment)
    if f.empty:
        raise PrunefuseError("no finished (feasible) trial in this experiment yet: nothing to choose from")
    limits = []  # (column, bound, sense): violation = how far past the bound, relative
    if max_params is not None:
        limits.append(("params", max_params, "max"))
    if max_latency_ms is not None:
        limits.append(("latency_ms", max_latency_ms, "max"))
    if min_accuracy is not None:
        limits.append(("accuracy", min_accuracy, "min"))
    for task, floor in (task_floors or {}).items():
        if f"metric/{task}" not in f:
            raise PrunefuseError(f"--min-task names task {task!r}, which this experiment does not have")
        limits.append((f"metric/{task}", floor, "min"))

    def violation(row) -> float:
        total = 0.0
        for col, bound, sense in limits:
            over = row[col] - bound if sense == "max" else bound - row[col]
            total += max(0.0, over) / max(abs(bound), 1e-12)
        return total

    v = f.apply(violation, axis=1)
    ok = f[v <= 0]
    if ok.empty:
        nearest = f.assign(_v=v).nsmallest(3, "_v")
        listing = "; ".join(f"{r.trial_id} (accuracy {r.accuracy:.4f}, params {int(r.params):,}, "
                            f"latency {r.latency_ms:.3f} ms)" for r in nearest.itertuples())
        raise PrunefuseError(f"no front point meets the constraints; nearest: {listing}")
    return ok.sort_values("accuracy", ascending=False).iloc[0]


def policy_of(row: pd.Series, experiment, objectives) -> Policy:
    """The trial's policy with provenance: where it came from and what it measured."""
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()
               if is_recorded_metric(k)}
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
    provenance = {"experiment": str(experiment), "trial": row["trial_id"], "metrics": metrics}
    return Policy.from_dict({**row["policy"], "provenance": provenance}, source=f"trial {row['trial_id']}")
