"""Reading an experiment directory into a DataFrame: one row per trial.

Works on a finished, running or cut-short search: it reads only what Tune and the trials
have written so far (params.json, result.json, error.txt per trial folder), never Ray's
pickled state, so it needs neither Ray nor torch.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spaces.errors import PrunefuseError
from spaces.policy import with_learned_fusion

from spaces.vocabulary import (CARRIED_FILE, CONFIG_FILE, CONTROL_FILE, DENSE_FILE, RECIPES_FILE, FINAL_FILE, FINISHED_FILE, REMEASURED_FILE,
                               LEARNED_FUSION, is_recorded_metric)
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
    if not f.is_file():
        return None
    dense = _read_json(f)
    timings = remeasured(path)
    if isinstance(dense, dict) and "dense" in timings:
        # the front's re-timing (end of search, `report --remeasure`) times the dense base with it ("dense")
        dense.update(latency_ms_search=dense.get("latency_ms"), latency_ms=timings["dense"])
    return dense


def load_control(path) -> dict | None:
    """The equal-budget dense control's metrics (control.json), or None (an older experiment)."""
    f = experiment_dir(path) / CONTROL_FILE
    return _read_json(f) if f.is_file() else None


def load_recipes(path) -> dict | None:
    """The standard merges of a user's experts (recipes.json: name -> metrics), or None (no --experts)."""
    f = experiment_dir(path) / RECIPES_FILE
    return _read_json(f) if f.is_file() else None


def task_senses(path) -> dict[str, str]:
    """task -> "max" / "min" as the search recorded them (dense.json); "max" where not recorded."""
    return records(path).senses


@dataclass(frozen=True)
class Records:
    """An experiment's own files besides its trials, read once: what choosing a policy and
    drawing the report need (the search's config, the dense base, the dense control)."""
    path: str
    config: dict
    dense: dict | None
    control: dict | None
    recipes: dict | None = None   # recipes.json: task arithmetic and TIES on a user's experts

    @property
    def senses(self) -> dict[str, str]:
        dense = self.dense or {}
        return {t: (dense.get("senses") or {}).get(t, "max") for t in dense.get("dense_val", {})}


def records(experiment) -> Records:
    """The experiment's records (an experiment path, or records already read: passed through)."""
    if isinstance(experiment, Records):
        return experiment
    return Records(str(experiment), load_config(experiment), load_dense(experiment), load_control(experiment),
                   load_recipes(experiment))


class _Unreadable(Exception):
    """A trial file that cannot be read: the trial is shown as failed, 'unreadable: why'."""


def _text(f: Path) -> str:
    try:
        data = f.read_bytes()
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unreadable(f"{f.name} is not text (binary content)") from None
    except OSError as exc:
        raise _Unreadable(f"{f.name} cannot be read ({exc.strerror or exc})") from None


def _last_result(trial_dir: Path, *, search_over: bool) -> dict | None:
    """The last row of result.json, overlaid by final.json (the trial's own final result,
    written before Tune's row: a driver killed in between leaves only final.json)."""
    f = trial_dir / "result.json"
    last = None
    if f.is_file():
        lines = [line.strip() for line in _text(f).splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i < len(lines) - 1 or search_over or i == 0 and len(lines) == 1 and _settled(f):
                    raise _Unreadable(f"result.json line {i + 1} is not JSON") from None
                break  # the last line being written right now
            if not isinstance(row, dict):
                raise _Unreadable(f"result.json line {i + 1} is not a JSON object")
            last = row
    final = trial_dir / FINAL_FILE
    if final.is_file():
        try:
            done = json.loads(_text(final))
        except ValueError:
            raise _Unreadable(f"{FINAL_FILE} is not JSON") from None
        if isinstance(done, dict) and done.get("final"):
            last = {**(last or {}), **done}
    return last


def _settled(f: Path, age_s: float = 30.0) -> bool:
    """Written long enough ago that a partial content is damage, not a write in progress."""
    import time

    try:
        return time.time() - f.stat().st_mtime > age_s
    except OSError:
        return True


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
    try:
        lines = [ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError as exc:
        return f"error.txt cannot be read ({exc.strerror or exc})"
    # Tune's error.txt ends with the exception line, which carries the reason.
    return lines[-1][:300] if lines else "failed"


def load_trial(trial_dir: Path, *, search_over: bool) -> dict | None:
    params = trial_dir / "params.json"
    if not params.is_file() and not (trial_dir / FINAL_FILE).is_file():
        return None
    try:
        config = None
        if params.is_file():
            try:
                config = json.loads(_text(params))
            except ValueError:
                if not search_over and not _settled(params):
                    return None  # being written or synced right now: the next read will have it
                raise _Unreadable("params.json is not JSON") from None
        result = _last_result(trial_dir, search_over=search_over) or {}
        # A driver killed before Tune synced the trial's folder leaves only final.json, which
        # carries the trial's config too.
        carried_config = result.pop("config", None)
        config = config if config is not None else carried_config
        if not isinstance(config, dict):
            raise _Unreadable("params.json is missing or not a JSON object")
    except _Unreadable as exc:
        return _unreadable_row(trial_dir, str(exc))
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
           "started": (params if params.is_file() else trial_dir / FINAL_FILE).stat().st_mtime,
           "step": result.get("step"), "steps": result.get("steps")}
    for key, value in dict(result).items():
        if is_recorded_metric(key):
            row[key] = value
    carried = trial_dir / CARRIED_FILE  # --warm-start: a trial of an earlier experiment, carried over
    if carried.is_file():
        try:
            row["carried_from"] = str(json.loads(_text(carried)).get("from"))
        except (ValueError, AttributeError, _Unreadable):
            row["carried_from"] = "an earlier experiment"
    row["policy"] = with_learned_fusion(config.get("policy"), result.get(LEARNED_FUSION))
    _flatten("policy", row["policy"] or {}, row)
    row.pop("policy/provenance", None)
    return row


def _unreadable_row(trial_dir: Path, why: str) -> dict:
    try:
        started = trial_dir.stat().st_mtime
    except OSError:
        started = 0.0
    return {"trial_id": trial_dir.name.removeprefix("trial_"), "status": "failed", "error": f"unreadable: {why}",
            "node_id": None, "device": None, "started": started, "step": None, "steps": None, "policy": None}


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


def unreadable_note(df: pd.DataFrame) -> str | None:
    """One line naming the trials whose files could not be read (a truncated result.json, a
    binary params.json): they count as failed, so a front or a knee is chosen without them,
    and whoever exports must be told. None when every trial was read."""
    if df.empty or "error" not in df:
        return None
    bad = df[df["error"].astype(str).str.startswith("unreadable: ")]
    if bad.empty:
        return None
    named = "; ".join(f"{r['trial_id']} ({str(r['error']).removeprefix('unreadable: ')})" for _, r in bad.iterrows())
    return (f"warning: could not read {len(bad)} trial(s): {named}; the front was computed without them "
            f"(`prunefuse report` lists them as failed)")


def remeasured(path) -> dict:
    """The front's re-timed latencies (end of search, `report --remeasure`): trial id (and
    "dense") -> ms; empty where nothing was re-timed."""
    f = experiment_dir(path) / REMEASURED_FILE
    timings = _read_json(f) if f.is_file() else {}
    return timings if isinstance(timings, dict) else {}


def _overlay_remeasured(df: pd.DataFrame, exp: Path) -> pd.DataFrame:
    """Latencies from `prunefuse report --remeasure` replace the search's for those trials."""
    timings = remeasured(exp)
    if not timings or "latency_ms" not in df:
        return df
    df["latency_ms_search"] = df["latency_ms"]
    hit = df["trial_id"].isin(timings)
    df.loc[hit, "latency_ms"] = df.loc[hit, "trial_id"].map(timings)
    return df


def objectives(path) -> list[tuple[str, str]]:
    return [tuple(o) for o in load_config(path)["objectives"]]
