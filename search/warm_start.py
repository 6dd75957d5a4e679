"""`--warm-start EXPERIMENT`: seed a new search's study with an earlier experiment's finished trials.

Only an experiment that searched the same thing can lend its trials: the same suite, model,
base training, space and measurement (`MATCHED`), else its results are not this search's.
`check_source` says in one line what differs, before anything is written. `carry_over` then
adds every finished trial (Optuna `add_trials`: the old trial's parameters and distributions,
values read for this search's objectives from its `final.json`) to the new study, and copies
its folder into the new experiment with a `carried.json` marker, so the report shows it and
marks it. Carried trials do not count towards `--trials` (resume's `ended_trials` skips them).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from spaces.errors import PrunefuseError
from spaces.files import join
from spaces.vocabulary import CARRIED_FILE, CONFIG_FILE

from . import experiment as ex
from .config import SearchConfig

# What must be the same for an old trial's result to be one this search could have measured.
MATCHED = ("suite", "model", "train", "base_checkpoint", "experts", "space", "measure")


def source_path(cfg: SearchConfig) -> str:
    """The --warm-start experiment: a folder as given, else a name under --storage."""
    given = cfg.warm_start
    if os.path.isfile(os.path.join(given, CONFIG_FILE)):
        return os.path.abspath(given)
    under = join(cfg.storage, given)
    if os.path.isfile(os.path.join(under, CONFIG_FILE)):
        return os.path.abspath(under)
    raise PrunefuseError(f"--warm-start {given!r}: no experiment there (no {CONFIG_FILE} in {given!r} "
                         f"nor in {under!r})")


def _normalised(cfg: SearchConfig, field: str):
    value = getattr(cfg, field)
    if field == "space":  # the defaults spelled out, so {} and the same space written in full match
        from spaces import SpaceSpec

        return SpaceSpec.model_validate(value).model_dump(mode="json")
    if field == "base_checkpoint" and value:
        return os.path.abspath(value)
    if field == "experts" and value:
        return {t: os.path.abspath(p) for t, p in value.items()}
    return value


def differences(cfg: SearchConfig, old: SearchConfig) -> list[str]:
    """`MATCHED` fields that differ, each as `field: old → new` (the first differing key of a mapping)."""
    out = []
    for field in MATCHED:
        a, b = _normalised(old, field), _normalised(cfg, field)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            key = next(k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
            out.append(f"{field}.{key}: {a.get(key)!r} there, {b.get(key)!r} here")
        else:
            out.append(f"{field}: {a!r} there, {b!r} here")
    return out


def check_source(cfg: SearchConfig) -> SearchConfig:
    """The warm-start experiment, refused in one line when it searched something else."""
    ex.refuse_uri("--warm-start", cfg.storage)
    path = source_path(cfg)
    old = SearchConfig.load(path)
    if os.path.abspath(old.path) == os.path.abspath(cfg.path):
        raise PrunefuseError(f"--warm-start {cfg.warm_start!r} is this experiment; name an earlier one")
    diff = differences(cfg, old)
    if diff:
        raise PrunefuseError(f"--warm-start {cfg.warm_start!r} searched something else, its trials do not carry "
                             f"over: {'; '.join(diff)}")
    return old


def carry_over(cfg: SearchConfig, old: SearchConfig, *, study_url: str, old_study_url: str, floors=None,
               log=print) -> int:
    """Add `old`'s finished trials to this search's study (created here) and its folder; returns how many."""
    import optuna
    from optuna.trial import TrialState

    source = Path(old.path).resolve()
    old_study = optuna.load_study(study_name=old.name, storage=old_study_url)
    carried, folders = [], []
    for t in old_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        tune_id = t.user_attrs.get(ex.TUNE_ID_ATTR)
        final = ex.read_final(str(source), tune_id) if tune_id else None
        values = ex.objective_values(final, cfg.objectives)
        if values is None:
            continue  # no result for one of this search's objectives: nothing to learn from
        system_attrs = {}
        user_attrs = {**t.user_attrs, ex.CARRIED_ATTR: str(source)}
        if floors is not None:
            constraints = ex.floor_values(floors, final)
            if constraints is None:
                continue  # a result without a task metric cannot be judged feasible
            user, system_attrs = ex.constraint_attrs(constraints)
            user_attrs.update(user)
        carried.append(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                                 values=values, user_attrs=user_attrs, system_attrs=system_attrs))
        folders.append(tune_id)
    study = optuna.create_study(study_name=cfg.name, storage=optuna.storages.RDBStorage(study_url),
                                directions=ex.directions(cfg.objectives), load_if_exists=True)
    study.add_trials(carried)
    for tune_id in folders:
        target = Path(ex.trial_folder(cfg.path, tune_id))
        if not target.exists():
            shutil.copytree(ex.trial_folder(str(source), tune_id), target)
        (target / CARRIED_FILE).write_text(json.dumps({"from": str(source), "trial_id": tune_id}))
    log(f"warm start: {len(carried)} finished trial(s) carried over from {source}")
    return len(carried)
