"""Per-task floors (`--max-task-drop`) and ASHA (`--early-stop asha`) through the real search (CLI)."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

TINY = ["--no-report", "--trials", 6, "--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=300",
        "--suite-option", "test_pairs=300", "--train-option", "epochs=2", "--model-option", "width=64",
        "--model-option", "depth=2", "--measure-option", "latency_batch=32", "--measure-option", "runs=5",
        "--measure-option", "warmup=1"]
MAX_DROP = 2.0
# Either nothing is pruned (feasible: no task drops) or 90% of all units go without a fine-tune
# (infeasible: every task drops far more than 2 points), so both kinds of trial appear.
FLOOR_SPACE = {"pruning": {"importance": "l2", "scope": "global", "sparsity": [0.0, 0.9]},
               "weighting": {"method": "equal"}, "fusion": {"method": "none"}, "finetune": {"epochs": 0.0}}
ASHA_SPACE = {"pruning": {"importance": "l2", "steps": 3, "sparsity": {"low": 0.3, "high": 0.9}},
              "weighting": {"method": "equal"}, "fusion": {"method": "none"}, "finetune": {"epochs": 0.3}}


def search(root: Path, name: str, space: dict, *extra):
    (root / f"{name}.yaml").write_text(yaml.safe_dump(space))
    code, out, err = run_cli("search", "--storage", root / "runs", "--name", name, "--space", root / f"{name}.yaml",
                             *TINY, *extra, cwd=root)
    assert code == 0, err[-3000:]
    return root / "runs" / name


@pytest.fixture(scope="module")
def floors(tmp_path_factory):
    # TPE, the default sampler, takes the floors as its constraints_func.
    return search(tmp_path_factory.mktemp("floors"), "floors", FLOOR_SPACE, "--max-task-drop", MAX_DROP)


def drops(row, dense) -> dict:
    """Percent each task is worse than the dense base (its metric's sense taken into account)."""
    sign = {t: 1.0 if dense["senses"][t] == "max" else -1.0 for t in dense["dense_val"]}
    return {t: sign[t] * (ref - row[f"metric/{t}"]) / abs(ref) * 100.0 for t, ref in dense["dense_val"].items()}


def test_trials_below_a_floor_stay_off_the_front(floors):
    from reports import experiment, select

    df = experiment.load_experiment(floors)
    dense = experiment.load_dense(floors)
    objectives = experiment.objectives(floors)
    done = df[df["status"] == "finished"]
    assert len(done) == 6
    worst = done.apply(lambda r: max(drops(r, dense).values()), axis=1)
    assert (worst > MAX_DROP).any() and (worst <= MAX_DROP).any(), worst.tolist()
    front = select.front(df, objectives, floors)
    assert not front.empty
    assert all(max(drops(r, dense).values()) <= MAX_DROP + 1e-9 for _, r in front.iterrows())
    # The infeasible trials are smaller and faster: without the floors they would be on it.
    infeasible = done[worst > MAX_DROP]
    assert infeasible["params"].min() < front["params"].min()
    assert set(infeasible["trial_id"]).isdisjoint(front["trial_id"])


def test_the_study_records_each_trials_constraint_values(floors):
    import optuna
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    from reports import experiment

    assert _CONSTRAINTS_KEY == "constraints"
    name = json.loads((floors / "prunefuse.json").read_text())["name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{floors / 'optuna.db'}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 6
    dense = experiment.load_dense(floors)
    tasks = list(dense["dense_val"])
    feasible = []
    for t in trials:
        values = t.system_attrs[_CONSTRAINTS_KEY]
        assert len(values) == len(tasks)
        feasible.append(all(v <= 0 for v in values))
    assert any(feasible) and not all(feasible)
    # The values are the drops (points) minus the allowed drop, per task, in the suite's order:
    # they match what the trials reported (the score objective is values[0]).
    df = experiment.load_experiment(floors).set_index("score")
    for t in trials:
        row = df.loc[t.values[0]]
        row = row.iloc[0] if row.ndim > 1 else row
        expected = [drops(row, dense)[task] - MAX_DROP for task in tasks]
        assert t.system_attrs[_CONSTRAINTS_KEY] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def asha(tmp_path_factory):
    return search(tmp_path_factory.mktemp("asha"), "asha", ASHA_SPACE, "--early-stop", "asha", "--sampler", "random")


def reported_steps(exp) -> dict:
    return {d.name: [json.loads(line)["step"] for line in (d / "result.json").read_text().splitlines() if line.strip()]
            for d in sorted(exp.glob("trial_*"))}


def test_asha_stops_trials_between_pruning_steps(asha):
    exp = asha
    reports = {}
    for d in sorted(exp.glob("trial_*")):
        lines = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        reports[d.name] = [r["step"] for r in lines]
        assert all(r["steps"] == 3 for r in lines)
    assert len(reports) == 6
    assert max(len(v) for v in reports.values()) == 3, reports  # some trial ran all its steps
    assert all(v == list(range(1, len(v) + 1)) for v in reports.values())  # one report per pruning step
    from reports import experiment

    df = experiment.load_experiment(exp)
    assert (df["status"] == "finished").any()
    assert set(df["status"]) <= {"finished", "stopped"}


def test_a_stopped_trial_is_pruned_in_the_study(asha):
    import optuna

    steps = reported_steps(asha)
    assert any(len(v) < 3 for v in steps.values())  # ASHA did stop someone
    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{asha / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("COMPLETE") == sum(len(v) == 3 for v in steps.values()), states
