"""One line per finished or failed trial on the driver's console (Ray's own tables are off)."""
from __future__ import annotations

from ray.tune import Callback


class ProgressPrinter(Callback):
    def __init__(self, total):
        self.total, self.done, self.failed = total, 0, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        if "accuracy" not in r:
            return
        of = f"/{self.total}" if self.total else ""
        print(f"  trial {self.done}{of} {trial.trial_id}: accuracy {r['accuracy']:.4f}  "
              f"params {r['params']:,}  latency {r['latency_ms']:.3f} ms", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        reason = str(getattr(trial, "error_msg", "") or "").strip().splitlines()
        print(f"  trial {trial.trial_id} failed: {reason[-1] if reason else 'see error.txt'}", flush=True)
