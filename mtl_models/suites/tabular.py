"""tabular: a user's CSV or Parquet file with several label columns.

    prunefuse search --suite tabular --data customers.csv --features age,plan,region \
        --task churn:classification:churned --task spend:regression:monthly_spend \
        --task products:multilabel:has_card,has_loan,has_savings

Features: numeric columns standardised with the training split's statistics, categorical
(non-numeric) columns one-hot with the training split's categories (a category first seen
in validation or test rows encodes as all zeros). Tasks are given as
`NAME:classification|regression:COLUMN` or `NAME:multilabel:COL1,COL2,...`; a classification
label may be any values (its sorted distinct values are the classes), a regression label must
be numeric and is learned standardised (scored by R²), a multi-label task has one 0/1 (or
true/false) column per label (binary cross-entropy, scored by mean per-label accuracy).
Splits are seeded 70 / 15 / 15 over the rows.

Everything a user can get wrong about the file (a missing column, a missing value, text in a
numeric column) is a one-line `PrunefuseError` naming the column. The file's SHA-256 is
recorded in the suite's options (`data_sha256`), so a policy applied after the file changed
fails clearly instead of silently using other data, and cached bases are keyed by content.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from spaces.errors import PrunefuseError

from .base import Split, Task, TaskSuite

KINDS = ("classification", "regression", "multilabel")
MIN_ROWS = 20
TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _read(path: str):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise PrunefuseError(f"data file {path!r} not found")
    suffix = p.suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv", ".txt"):
        raise PrunefuseError(f"data file {path!r}: expected a .csv or .parquet file")
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunefuseError(f"cannot read {path!r}: {first}") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_task(spec: str) -> tuple[str, str, list[str]]:
    """`NAME:KIND:COLUMN` (or `NAME:multilabel:COL1,COL2,...`) -> (name, kind, label columns)."""
    parts = str(spec).split(":")
    if len(parts) != 3 or not all(parts):
        raise PrunefuseError(f"--task {spec!r}: expected NAME:KIND:COLUMN, e.g. churn:classification:churned "
                             f"(or NAME:multilabel:COL1,COL2,...)")
    name, kind, column = parts
    if kind not in KINDS:
        raise PrunefuseError(f"--task {spec!r}: kind {kind!r} is not one of: {', '.join(KINDS)}")
    _check_task_name(name, spec)
    columns = [c.strip() for c in column.split(",")] if kind == "multilabel" else [column]
    if not all(columns):
        raise PrunefuseError(f"--task {spec!r}: an empty column name in {column!r}")
    if len(set(columns)) != len(columns):
        raise PrunefuseError(f"--task {spec!r}: a label column is named twice")
    if kind == "multilabel" and len(columns) < 2:
        raise PrunefuseError(f"--task {spec!r}: a multilabel task needs two or more columns, e.g. "
                             f"{name}:multilabel:a,b; one 0/1 column is {name}:classification:{column}")
    return name, kind, columns


def _check_task_name(name: str, spec: str) -> None:
    # A task name is a key of the model's `heads` ModuleDict and of `metric/<task>` columns.
    from torch import nn

    if not TASK_NAME.match(name):
        raise PrunefuseError(f"--task {spec!r}: task name {name!r} must be letters, digits and _ "
                             f"(not starting with a digit)")
    if hasattr(nn.ModuleDict(), name):
        raise PrunefuseError(f"--task {spec!r}: task name {name!r} is reserved (a torch ModuleDict attribute); "
                             f"choose another")


def _row(position: int) -> str:
    """A row as the user counts it: the data row number, 0-based (the header is not a row)."""
    return f"row {position}"


def _check_column(df, column: str, what: str) -> None:
    if column not in df.columns:
        shown = ", ".join(map(str, list(df.columns)[:30])) + (", ..." if len(df.columns) > 30 else "")
        raise PrunefuseError(f"{what} column {column!r} does not exist; columns: {shown}")
    isna = df[column].isna().to_numpy()
    if isna.any():
        first = int(np.flatnonzero(isna)[0])
        raise PrunefuseError(f"{what} column {column!r} has {int(isna.sum())} missing value(s) "
                             f"(first at {_row(first)}); fill or drop them first")


def _is_numeric(values) -> bool:
    import pandas as pd

    return pd.api.types.is_bool_dtype(values) or pd.api.types.is_numeric_dtype(values)


def _numbers(df, column: str, what: str, why: str) -> np.ndarray:
    """The column as float64, or an error naming the first value that is not a finite number."""
    import pandas as pd

    values = df[column]
    if _is_numeric(values):
        v = values.astype(np.float64).to_numpy()
    else:  # text: fine only if every value reads as a number ("3.5" in a string-typed column)
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(v).any():
            bad = int(np.flatnonzero(np.isnan(v))[0])
            raise PrunefuseError(f"{what} column {column!r} {why}, but it holds text: {values.iloc[bad]!r} "
                                 f"at {_row(bad)}")
    finite = np.isfinite(v)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise PrunefuseError(f"{what} column {column!r} holds {v[bad]} at {_row(bad)}; "
                             f"expected finite numbers")
    return v


def _encode_features(df, features, train_idx):
    import pandas as pd

    blocks = []
    for col in features:
        values = df[col]
        if _is_numeric(values):
            v = _numbers(df, col, "feature", "is numeric")
            mean, std = v[train_idx].mean(), v[train_idx].std()
            blocks.append(((v - mean) / (std if std > 0 else 1.0))[:, None])
            continue
        # Text. A column of numbers with a few stray entries ("?", "1,234") is a numeric column
        # the file got wrong, not a category per value: say so instead of one-hot encoding it.
        parsed = pd.to_numeric(values, errors="coerce").to_numpy()
        ok = ~np.isnan(parsed)
        if ok.mean() >= 0.5 and not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise PrunefuseError(f"feature column {col!r} looks numeric but holds text: {values.iloc[bad]!r} "
                                 f"at {_row(bad)}; fix those values (or make the column fully categorical)")
        text = values.astype(str).to_numpy()
        cats = sorted(set(text[train_idx]))
        limit = max(50, len(train_idx) // 2)
        if len(cats) > limit:
            raise PrunefuseError(f"feature column {col!r} is categorical with {len(cats)} distinct values in "
                                 f"{len(train_idx)} training rows (an id?); one-hot encoding it cannot generalise: "
                                 f"drop it or encode it as numbers first")
        blocks.append((text[:, None] == np.array(cats)[None, :]).astype(np.float64))
    return np.concatenate(blocks, axis=1).astype(np.float32)


def _binary(df, column: str, name: str) -> np.ndarray:
    """A multi-label column as 0.0 / 1.0: booleans, or numbers that are all 0 or 1."""
    values = df[column]
    if not _is_numeric(values):
        raise PrunefuseError(f"task {name!r}: label column {column!r} holds text ({values.iloc[0]!r} at {_row(0)}); "
                             f"a multilabel column holds 0/1 or true/false")
    v = values.astype(np.float64).to_numpy()
    bad = ~np.isin(v, (0.0, 1.0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise PrunefuseError(f"task {name!r}: label column {column!r} holds {v[first]:g} at {_row(first)}; "
                             f"a multilabel column holds 0/1 or true/false")
    return v.astype(np.float32)


def _encode_label(df, name, kind, columns, train_idx):
    import pandas as pd

    if kind == "multilabel":
        y = np.stack([_binary(df, c, name) for c in columns], axis=1)
        return Task(name, kind, len(columns)), torch.from_numpy(y)
    column = columns[0]
    values = df[column]
    if kind == "classification":
        numeric = _is_numeric(values)
        classes = sorted(values.unique().tolist(), key=(float if numeric else str))
        if len(classes) < 2:
            raise PrunefuseError(f"task {name!r}: label column {column!r} has one class only; nothing to classify")
        if len(classes) > max(2, len(df) // 2):
            raise PrunefuseError(f"task {name!r} is a classification, but label column {column!r} has "
                                 f"{len(classes)} distinct values in {len(df)} rows; did you mean "
                                 f"{name}:regression:{column}?")
        codes = pd.Categorical(values, categories=classes).codes.astype(np.int64)
        return Task(name, kind, len(classes)), torch.from_numpy(codes)
    v = _numbers(df, column, f"label (task {name!r})", "is a regression target")
    mean, std = v[train_idx].mean(), v[train_idx].std()
    std = float(std) if std > 0 else 1.0
    # Labels are learned standardised; R² does not care about the shift, `unit` restores the scale.
    return Task(name, kind, 1, metric="r2", unit=std), torch.from_numpy(((v - mean) / std).astype(np.float32))


def parse_tasks(tasks, suite: str) -> list[tuple[str, str, list[str]]]:
    """Every `--task` parsed, with unique names; at least one."""
    if isinstance(tasks, str):
        tasks = [tasks]
    parsed = [parse_task(t) for t in list(tasks or [])]
    if not parsed:
        raise PrunefuseError(f"--suite {suite} needs at least one --task NAME:KIND:COLUMN")
    names = [p[0] for p in parsed]
    if len(set(names)) != len(names):
        raise PrunefuseError(f"task names must be unique; got {', '.join(names)}")
    return parsed


def checked_digest(path: str, expected: str | None, digest: str | None = None) -> str:
    """The file's SHA-256 (or `digest`, computed elsewhere); when a policy recorded one
    (`expected`), it must match: a policy is applied to the data it was searched on, or not at all."""
    digest = digest or file_sha256(path)
    if expected is not None and expected != digest:
        raise PrunefuseError(f"data file {path!r} has changed since the policy was made "
                             f"(sha256 {digest[:12]}..., the policy expects {str(expected)[:12]}...)")
    return digest


def check_label_columns(df, parsed, *, taken=(), taken_as: str = "a feature") -> None:
    """Every label column exists, has no missing value and is not also an input column (`taken`)."""
    for name, _, cols in parsed:
        for col in cols:
            if col in taken:
                raise PrunefuseError(f"column {col!r} is both {taken_as} and task {name!r}'s label")
            _check_column(df, col, f"label (task {name!r})")


def split_rows(n: int, seed: int, path: str) -> dict[str, np.ndarray]:
    """Row positions of the seeded 70 / 15 / 15 train / val / test split of n rows."""
    if n < MIN_ROWS:
        raise PrunefuseError(f"data file {path!r} has {n} rows; need at least {MIN_ROWS} to split 70/15/15")
    order = np.random.default_rng(seed).permutation(n)
    cut1, cut2 = int(0.7 * n), int(0.85 * n)
    return {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}


def encode_labels(df, parsed, train_idx) -> tuple[tuple[Task, ...], dict[str, torch.Tensor]]:
    """The suite's tasks and each task's labels over all rows (regression scaled by the training rows)."""
    encoded = [_encode_label(df, name, kind, col, train_idx) for name, kind, col in parsed]
    return tuple(t for t, _ in encoded), {t.name: y for t, y in encoded}


def make_tabular(*, path: str, features: list, tasks: list, seed: int = 0,
                 data_sha256: str | None = None) -> TaskSuite:
    """The suite of a CSV / Parquet file. `data_sha256`, when given (a policy's suite spec),
    must match the file: a policy is applied to the data it was searched on, or not at all."""
    if isinstance(features, str):
        features = [c.strip() for c in features.split(",") if c.strip()]
    if isinstance(tasks, str):
        tasks = [tasks]
    features, tasks = list(features or []), list(tasks or [])
    if not features:
        raise PrunefuseError("--features needs at least one column")
    dupes = sorted({c for c in features if features.count(c) > 1})
    if dupes:
        raise PrunefuseError(f"--features names column {dupes[0]!r} more than once")
    parsed = parse_tasks(tasks, "tabular")
    path = os.path.abspath(str(path))
    df = _read(path)
    digest = checked_digest(path, data_sha256)
    for col in features:
        _check_column(df, col, "feature")
    check_label_columns(df, parsed, taken=features)
    df = df.reset_index(drop=True)
    parts = split_rows(len(df), seed, path)
    x = torch.from_numpy(_encode_features(df, features, parts["train"]))
    suite_tasks, labels = encode_labels(df, parsed, parts["train"])
    splits = {k: Split(x[idx], {n: y[idx] for n, y in labels.items()}) for k, idx in parts.items()}
    options = dict(path=path, features=features, tasks=[str(t) for t in tasks], seed=seed, data_sha256=digest)
    return TaskSuite("tabular", options, suite_tasks, splits["train"], splits["val"], splits["test"],
                     input_shape=(x.shape[1],))
