"""The Optuna side of a search: the sampler by name, the define-by-run space, constraints."""
from __future__ import annotations

import optuna
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from ray.tune.search.optuna import OptunaSearch

from spaces import SearchSpace
from spaces.errors import unknown_name
from spaces.scores import floor_violations
from spaces.vocabulary import TASK_METRIC

from .config import SAMPLERS

CONSTRAINTS_ATTR = "constraints"


class ProposePolicy:
    """The define-by-run space handed to OptunaSearch. A class in an importable module (not a
    function in __main__) so the pickled searcher restores in another process on --resume."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> dict:
        return {"policy": self.space.suggest(trial).to_dict()}


class TaskFloors:
    """Per-task floors as Optuna constraints: how far each task's oriented score is below
    −max_drop (`spaces.scores.floor_violations`, which export uses too; <= 0 is feasible).
    Picklable, so it survives a resumed search."""

    def __init__(self, dense: dict[str, float], max_drop: float, *, senses: dict[str, str] | None = None):
        self.dense, self.max_drop, self.senses = dict(dense), max_drop, dict(senses or {})

    def values(self, result: dict) -> list[float]:
        if any(f"{TASK_METRIC}{t}" not in result for t in self.dense):
            raise KeyError("a task metric is missing")
        return floor_violations(result, self.dense, getattr(self, "senses", {}), self.max_drop)

    def __call__(self, frozen_trial) -> list[float]:
        # A failed trial has no values; Optuna only asks for complete ones, this is a guard.
        return frozen_trial.user_attrs.get(CONSTRAINTS_ATTR, [float("inf")] * len(self.dense))


class PrunefuseOptunaSearch(OptunaSearch):
    """OptunaSearch that also hands constraint values to the study before it learns the result."""

    def __init__(self, *args, floors: TaskFloors | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._floors = floors

    def suggest(self, trial_id):
        out = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            # The Tune trial's id on its Optuna trial: a resumed search matches study and folders by it.
            from .resume import TUNE_ID_ATTR

            self._ot_trials[trial_id].set_user_attr(TUNE_ID_ATTR, trial_id)
        return out

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and not error and not result.get("final", True):
            # Stopped early (ASHA) after an intermediate step: its metrics are not the policy's,
            # so Optuna records the trial as pruned instead of learning from them.
            result = None
        if self._floors is not None and result and not error and trial_id in self._ot_trials:
            try:
                values = self._floors.values(result)
            except KeyError:
                values = None
            if values is not None:
                trial = self._ot_trials[trial_id]
                trial.set_user_attr(CONSTRAINTS_ATTR, values)
                # Also where Optuna keeps constraints itself, so best_trials and the dashboard see
                # feasibility with any sampler (RandomSampler takes no constraints_func).
                trial.storage.set_trial_system_attr(trial._trial_id, _CONSTRAINTS_KEY, tuple(values))
        super().on_trial_complete(trial_id, result=result, error=error)


def make_sampler(name: str, *, seed: int, trials: int | None, floors: TaskFloors | None):
    if name == "tpe":
        # multivariate + group model the conditional (define-by-run) space jointly.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constraints_func=floors,
                                          n_startup_trials=min(10, max(4, (trials or 40) // 4)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=floors,
                                             population_size=max(8, min(50, (trials or 40) // 4)))
    if name == "gp":
        # Gaussian process, log expected hypervolume improvement; its cost per trial grows with the
        # trials (benchmarks/search.py). Knobs outside the space every trial has are sampled at random.
        return optuna.samplers.GPSampler(seed=seed, constraints_func=floors, warn_independent_sampling=False,
                                         n_startup_trials=min(10, max(4, (trials or 40) // 4)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise unknown_name("sampler", name, SAMPLERS)


def make_searcher(space: SearchSpace, *, objectives, sampler: str, seed: int, trials, storage_url: str,
                  study_name: str, floors: TaskFloors | None = None) -> PrunefuseOptunaSearch:
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return PrunefuseOptunaSearch(
        space=ProposePolicy(space),
        metric=[name for name, _ in objectives], mode=[sense for _, sense in objectives],
        sampler=make_sampler(sampler, seed=seed, trials=trials, floors=floors),
        storage=optuna.storages.RDBStorage(storage_url), study_name=study_name, floors=floors)


def fail_stale_trials(storage_url: str, study_name: str) -> int:
    """Mark the study's RUNNING trials FAIL (called when no trial of the search runs any more:
    they belonged to a driver that died). Returns how many."""
    from optuna.trial import TrialState

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    stale = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_user_attr(t._trial_id, "prunefuse_failure", "left running by a driver that stopped")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)
