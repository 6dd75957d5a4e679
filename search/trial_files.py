"""A trial folder's files agree with each other after a driver stopped at any moment.

A trial writes `final.json` itself, before it reports; Tune's JSON logger (on the driver)
appends the same row to `result.json` only when the report reaches it. A driver killed in
between leaves a kept trial with a 0-byte `result.json` (or one without its last row, or
with half a line). The resume completes that log from `final.json`, so every kept trial's
folder reads the same to Tune's tools, to the report and to a person with `tail`.
"""
from __future__ import annotations

import json
from pathlib import Path

from spaces.files import atomic_write_text

# One reader of a trial's final.json (a dict with "final": true, or None): warm start's.
from .warm_start import _final

RESULT_LOG = "result.json"  # Tune's JSON-lines log of a trial's reports


def complete_result_logs(experiment, log=print) -> int:
    """For each trial folder with a final result, make its result.json end with that row
    (whole lines kept, a torn last line dropped); returns how many logs were completed."""
    fixed = [d for d in sorted(Path(experiment).glob("trial_*")) if d.is_dir() and _complete(d)]
    if fixed:
        log(f"completed the result.json of {len(fixed)} kept trial(s) from their final.json "
            f"(the stopped driver had not logged their last report)")
    return len(fixed)


def _complete(folder: Path) -> bool:
    final = _final(folder)
    if final is None:
        return False
    rows = _whole_rows(folder / RESULT_LOG)
    if rows is None or (rows and rows[-1].get("final")):
        return False  # unreadable (the report names it; nothing is overwritten) or complete already
    text = "".join(json.dumps(r) + "\n" for r in [*rows, final])
    atomic_write_text(folder / RESULT_LOG, text)
    return True


def _whole_rows(path: Path) -> list[dict] | None:
    """The log's rows ([] for a missing or empty file; a torn last line dropped), or None when
    an earlier line is damaged: that is not a write the kill cut short."""
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError):
        return None
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            return None
        if not isinstance(row, dict):
            return None
        rows.append(row)
    return rows
