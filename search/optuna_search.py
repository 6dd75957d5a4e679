"""The Optuna side of a search: the searcher over the define-by-run space, constraints (the
sampler by name: `search.samplers`)."""
from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from spaces import SearchSpace
from spaces.scores import floor_violations
from spaces.vocabulary import task_metric

from . import experiment as ex
from .samplers import make_sampler


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
        if any(task_metric(t) not in result for t in self.dense):
            raise KeyError("a task metric is missing")
        return floor_violations(result, self.dense, self.senses, self.max_drop)

    def __call__(self, frozen_trial) -> list[float]:
        # A failed trial has no values; Optuna only asks for complete ones, this is a guard.
        return frozen_trial.user_attrs.get(ex.CONSTRAINTS_ATTR, [float("inf")] * len(self.dense))


class PrunefuseOptunaSearch(OptunaSearch):
    """OptunaSearch that also hands constraint values to the study before it learns the result."""

    def __init__(self, *args, floors: TaskFloors | None = None, experiment: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._floors = floors
        self._experiment = experiment

    def suggest(self, trial_id):
        out = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            # The Tune trial's id on its Optuna trial: a resumed search matches study and folders by it;
            # its parameters beside its folder: a study lost with optuna.db is rebuilt from them.
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr(ex.TUNE_ID_ATTR, trial_id)
            try:
                ex.write_suggested(self._experiment, trial_id, ot_trial.params, ot_trial.distributions)
            except OSError as exc:  # a side file never stops the search; a rebuilt study would lack its params
                print(f"  trial {trial_id}: could not record its parameters ({exc})", flush=True)
        return out

    def on_trial_complete(self, trial_id, result=None, error=False):
        if result and not error and not result.get("final", True):
            # Stopped early (ASHA) after an intermediate step: its metrics are not the policy's,
            # so Optuna records the trial as pruned instead of learning from them.
            result = None
        if result and not error and trial_id in self._ot_trials:
            values = ex.floor_values(self._floors, result)
            if values is not None:
                trial = self._ot_trials[trial_id]
                ex.record_constraints(trial.storage, trial._trial_id, values)
        super().on_trial_complete(trial_id, result=result, error=error)


def make_searcher(space: SearchSpace, *, objectives, sampler: str, seed: int, trials, storage_url: str,
                  study_name: str, floors: TaskFloors | None = None,
                  experiment: str | None = None) -> PrunefuseOptunaSearch:
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return PrunefuseOptunaSearch(
        space=ProposePolicy(space),
        metric=[name for name, _ in objectives], mode=[sense for _, sense in objectives],
        sampler=make_sampler(sampler, seed=seed, trials=trials, floors=floors),
        storage=optuna.storages.RDBStorage(storage_url), study_name=study_name, floors=floors,
        experiment=experiment)
