"""`--warm-start EXPERIMENT`: an earlier experiment's finished trials seed the new study (real Ray, Optuna)."""
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

TINY = ["--no-report", "--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=300",
        "--suite-option", "test_pairs=300", "--train-option", "epochs=2", "--model-option", "width=64",
        "--model-option", "depth=2", "--measure-option", "latency_batch=32", "--measure-option", "runs=3",
        "--measure-option", "warmup=1", "--sampler", "tpe", "--objectives", "score:max,params:min"]
SPACE = {"pruning": {"importance": "l2", "sparsity": {"low": 0.0, "high": 0.9}},
         "weighting": {"method": "equal"}, "fusion": {"method": "none"}, "finetune": {"epochs": 0.2}}


def search(root: Path, name: str, *extra):
    return run_cli("search", "--storage", root / "runs", "--name", name, "--space", root / "space.yaml",
                   *TINY, *extra, cwd=root)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    code, _, err = search(root, "first", "--trials", 3)
    assert code == 0, err[-3000:]
    code, out, err = search(root, "second", "--trials", 2, "--warm-start", "first")
    assert code == 0, err[-3000:]
    return root, out


def study(exp: Path):
    import optuna

    return optuna.load_study(study_name=exp.name, storage=f"sqlite:///{exp / 'optuna.db'}")


@pytest.mark.slow
def test_finished_trials_carry_over_into_the_new_study_and_report(warm):
    from reports import experiment
    from reports.html import build_report
    from search.experiment import CARRIED_ATTR

    root, out = warm
    first, second = root / "runs" / "first", root / "runs" / "second"
    assert "3 finished trial(s) carried over" in out
    old = {tuple(sorted(t.params.items())): t.values for t in study(first).trials}
    trials = study(second).trials
    carried = [t for t in trials if CARRIED_ATTR in t.user_attrs]
    assert len(trials) == 5 and len(carried) == 3          # 2 new ones ran, as asked
    for t in carried:
        assert t.state.name == "COMPLETE" and old[tuple(sorted(t.params.items()))] == t.values
    df = experiment.load_experiment(second)
    assert len(df) == 5 and (df["status"] == "finished").all()
    assert df["carried_from"].notna().sum() == 3
    assert df["carried_from"].dropna().map(lambda p: Path(p).resolve() == first.resolve()).all()
    page = build_report(second)
    assert "carried over" in page and "3 trial(s) carried over from" in page


@pytest.mark.slow
def test_an_experiment_of_another_model_is_refused_in_one_line(warm):
    root, _ = warm
    code, _, err = search(root, "third", "--trials", 2, "--warm-start", "first", "--model-option", "width=32")
    assert code == 2, err
    line, = err.strip().splitlines()
    assert "--warm-start 'first'" in line and "model.width: 64 there, 32 here" in line, line
    assert not (root / "runs" / "third").exists()   # refused before anything was written


def test_an_unknown_experiment_is_refused_in_one_line(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    code, _, err = search(tmp_path, "x", "--trials", 2, "--warm-start", "nowhere")
    assert code == 2 and "--warm-start 'nowhere': no experiment there" in err, err
    assert not (tmp_path / "runs" / "x").exists()
