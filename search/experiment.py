"""The experiment folder and its Optuna study, on the writing side: the one module that knows
their layout.

EXPERIMENT/trial_<id>/ holds one Tune trial (`trial_folder`); its `final.json` is the trial's
own final result (`write_final` / `read_final`) and `suggested.json` the Optuna parameters the
study proposed for it (`write_suggested`), so a study lost with `optuna.db` is rebuilt from
the folders (`resume.rebuild_study`). On the study side each Optuna trial carries its Tune trial
id (`TUNE_ID_ATTR`); constraints are recorded by `record_constraints` / `constraint_attrs`, the
only code that touches Optuna's private constraint key. `ended_trials` counts what a search has
done; `fail_stale_trials` settles trials no driver will finish. The reports read the same
folder through `reports.experiment`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from spaces.errors import PrunefuseError
from spaces.files import atomic_write_text, is_uri, join, read_text, write_text
from spaces.vocabulary import FINAL_FILE, FINISHED_FILE, STUDY_DB, SUGGESTED_FILE

# Optuna user attributes prunefuse sets on a study's trials.
TUNE_ID_ATTR = "tune_trial_id"        # the Tune trial (and folder) an Optuna trial is
STALE_ATTR = "prunefuse_failure"      # why a trial was failed by prunefuse, not by its own error
CONSTRAINTS_ATTR = "constraints"      # per-task floor violations (<= 0 feasible), readable by anyone
CARRIED_ATTR = "carried_from"         # --warm-start: the experiment a trial was carried over from
RERUN_ATTR = "rerun_of"               # an unfinished trial's parameters, enqueued to run again
STALE_REASON = "left running by a driver that stopped"

TRIAL_PREFIX = "trial_"
RESULT_LOG = "result.json"            # Tune's JSON-lines log of a trial's reports (written on the driver)
ORPHANS = "_orphans"                  # folders of trials a stopped driver left unfinished


# --- trial folders ---

def trial_folder_name(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


def trial_dirname(trial) -> str:
    """Tune's `trial_dirname_creator`: the folder is named by the trial id alone."""
    return trial_folder_name(trial.trial_id)


def trial_folder(experiment: str, trial_id: str) -> str:
    return join(experiment, trial_folder_name(trial_id))


def trial_folders(experiment: str) -> dict[str, str]:
    """Tune trial id -> its folder, for every trial folder of a local experiment."""
    if not os.path.isdir(experiment):
        return {}
    return {name.removeprefix(TRIAL_PREFIX): os.path.join(experiment, name) for name in sorted(os.listdir(experiment))
            if name.startswith(TRIAL_PREFIX) and os.path.isdir(os.path.join(experiment, name))}


def read_final(experiment: str | None, trial_id: str) -> dict | None:
    """The final result a trial reported (its `final.json`), or None where it has none: absent,
    damaged or not final (a trial with no readable final result did not finish)."""
    if not experiment:
        return None
    path = join(trial_folder(experiment, trial_id), FINAL_FILE)
    if not is_uri(path) and not os.path.isfile(path):
        return None
    try:
        data = json.loads(read_text(path))
    except (PrunefuseError, ValueError):  # absent or damaged: not finished (an OS error is shown)
        return None
    return data if isinstance(data, dict) and data.get("final") else None


def write_final(experiment: str | None, trial_id: str, result: dict) -> None:
    """Where the experiment is not reachable from this node, nothing is written; an OS error
    writing it (no space, read-only) fails the trial with that reason."""
    if not experiment:
        return
    if not is_uri(experiment) and not os.path.isdir(experiment):
        return  # a local storage path that is not shared with this node
    write_text(join(trial_folder(experiment, trial_id), FINAL_FILE), json.dumps(result))


def write_suggested(experiment: str | None, trial_id: str, params: dict, distributions: dict) -> None:
    """The Optuna parameters (and their distributions) proposed for a trial, beside its results:
    what a study rebuilt from the folders needs to learn from the trial again."""
    import optuna

    if not experiment or is_uri(experiment):
        return  # a study is rebuilt only from a local experiment (--resume refuses URIs)
    record = {"params": params,
              "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in distributions.items()}}
    write_text(join(trial_folder(experiment, trial_id), SUGGESTED_FILE), json.dumps(record))


def read_suggested(experiment: str, trial_id: str) -> tuple[dict, dict]:
    """(params, distributions) recorded by `write_suggested`; both empty where none was (an older
    experiment, or a damaged file): the trial then keeps its values without its parameters."""
    import optuna

    try:
        record = json.loads(read_text(join(trial_folder(experiment, trial_id), SUGGESTED_FILE)))
        distributions = {k: optuna.distributions.json_to_distribution(v) for k, v in record["distributions"].items()}
        params = {k: record["params"][k] for k in distributions}
    except (PrunefuseError, OSError, ValueError, KeyError, TypeError):
        return {}, {}
    return params, distributions


def objective_values(final: dict | None, objectives) -> list[float] | None:
    """The objectives' values in a final result, or None where one is missing or not a number."""
    values = [final.get(name) for name, _ in objectives] if final else None
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(v) for v in values]


# --- the experiment as a whole ---

def search_over(cfg) -> bool:
    """Whether the search ended (its driver wrote finished.json)."""
    try:
        read_text(join(cfg.path, FINISHED_FILE))
        return True
    except PrunefuseError:
        return False


def finished_line(cfg) -> str:
    return f"search {cfg.name!r} had finished already; nothing to resume, nothing changed: {cfg.path}"


def refuse_existing(cfg) -> None:
    raise PrunefuseError(f"experiment {cfg.path!r} already exists; resume it with --resume {cfg.name} "
                         f"or choose another --name")


def refuse_uri(flag: str, storage: str) -> None:
    """--resume and --warm-start read trial folders directly: a URI storage is refused in one line."""
    if is_uri(storage):
        raise PrunefuseError(f"{flag} needs the experiment on a local or shared folder; {storage!r} is a URI")


def study_url(cfg) -> str:
    # An RDB URL (any SQLAlchemy one) may be given by PRUNEFUSE_STUDY_STORAGE; by default a
    # SQLite file inside the experiment, so optuna-dashboard can open it.
    url = os.environ.get("PRUNEFUSE_STUDY_STORAGE")
    if url:
        return url
    if is_uri(cfg.storage):
        from .shared_artifacts import artifact_cache

        return "sqlite:///" + os.path.join(artifact_cache(cfg), f"{cfg.name}.db")
    return "sqlite:///" + os.path.abspath(join(cfg.path, STUDY_DB))


# --- the study ---

def directions(objectives) -> list[str]:
    return ["maximize" if sense == "max" else "minimize" for _, sense in objectives]


def constraint_attrs(values: list[float]) -> tuple[dict, dict]:
    """(user attrs, system attrs) recording constraint values on a trial made with create_trial."""
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    return {CONSTRAINTS_ATTR: list(values)}, {_CONSTRAINTS_KEY: tuple(values)}


def record_constraints(storage, trial_id: int, values: list[float]) -> None:
    """Constraint values on a running trial (`trial_id`: Optuna's storage id): as a user
    attribute, and where Optuna keeps constraints itself, so best_trials and the dashboard see
    feasibility with any sampler (RandomSampler takes no constraints_func)."""
    user, system = constraint_attrs(values)
    for key, value in user.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in system.items():
        storage.set_trial_system_attr(trial_id, key, value)


def floor_values(floors, final: dict) -> list[float] | None:
    """The per-task floors' constraint values of a final result; None without floors or where a
    task metric is missing (nothing to judge it by)."""
    if floors is None:
        return None
    try:
        return floors.values(final)
    except KeyError:
        return None


def study_id(storage, study_name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(study_name)
    except KeyError:
        return None


def ended_trials(storage_url: str, study_name: str) -> int:
    """Trials that count towards the number asked: complete, pruned (ASHA) or failed on their own.
    Trials carried over by --warm-start ran in another search: they count for nothing here."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.get_storage(storage_url)
    sid = study_id(storage, study_name)
    if sid is None:
        return 0
    return sum(1 for t in storage.get_all_trials(sid, deepcopy=False) if CARRIED_ATTR not in t.user_attrs
               and (t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    or (t.state == TrialState.FAIL and STALE_ATTR not in t.user_attrs)))


def mark_stale(storage, trial_id: int) -> None:
    """A trial no driver will finish: FAIL, marked as prunefuse's doing (it does not count)."""
    from optuna.trial import TrialState

    storage.set_trial_user_attr(trial_id, STALE_ATTR, STALE_REASON)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)


def fail_stale_trials(storage_url: str, study_name: str) -> int:
    """Mark the study's RUNNING trials FAIL (called when no trial of the search runs any more:
    they belonged to a driver that died). Returns how many."""
    import optuna
    from optuna.trial import TrialState

    storage = optuna.storages.get_storage(storage_url)
    sid = study_id(storage, study_name)
    if sid is None:
        return 0
    stale = storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        mark_stale(storage, t._trial_id)
    return len(stale)


# A trial writes final.json itself before it reports; Tune's logger on the driver appends the
# same row to result.json only when the report reaches it. A driver killed in between leaves a
# kept trial with a 0-byte result.json (or without its last row): resume completes it.
def complete_result_logs(experiment, log=print) -> int:
    """For each trial folder with a final result, make its result.json end with that row
    (whole lines kept, a torn last line dropped); returns how many logs were completed."""
    fixed = [t for t, folder in trial_folders(experiment).items() if _complete_log(experiment, t, Path(folder))]
    if fixed:
        log(f"completed the result.json of {len(fixed)} kept trial(s) from their final.json "
            f"(the stopped driver had not logged their last report)")
    return len(fixed)


def _complete_log(experiment: str, trial_id: str, folder: Path) -> bool:
    final = read_final(experiment, trial_id)
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
