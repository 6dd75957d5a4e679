"""Resume: make the Optuna study and the trial folders agree after a driver stopped, whenever.

Tune's own snapshot is not used: it is taken every few seconds and can miss trials that
started and even finished since (or not exist at all). The study and the trial folders are
the record (their layout: `search.experiment`). Each Optuna trial carries its Tune trial id,
so for every trial the dead driver left RUNNING:

- its folder has `final.json` (written by the trial before it reported): COMPLETE with those
  values, counted once; the report reads the same file;
- its folder has Tune's `error.txt`: FAIL, an ended trial as it would have been;
- otherwise it never ended: FAIL marked as left by a stopped driver, its folder moved to
  EXPERIMENT/_orphans, and its parameters enqueued so the resumed search runs it again.

A study that is gone (its `optuna.db` lost) is rebuilt from the folders first (`rebuild_study`):
every trial with a final result becomes a COMPLETE trial with its values, parameters and
constraints, every trial that failed on its own a FAIL one; none is run again.

The resumed search then runs a fresh Tuner over the same study for the trials still missing.
"""
from __future__ import annotations

import json
from pathlib import Path

from spaces.vocabulary import CARRIED_FILE

from . import experiment as ex


def reconcile(experiment: str, storage_url: str, study_name: str, objectives, *, floors=None, log=print) -> int:
    """Settle every RUNNING trial of the study (see the module doc); returns `ended_trials`."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.get_storage(storage_url)
    study_id = ex.study_id(storage, study_name)
    if study_id is None:
        rebuild_study(experiment, storage_url, study_name, objectives, floors=floors, log=log)
        study_id = ex.study_id(storage, study_name)
    kept, rerun = 0, 0
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        tune_id = t.user_attrs.get(ex.TUNE_ID_ATTR)
        final = ex.read_final(experiment, tune_id) if tune_id else None
        values = ex.objective_values(final, objectives)
        if values is not None:
            constraints = ex.floor_values(floors, final)
            if constraints is not None:
                ex.record_constraints(storage, t._trial_id, constraints)
            storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, values)
            kept += 1
        elif tune_id and _failed_on_its_own(experiment, tune_id):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        else:
            ex.mark_stale(storage, t._trial_id)
            if t.params:
                optuna.load_study(study_name=study_name, storage=storage).enqueue_trial(
                    t.params, user_attrs={ex.RERUN_ATTR: tune_id or t.number}, skip_if_exists=False)
            rerun += 1
    if kept:
        log(f"kept {kept} trial(s) that had finished after the stopped driver's last look")
    if rerun:
        log(f"{rerun} trial(s) the stopped driver left unfinished run again")
    ended = [t for t in storage.get_all_trials(study_id, deepcopy=False)
             if t.state.is_finished() and ex.STALE_ATTR not in t.user_attrs]
    ended_ids = {t.user_attrs.get(ex.TUNE_ID_ATTR) for t in ended}
    if None not in ended_ids:  # an experiment from before trials were tagged keeps its folders as they are
        _move_orphans(Path(experiment), ended_ids, log)
    return ex.ended_trials(storage_url, study_name)


def rebuild_study(experiment: str, storage_url: str, study_name: str, objectives, *, floors=None, log=print) -> None:
    """A new study holding every trial the folders say ended: finished ones (a final result) as
    COMPLETE with their values, recorded parameters and constraints; ones that failed on their
    own as FAIL. Folders of neither are left to `reconcile`, which moves them aside."""
    import optuna
    from optuna.trial import TrialState

    trials, finished, failed = [], 0, 0
    for tune_id in ex.trial_folders(experiment):
        final = ex.read_final(experiment, tune_id)
        values = ex.objective_values(final, objectives)
        if values is None and not _failed_on_its_own(experiment, tune_id):
            continue
        params, distributions = ex.read_suggested(experiment, tune_id)
        user_attrs, system_attrs = {ex.TUNE_ID_ATTR: tune_id, **_carried(experiment, tune_id)}, {}
        constraints = ex.floor_values(floors, final) if values is not None else None
        if constraints is not None:
            user, system = ex.constraint_attrs(constraints)
            user_attrs.update(user)
            system_attrs.update(system)
        state = TrialState.COMPLETE if values is not None else TrialState.FAIL
        trials.append(optuna.trial.create_trial(state=state, values=values, params=params,
                                                distributions=distributions, user_attrs=user_attrs,
                                                system_attrs=system_attrs))
        finished, failed = finished + (values is not None), failed + (values is None)
    study = optuna.create_study(study_name=study_name, storage=optuna.storages.RDBStorage(storage_url),
                                directions=ex.directions(objectives))
    study.add_trials(trials)
    log(f"the Optuna study was missing: rebuilt it from the trial folders ({finished} finished, "
        f"{failed} failed trial(s) kept, none run again)")


def _failed_on_its_own(experiment: str, tune_id: str) -> bool:
    return (Path(ex.trial_folder(experiment, tune_id)) / "error.txt").is_file()


def _carried(experiment: str, tune_id: str) -> dict:
    """A trial carried over by --warm-start stays one (it counts for nothing here)."""
    path = Path(ex.trial_folder(experiment, tune_id)) / CARRIED_FILE
    try:
        return {ex.CARRIED_ATTR: str(json.loads(path.read_text())["from"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {ex.CARRIED_ATTR: "an earlier experiment"} if path.exists() else {}


def _move_orphans(exp: Path, ended_ids: set, log) -> None:
    """Trial folders of no ended trial (their trial never finished) go to EXPERIMENT/_orphans,
    so every trial_* folder is a trial the study counts."""
    orphans = [Path(folder) for tune_id, folder in ex.trial_folders(str(exp)).items() if tune_id not in ended_ids]
    if not orphans:
        return
    target = exp / ex.ORPHANS
    target.mkdir(exist_ok=True)
    for d in orphans:
        d.replace(target / d.name)
    log(f"moved {len(orphans)} folder(s) of trials the stopped driver left unfinished to {target}")
