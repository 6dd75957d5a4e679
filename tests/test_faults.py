"""A real driver killed (its whole process group: the driver and its embedded Ray) at several
moments, then resumed: the trials that had finished are kept with their results, counted once
in the Optuna study, and the search ends with the number of trials asked. A second driver on
the same experiment is refused in one line while the first runs; a dead one's lock is taken.

Each kill is a fresh embedded-Ray search of a tiny space (a few seconds a trial on 2 cores).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from test_cluster import finished_results, kill_session, run_cli, start_cli

pytestmark = pytest.mark.slow

TINY = ["--suite-option", "train_pairs=600", "--suite-option", "val_pairs=200", "--suite-option", "test_pairs=200",
        "--train-option", "epochs=1", "--model-option", "width=32", "--model-option", "depth=2",
        "--measure-option", "runs=5", "--measure-option", "latency_batch=32", "--sampler", "random"]
SPACE = {"fusion": {"method": "none"}, "pruning": {"importance": "l2", "sparsity": [0.0, 0.25, 0.5]},
         "finetune": {"epochs": 0.5}}
TRIALS = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return root


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(extra)
    return out


def wait_for(condition, proc, timeout=900.0):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the search ended before it could be killed"
        assert time.time() < deadline, "the moment to kill never came"
        time.sleep(0.05)


def finals(exp: Path) -> dict[str, dict]:
    """trial id -> the final.json a trial wrote (before Tune saw its result)."""
    out = {}
    for f in exp.glob("trial_*/final.json"):
        try:
            out[f.parent.name.removeprefix("trial_")] = json.loads(f.read_text())
        except ValueError:
            pass
    return out


def kill_then_resume(root: Path, name: str, moment, *, extra_env=None, while_running=None):
    """Start a search, SIGKILL its process group when `moment(exp)` holds, resume it; returns
    (final results before the kill, the resume's output, exp)."""
    storage, exp = root / "runs", root / "runs" / name
    log = open(root / f"{name}.log", "w+")
    proc = start_cli("search", *TINY, "--space", root / "space.yaml", "--trials", TRIALS, "--storage", storage,
                     "--name", name, "--no-report", env=env(**(extra_env or {})), log=log)
    try:
        wait_for(lambda: moment(exp), proc)
        if while_running:
            os.killpg(proc.pid, signal.SIGSTOP)  # frozen, alive, holding its lock: nothing moves meanwhile
            before = finals(exp)
            while_running(storage, exp)
        else:
            before = finals(exp)
    finally:
        left = kill_session(proc.pid)
    assert not left, f"the killed driver's processes survived: {left}"
    code, out = run_cli("search", "--resume", name, "--storage", storage, "--no-report", env=env())
    assert code == 0, out[-4000:]
    return before, out, exp


def check_resumed(exp: Path, before: dict[str, dict]):
    import optuna

    from reports import load_experiment

    df = load_experiment(exp)
    assert len(df) == TRIALS and (df["status"] == "finished").all(), df[["trial_id", "status", "error"]]
    assert {p.name for p in exp.glob("trial_*")} == {f"trial_{t}" for t in df["trial_id"]}
    assert df["policy"].notna().all(), "a kept trial lost its policy (export could not rebuild it)"
    for trial_id, result in before.items():
        row = df[df["trial_id"] == trial_id]
        assert len(row) == 1, f"trial {trial_id} wrote its final result before the kill and is gone"
        final = json.loads((exp / f"trial_{trial_id}" / "final.json").read_text())
        assert final == result, f"trial {trial_id}'s final result changed: {result} -> {final}"
        for key in ("params", "latency_ms", "node_id"):
            assert row.iloc[0][key] == result[key], (trial_id, key)
    for folder in exp.glob("trial_*"):   # every kept trial's log ends with its final row, none left 0 bytes
        rows = (folder / "result.json").read_text().splitlines()
        assert rows and json.loads(rows[-1]).get("final"), f"{folder.name}/result.json lacks its final row"
    study = optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == TRIALS, states
    assert not [s for s in states if s in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    ids = {t.user_attrs.get("tune_trial_id") for t in complete}
    assert ids == set(df["trial_id"]), "the study and the trial folders disagree"


def test_killed_before_the_first_snapshot(root):
    """Killed as soon as Tune has started (tuner.pkl written), before any trial ended: the
    resume runs every trial asked, none twice."""
    before, out, exp = kill_then_resume(root, "early", lambda exp: (exp / "tuner.pkl").is_file())
    assert "resuming search 'early'" in out and "of 3 trials ended" in out, out[-3000:]
    check_resumed(exp, before)


def test_killed_between_trials_and_one_writer_at_a_time(root):
    """Between trials (the driver frozen with SIGSTOP, alive and holding its lock): a second
    search of that name or a resume of it is refused in one line; after the kill the resume
    takes the dead driver's lock and finishes the search."""
    refusals = []

    def second_drivers(storage, exp):
        for args in (["search", *TINY, "--name", exp.name], ["search", "--resume", exp.name]):
            started = time.time()
            code, out = run_cli(*args, "--storage", storage, env=env(), timeout=120)
            refusals.append((code, out.strip(), time.time() - started))

    before, out, exp = kill_then_resume(root, "between", lambda exp: len(finished_results(exp)) >= 2,
                                        while_running=second_drivers)
    for code, text, seconds in refusals:
        assert code == 2 and len(text.splitlines()) == 1, text
        assert "is being written by another search (pid" in text or "already exists" in text, text
        assert seconds < 60
    assert any("is being written by another search" in text for _, text, _ in refusals)
    check_resumed(exp, before)
    lock = json.loads((exp / ".prunefuse.lock").read_text())
    assert lock["pid"] != 0  # the resumed driver's


def test_killed_while_a_trial_writes_its_final_result(root):
    """Killed the moment a trial's final.json appears (before, or just as, Tune records it),
    with Tune's snapshots off: the trial is kept as finished whatever the snapshot missed."""
    before, out, exp = kill_then_resume(root, "final", lambda exp: len(finals(exp)) >= 1,
                                        extra_env={"TUNE_GLOBAL_CHECKPOINT_S": "3600"})
    assert before
    check_resumed(exp, before)
    code, again = run_cli("search", "--resume", "final", "--storage", root / "runs", env=env())
    assert code == 0 and "had finished already" in again, again[-3000:]
