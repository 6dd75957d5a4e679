"""Reading an experiment directory into a DataFrame: one row per trial.

Works on a finished, running or cut-short search: it reads only what Tune and the trials
have written so far (params.json, result.json, error.txt per trial folder), never Ray's
pickled state, so it needs neither Ray nor torch.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd

from spaces.errors import PrunefuseError

from spaces.vocabulary import CONFIG_FILE, DENSE_FILE, FINISHED_FILE, REMEASURED_FILE, is_recorded_metric
STATUS = ("finished", "failed", "stopped", "running")


def experiment_dir(path) -> Path:
    """The experiment as a local folder; a URI (file://, s3://, gs://, ...) is read through pyarrow,
    copied to a local cache first unless it is a local file:// path."""
    p = Path(_local(str(path)))
    if not (p / CONFIG_FILE).is_file():
        hint = " (it exists but is not a prunefuse experiment)" if p.is_dir() else ""
        raise PrunefuseError(f"experiment {str(p)!r} not found{hint}; pass STORAGE/NAME of a prunefuse search")
    return p


@functools.lru_cache(maxsize=8)  # one copy per command, however many readers ask
def _local(path: str) -> str:
    if "://" not in path:
        return path
    if path.startswith("file://"):
        return path[len("file://"):]
    import hashlib
    import os

    from pyarrow import fs as pafs

    target = os.path.join(os.path.expanduser("~"), ".cache", "prunefuse", "experiments",
                          hashlib.sha256(path.encode()).hexdigest()[:16])
    try:
            pafs.copy_files(path, target)
    except (OSError, ValueError) as exc:
        raise PrunefuseError(f"experiment {path!r} cannot be read: {str(exc).splitlines()[0]}") from None
    return target


def _read_json(f: Path):
    try:
        return json.loads(f.read_text())
    except ValueError as exc:
        raise PrunefuseError(f"{f} is not valid JSON ({exc}); is this a prunefuse experiment?") from None


def load_config(path) -> dict:
    return _read_json(experiment_dir(path) / CONFIG_FILE)


def load_dense(path) -> dict | None:
    f = experiment_dir(path) / DENSE_FILE
    return _read_json(f) if f.is_file() else None


def _last_result(trial_dir: Path) -> dict | None:
    f = trial_dir / "result.json"
    if not f.is_file():
        return None
    last = None
    for line in f.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                last = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                break
    return last


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    else:
        out[prefix] = value


def _error_reason(trial_dir: Path) -> str | None:
    f = trial_dir / "error.txt"
    if not f.is_file():
        return None
    lines = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    # Tune's error.txt ends with the exception line, which carries the reason.
    return lines[-1][:300] if lines else "failed"


def load_trial(trial_dir: Path, *, search_over: bool) -> dict | None:
    params = trial_dir / "params.json"
    if not params.is_file():
        return None
    try:
        config = json.loads(params.read_text())
    except ValueError:  # being written or synced right now: the next read will have it
        return None
    result = _last_result(trial_dir) or {}
    error = _error_reason(trial_dir)
    if result.get("final"):
        # A trial retried after an error and then finished is finished; the error was an earlier attempt's.
        status, error = "finished", None
    elif error:
        status = "failed"
    else:
        status = "stopped" if search_over else "running"
    row = {"trial_id": trial_dir.name.removeprefix("trial_"), "status": status, "error": error,
           "node_id": result.get("node_id"), "device": result.get("device"),
           "started": params.stat().st_mtime, "step": result.get("step"), "steps": result.get("steps")}
    for key, value in result.items():
        if is_recorded_metric(key):
            row[key] = value
    row["policy"] = config.get("policy")
    _flatten("policy", config.get("policy", {}), row)
    row.pop("policy/provenance", None)
    return row


def load_experiment(path) -> pd.DataFrame:
    """One row per trial: trial_id, status (finished / failed / stopped / running), node_id,
    device, each metric under its own name, and the policy's knobs under policy/...
    (plus `policy`, the whole policy as a dict). Rows are in the order trials started."""
    exp = experiment_dir(path)
    search_over = (exp / FINISHED_FILE).is_file()
    rows = [r for d in sorted(exp.glob("trial_*")) if d.is_dir()
            if (r := load_trial(d, search_over=search_over)) is not None]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["trial_id", "status", "error", "node_id", "device", "policy"])
    df = df.sort_values("started", kind="stable").reset_index(drop=True)
    return _overlay_remeasured(df, exp)


def _overlay_remeasured(df: pd.DataFrame, exp: Path) -> pd.DataFrame:
    """Latencies from `prunefuse report --remeasure` replace the search's for those trials."""
    f = exp / REMEASURED_FILE
    if not f.is_file() or "latency_ms" not in df:
        return df
    timings = _read_json(f)
    df["latency_ms_search"] = df["latency_ms"]
    hit = df["trial_id"].isin(timings)
    df.loc[hit, "latency_ms"] = df.loc[hit, "trial_id"].map(timings)
    return df


def objectives(path) -> list[tuple[str, str]]:
    return [tuple(o) for o in load_config(path)["objectives"]]
