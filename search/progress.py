"""One line per finished or failed trial on the driver's console (Ray's own tables are off).

Also the driver's clock on every trial (start → complete, as Tune sees it), which the search
writes into finished.json so framework overhead can be told from the trials' own work.
"""
from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback

from spaces.vocabulary import MEAN_SCORE, POLICY_FILE


def error_reason(trial) -> str:
    """The last line of the trial's error.txt (the exception, which carries the reason)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1][:300] if lines else "see the trial's error.txt"


class ProgressPrinter(Callback):
    """Its counts and clocks are read by the search that made it, once fit() returns."""

    def __init__(self, total):
        self.total, self.done, self.failed = total, 0, 0
        self.started: dict[str, float] = {}
        self.wall_s: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        # The driver writes policy.yaml beside the trial's results: into the driver's staging
        # copy of the trial folder, which Tune uploads to the storage (a folder or a URI).
        from spaces import Policy

        from spaces.files import join, write_text

        try:
            write_text(join(trial.local_path, POLICY_FILE), Policy.from_dict(trial.config["policy"]).to_yaml())
        except Exception as exc:  # never let a side file stop the search
            print(f"  trial {trial.trial_id}: could not write policy.yaml ({exc})", flush=True)

    def _stop_clock(self, trial) -> None:
        start = self.started.pop(trial.trial_id, None)
        if start is not None:
            self.wall_s[trial.trial_id] = time.time() - start

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._stop_clock(trial)
        self.done += 1
        r = trial.last_result or {}
        if MEAN_SCORE not in r:
            return
        of = f"/{self.total}" if self.total else ""
        print(f"  trial {self.done}{of} {trial.trial_id}: score {r[MEAN_SCORE]:+.2f}  "
              f"params {r['params']:,}  latency {r['latency_ms']:.3f} ms", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        print(f"  trial {trial.trial_id} failed, retrying: {error_reason(trial)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._stop_clock(trial)
        self.failed += 1
        print(f"  trial {trial.trial_id} failed: {error_reason(trial)}", flush=True)

    def get_state(self):
        return {"done": self.done, "failed": self.failed, "wall_s": dict(self.wall_s)}

    def set_state(self, state):
        self.done, self.failed = state.get("done", 0), state.get("failed", 0)
        self.wall_s = dict(state.get("wall_s", {}))
