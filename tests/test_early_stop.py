"""Multi-objective early stopping (`--early-stop pareto`): the rule on synthetic rungs, then real Ray."""
import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from search.pareto_stop import should_stop

SENSES = ["max", "min"]  # (score, params)


def test_a_trial_dominated_by_enough_of_its_rung_is_stopped():
    peers = [[0.0, 100.0], [-1.0, 50.0], [-2.0, 20.0]]   # a front of three
    assert should_stop([-3.0, 120.0], peers, SENSES)      # dominated by all three: rank 1 of 4, 3 better
    assert should_stop([-1.5, 60.0], peers + [[-1.2, 55.0]], SENSES)  # dominated, 2+ on better fronts


def test_a_non_dominated_trial_is_kept_however_weak_it_looks():
    peers = [[0.0, 100.0], [-1.0, 50.0], [-2.0, 20.0]]
    assert not should_stop([-9.0, 5.0], peers, SENSES)    # the worst score, but the smallest: on the front
    assert not should_stop([0.5, 500.0], peers, SENSES)   # the best score


def test_nobody_is_stopped_before_enough_trials_reach_the_rung():
    assert not should_stop([-3.0, 120.0], [[0.0, 100.0]], SENSES, min_trials=3)
    assert should_stop([-3.0, 120.0], [[0.0, 100.0]], SENSES, min_trials=2, keep=0.5)


def test_keep_is_the_fraction_kept_by_rank():
    peers = [[0.0, 10.0], [-1.0, 20.0], [-2.0, 30.0], [-3.0, 40.0]]   # a chain: ranks 0, 1, 2, 3
    vector = [-2.5, 35.0]                                           # rank 3 of 5 (3 better)
    assert should_stop(vector, peers, SENSES, keep=0.5)             # ceil(2.5) = 3 better: out
    assert not should_stop(vector, peers, SENSES, keep=0.8)         # ceil(4.0) = 4 needed


TINY = ["--no-report", "--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=300",
        "--suite-option", "test_pairs=300", "--train-option", "epochs=2", "--model-option", "width=64",
        "--model-option", "depth=2", "--measure-option", "latency_batch=32", "--measure-option", "runs=3",
        "--measure-option", "warmup=1"]
# Unstructured trials keep every parameter stored and lose score: dominated by structured ones, so
# the rule has something to stop (with structured pruning alone, score and size trade off monotonically).
SPACE = {"pruning": {"mode": ["structured", "unstructured"], "importance": "l2", "steps": 2,
                     "sparsity": {"low": 0.0, "high": 0.9}},
         "weighting": {"method": "equal"}, "fusion": {"method": "none"}, "finetune": {"epochs": 0.2}}
OBJECTIVES = "score:max,params:min"


def rung_reports(exp: Path) -> dict:
    return {d.name.removeprefix("trial_"): [json.loads(x) for x in (d / "result.json").read_text().splitlines() if x]
            for d in sorted(exp.glob("trial_*"))}


@pytest.fixture(scope="module")
def pareto(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    code, _, err = run_cli("search", "--storage", root / "runs", "--name", "pareto", "--space", root / "space.yaml",
                             "--trials", 8, "--sampler", "random", "--seed", 3, "--objectives", OBJECTIVES,
                             "--max-concurrent", 1, "--early-stop", "pareto", *TINY, cwd=root)
    assert code == 0, err[-3000:]
    return root / "runs" / "pareto"


@pytest.mark.slow
def test_real_search_stops_dominated_trials_at_the_first_step(pareto):
    import optuna

    reports = rung_reports(pareto)
    assert len(reports) == 8
    stopped = {t for t, rs in reports.items() if not rs[-1]["final"]}
    assert stopped, "no trial was stopped"
    assert len(stopped) < 8
    # Each stopped trial was, at step 1, on a worse front than ceil(keep * n) of the trials seen there before it.
    order = sorted(reports, key=lambda t: reports[t][0]["reported_at"])
    for i, t in enumerate(order):
        mine = [reports[t][0]["score"], reports[t][0]["params"]]
        peers = [[reports[o][0]["score"], reports[o][0]["params"]] for o in order[:i]]
        assert should_stop(mine, peers, SENSES) == (t in stopped), (t, mine, peers)
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{pareto / 'optuna.db'}")
    states = sorted(tr.state.name for tr in study.trials)
    assert states.count("PRUNED") == len(stopped) and states.count("COMPLETE") == 8 - len(stopped), states


@pytest.mark.slow
def test_the_report_shows_the_stopped_trials(pareto):
    from reports.html import build_report

    page = build_report(pareto)
    assert 'id="stopped"' in page and "non-dominated rank" in page
