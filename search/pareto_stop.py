"""Multi-objective early stopping: successive halving by non-dominated rank.

Optuna's pruners refuse multi-objective studies (optuna#3450) and Ray Tune's schedulers
take one metric (ray#8018), so `--early-stop asha` judges a trial on the score alone. This
rule judges the whole objective vector: a trial reports after every pruning step (a rung);
at a rung, the trials that reached it are sorted into non-dominated fronts
(`reports.pareto.non_dominated_sort`), and a trial is stopped when at least
ceil(keep × n) of them lie on strictly better fronts — it is dominated by enough of its
peers. Trials on the rung's front are never stopped, nor is anyone before `min_trials` have
reached the rung. The last step is no rung: a trial that reached it has finished.

The stopped trial's last report is an intermediate one (`final` false), which
`optuna_search.PrunefuseOptunaSearch` records as PRUNED, as it does for ASHA.
"""
from __future__ import annotations

import math

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from reports.pareto import non_dominated_sort

KEEP = 0.5          # the fraction of a rung's trials kept (1 / eta; successive halving's eta = 2)
MIN_TRIALS = 3      # trials that must reach a rung before anyone there is stopped


def should_stop(vector, peers, senses, *, keep: float = KEEP, min_trials: int = MIN_TRIALS) -> bool:
    """True when `vector` (this trial's objectives at a rung) is outside the best `keep`
    fraction, by non-dominated rank, of the n trials at that rung: `peers` (the other
    trials' vectors there) and itself. Rank ties are kept together, so a rung's front is
    always kept whole."""
    points = np.asarray(list(peers) + [list(vector)], dtype=float).reshape(-1, len(senses))
    if len(points) < max(1, min_trials):
        return False
    ranks = non_dominated_sort(points, senses)
    mine, others = ranks[-1], ranks[:-1]
    if mine < 0:          # a non-finite vector: the trial raises itself (trial.py), nothing to judge
        return False
    better = int(((others >= 0) & (others < mine)).sum())
    return better >= math.ceil(keep * len(points))


class ParetoStopScheduler(FIFOScheduler):
    """A Tune scheduler applying `should_stop` at every intermediate report (rung = `step`)."""

    def __init__(self, objectives, *, keep: float = KEEP, min_trials: int = MIN_TRIALS):
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1]; got {keep!r}")
        self.names = [name for name, _ in objectives]
        self.senses = [sense for _, sense in objectives]
        self.keep, self.min_trials = keep, min_trials
        self.rungs: dict[int, dict[str, list[float]]] = {}   # step -> {trial id: objective vector}
        self.stopped: dict[str, int] = {}                      # trial id -> the step it stopped at

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are this scheduler's own; Tune's single metric is not used

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        step = result.get("step")
        if result.get("final", True) or step is None or any(n not in result for n in self.names):
            return TrialScheduler.CONTINUE
        vector = [float(result[n]) for n in self.names]
        rung = self.rungs.setdefault(int(step), {})
        rung[trial.trial_id] = vector
        peers = [v for tid, v in rung.items() if tid != trial.trial_id]
        if should_stop(vector, peers, self.senses, keep=self.keep, min_trials=self.min_trials):
            self.stopped[trial.trial_id] = int(step)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return (f"Pareto early stopping: keep {self.keep:g} of each rung by non-dominated rank; "
                f"{len(self.stopped)} stopped")
