"""Resume: make the Optuna study and the trial folders agree after a driver stopped, whenever.

Tune's own snapshot is not used: it is taken every few seconds and can miss trials that
started and even finished since (or not exist at all). The study and the trial folders are
the record. Each Optuna trial carries its Tune trial id (`TUNE_ID_ATTR`, set when it is
proposed), so for every trial the dead driver left RUNNING:

- its folder has `final.json` (written by the trial before it reported): COMPLETE with those
  values, counted once; the report reads the same file;
- its folder has Tune's `error.txt`: FAIL, an ended trial as it would have been;
- otherwise it never ended: FAIL marked as left by a stopped driver, its folder moved to
  EXPERIMENT/_orphans, and its parameters enqueued so the resumed search runs it again.

The resumed search then runs a fresh Tuner over the same study for the trials still missing.
"""
from __future__ import annotations

import json
from pathlib import Path

from spaces.vocabulary import FINAL_FILE

TUNE_ID_ATTR = "tune_trial_id"
STALE_ATTR = "prunefuse_failure"


def ended_trials(storage_url: str, study_name: str) -> int:
    """Trials that count towards the number asked: complete, pruned (ASHA) or failed on their own."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    from .warm_start import CARRIED_ATTR

    # Trials carried over by --warm-start ran in another search: they count for nothing here.
    return sum(1 for t in storage.get_all_trials(study_id, deepcopy=False) if CARRIED_ATTR not in t.user_attrs
               and (t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    or (t.state == TrialState.FAIL and STALE_ATTR not in t.user_attrs)))


def reconcile(experiment: str, storage_url: str, study_name: str, objectives, *, floors=None, log=print) -> int:
    """Settle every RUNNING trial of the study (see the module doc); returns `ended_trials`."""
    import optuna
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
    from optuna.trial import TrialState

    from .optuna_search import CONSTRAINTS_ATTR

    storage = optuna.storages.get_storage(storage_url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        _move_orphans(Path(experiment), set(), log)
        return 0
    kept, rerun = 0, 0
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        tune_id = t.user_attrs.get(TUNE_ID_ATTR)
        folder = Path(experiment) / f"trial_{tune_id}" if tune_id else None
        final = _final(folder)
        values = [final.get(name) for name, _ in objectives] if final else None
        if values and all(isinstance(v, (int, float)) for v in values):
            if floors is not None:
                try:
                    constraints = floors.values(final)
                    storage.set_trial_user_attr(t._trial_id, CONSTRAINTS_ATTR, constraints)
                    storage.set_trial_system_attr(t._trial_id, _CONSTRAINTS_KEY, tuple(constraints))
                except KeyError:
                    pass  # a result without a task metric: no constraint to record
            storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [float(v) for v in values])
            kept += 1
        elif folder is not None and (folder / "error.txt").is_file():
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        else:
            storage.set_trial_user_attr(t._trial_id, STALE_ATTR, "left running by a driver that stopped")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            if t.params:
                optuna.load_study(study_name=study_name, storage=storage).enqueue_trial(
                    t.params, user_attrs={"rerun_of": tune_id or t.number}, skip_if_exists=False)
            rerun += 1
    if kept:
        log(f"kept {kept} trial(s) that had finished after the stopped driver's last look")
    if rerun:
        log(f"{rerun} trial(s) the stopped driver left unfinished run again")
    ended = [t for t in storage.get_all_trials(study_id, deepcopy=False)
             if t.state.is_finished() and STALE_ATTR not in t.user_attrs]
    ended_ids = {t.user_attrs.get(TUNE_ID_ATTR) for t in ended}
    if None not in ended_ids:  # an experiment from before trials were tagged keeps its folders as they are
        _move_orphans(Path(experiment), ended_ids, log)
    return ended_trials(storage_url, study_name)


def _final(folder: Path | None) -> dict | None:
    if folder is None:
        return None
    try:
        data = json.loads((folder / FINAL_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written before the atomic rename cannot happen; damaged can
        return None
    return data if isinstance(data, dict) and data.get("final") else None


def _move_orphans(exp: Path, ended_ids: set, log) -> None:
    """Trial folders of no ended trial (their trial never finished) go to EXPERIMENT/_orphans,
    so every trial_* folder is a trial the study counts."""
    orphans = [d for d in exp.glob("trial_*") if d.is_dir() and d.name.removeprefix("trial_") not in ended_ids]
    if not orphans:
        return
    target = exp / "_orphans"
    target.mkdir(exist_ok=True)
    for d in orphans:
        d.replace(target / d.name)
    log(f"moved {len(orphans)} folder(s) of trials the stopped driver left unfinished to {target}")
