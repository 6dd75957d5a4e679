"""tabular: a user's CSV or Parquet file with several label columns.

Features: numeric columns standardised with the training split's statistics, categorical
(non-numeric) columns one-hot with the training split's categories. Tasks are given as
`NAME:classification|regression:COLUMN`. Splits are seeded 70 / 15 / 15.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spaces.errors import PrunefuseError

from .base import Split, Task, TaskSuite

KINDS = ("classification", "regression")


def _read(path: str):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise PrunefuseError(f"data file {path!r} not found")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        if p.suffix.lower() in (".csv", ".txt"):
            return pd.read_csv(p)
    except Exception as exc:
        raise PrunefuseError(f"cannot read {path!r}: {str(exc).splitlines()[0]}") from None
    raise PrunefuseError(f"data file {path!r}: expected a .csv or .parquet file")


def parse_task(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts):
        raise PrunefuseError(f"--task {spec!r}: expected NAME:KIND:COLUMN, e.g. churn:classification:churned")
    if parts[1] not in KINDS:
        raise PrunefuseError(f"--task {spec!r}: kind {parts[1]!r} is not one of: {', '.join(KINDS)}")
    return parts[0], parts[1], parts[2]


def _check_column(df, column: str, what: str) -> None:
    if column not in df.columns:
        raise PrunefuseError(f"{what} column {column!r} does not exist; columns: {', '.join(map(str, df.columns))}")
    missing = int(df[column].isna().sum())
    if missing:
        raise PrunefuseError(f"{what} column {column!r} has {missing} missing value(s); fill or drop them first")


def _encode_features(df, features, train_idx):
    import pandas as pd

    blocks = []
    for col in features:
        values = df[col]
        if pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values):
            v = values.astype(np.float64).to_numpy()
            mean, std = v[train_idx].mean(), v[train_idx].std() or 1.0
            blocks.append(((v - mean) / std)[:, None])
        else:
            cats = sorted(values.iloc[train_idx].astype(str).unique())
            blocks.append((values.astype(str).to_numpy()[:, None] == np.array(cats)[None, :]).astype(np.float64))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _encode_label(df, name, kind, column, train_idx):
    import pandas as pd

    values = df[column]
    if kind == "classification":
        classes = sorted(values.unique().tolist(), key=str)
        if len(classes) < 2:
            raise PrunefuseError(f"task {name!r}: label column {column!r} has one class only; nothing to classify")
        index = {c: i for i, c in enumerate(classes)}
        return Task(name, kind, len(classes)), torch.tensor([index[v] for v in values], dtype=torch.long)
    if not pd.api.types.is_numeric_dtype(values):
        raise PrunefuseError(f"task {name!r} is a regression, but label column {column!r} is not numeric "
                             f"(e.g. {values.iloc[0]!r})")
    v = values.astype(np.float64).to_numpy()
    mean, std = v[train_idx].mean(), v[train_idx].std() or 1.0
    # Labels are learned standardised; R² does not care about the shift, `unit` restores the scale.
    return Task(name, kind, 1, metric="r2", unit=float(std)), torch.from_numpy(((v - mean) / std).astype(np.float32))


def make_tabular(*, path: str, features: list, tasks: list, seed: int = 0) -> TaskSuite:
    df = _read(path)
    if not features:
        raise PrunefuseError("--features needs at least one column")
    parsed = [parse_task(t) for t in tasks]
    if not parsed:
        raise PrunefuseError("--suite tabular needs at least one --task NAME:KIND:COLUMN")
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise PrunefuseError(f"task names must be unique; got {', '.join(names)}")
    for col in features:
        _check_column(df, col, "feature")
    for name, _, col in parsed:
        _check_column(df, col, f"label (task {name!r})")
        if col in features:
            raise PrunefuseError(f"column {col!r} is both a feature and task {name!r}'s label")
    if len(df) < 20:
        raise PrunefuseError(f"data file {path!r} has {len(df)} rows; need at least 20 to split 70/15/15")
    order = np.random.default_rng(seed).permutation(len(df))
    cut1, cut2 = int(0.7 * len(df)), int(0.85 * len(df))
    parts = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    x = torch.from_numpy(_encode_features(df, features, parts["train"]))
    encoded = [_encode_label(df, name, kind, col, parts["train"]) for name, kind, col in parsed]
    suite_tasks = tuple(t for t, _ in encoded)
    labels = {t.name: y for t, y in encoded}
    splits = {k: Split(x[idx], {n: y[idx] for n, y in labels.items()}) for k, idx in parts.items()}
    options = dict(path=str(path), features=list(features), tasks=list(tasks), seed=seed)
    return TaskSuite("tabular", options, suite_tasks, splits["train"], splits["val"], splits["test"],
                     input_shape=(x.shape[1],))
