"""A lost `optuna.db` loses no finished trial: `--resume` rebuilds the study from the trial
folders (real Ray, real Optuna, the real CLI; a tiny search)."""
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

TINY = ["--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=300", "--suite-option", "test_pairs=300",
        "--train-option", "epochs=2", "--model-option", "width=64", "--model-option", "depth=2",
        "--measure-option", "latency_batch=32", "--measure-option", "runs=3", "--measure-option", "warmup=1",
        "--objectives", "score:max,params:min", "--max-task-drop", "50"]
SPACE = {"pruning": {"importance": "l2", "sparsity": {"low": 0.0, "high": 0.9}},
         "weighting": {"method": "equal"}, "fusion": {"method": "none"}, "finetune": {"epochs": 0.2}}


def study(exp: Path):
    import optuna

    return optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")


def finals(exp: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in exp.glob("trial_*/final.json")}


def test_a_lost_study_is_rebuilt_from_the_trial_folders(tmp_path):
    """Finished (final.json), failed (error.txt) and unfinished folders: the first two become
    trials of a new study with what they recorded; only the unfinished one is set aside."""
    import optuna

    from search import experiment as ex
    from search.optuna_search import TaskFloors
    from search.resume import reconcile

    exp, objectives = tmp_path / "lost", [("score", "max"), ("params", "min")]
    distribution = optuna.distributions.FloatDistribution(0.0, 0.9)
    final = {"final": True, "score": -1.5, "params": 1234, "metric/left": 0.8}
    exp.mkdir()
    ex.write_final(str(exp), "done", final)
    ex.write_suggested(str(exp), "done", {"pruning/sparsity": 0.5}, {"pruning/sparsity": distribution})
    (exp / "trial_failed").mkdir()
    (exp / "trial_failed" / "error.txt").write_text("RuntimeError: boom\n")
    (exp / "trial_cut").mkdir()
    floors = TaskFloors({"left": 0.9}, 5.0, senses={"left": "max"})
    url, lines = f"sqlite:///{tmp_path / 'optuna.db'}", []
    assert reconcile(str(exp), url, "lost", objectives, floors=floors, log=lines.append) == 2
    trials = {t.user_attrs[ex.TUNE_ID_ATTR]: t for t in optuna.load_study(study_name="lost", storage=url).trials}
    assert set(trials) == {"done", "failed"}
    done = trials["done"]
    assert done.state.name == "COMPLETE" and done.values == [-1.5, 1234.0]
    assert done.params == {"pruning/sparsity": 0.5} and done.distributions == {"pruning/sparsity": distribution}
    assert done.user_attrs[ex.CONSTRAINTS_ATTR] == floors.values(final)
    assert list(done.system_attrs.values()) == [floors.values(final)]  # Optuna's own constraint record (as stored)
    assert trials["failed"].state.name == "FAIL"
    assert (exp / "trial_done").is_dir() and (exp / "trial_failed").is_dir()
    assert (exp / "_orphans" / "trial_cut").is_dir()
    assert any("rebuilt it from the trial folders (1 finished, 1 failed" in line for line in lines), lines


@pytest.mark.slow
def test_resume_after_a_lost_study_keeps_every_finished_trial(tmp_path):
    from search.experiment import CONSTRAINTS_ATTR, TUNE_ID_ATTR

    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    storage, exp = tmp_path / "runs", tmp_path / "runs" / "lost"
    code, _, err = run_cli("search", "--storage", storage, "--name", "lost", "--space", tmp_path / "space.yaml",
                           "--trials", 2, "--no-report", *TINY, cwd=tmp_path)
    assert code == 0, err[-3000:]
    before = {t.user_attrs[TUNE_ID_ATTR]: t for t in study(exp).trials}
    kept = finals(exp)
    assert len(before) == 2 and len(kept) == 2

    # As a driver killed after 2 of 4 trials leaves it (no finished.json), then its study lost.
    config = json.loads((exp / "prunefuse.json").read_text())
    (exp / "prunefuse.json").write_text(json.dumps({**config, "trials": 4}))
    (exp / "finished.json").unlink()
    (exp / "optuna.db").unlink()

    code, out, err = run_cli("search", "--resume", "lost", "--storage", storage, "--no-report", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert not (exp / "_orphans").exists(), out  # no finished trial called unfinished
    after = finals(exp)
    assert len(after) == 4
    assert {k: after[k] for k in kept} == kept  # not run again: the same final results, untouched
    assert "rebuilt it from the trial folders (2 finished, 0 failed trial(s) kept, none run again)" in out, out
    assert "2 of 4 trials ended, 2 to run" in out, out
    trials = study(exp).trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    rebuilt = {t.user_attrs[TUNE_ID_ATTR]: t for t in trials if t.user_attrs[TUNE_ID_ATTR] in before}
    assert rebuilt.keys() == before.keys()
    for tune_id, old in before.items():
        new = rebuilt[tune_id]
        assert new.values == old.values and new.params == old.params and new.distributions == old.distributions
        assert new.user_attrs[CONSTRAINTS_ATTR] == old.user_attrs[CONSTRAINTS_ATTR]
        assert new.system_attrs == old.system_attrs  # Optuna's own record of the constraints too
