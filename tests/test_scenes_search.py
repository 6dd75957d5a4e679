"""The dense suite end to end: `prunefuse search --suite scenes --trunk cnn` → knee → apply."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

SCENES = ["--suite", "scenes", "--suite-option", "train_images=240", "--suite-option", "val_images=64",
          "--suite-option", "test_images=64"]
TRAIN = ["--train-option", "epochs=6", "--train-option", "batch_size=32", "--trials", "10", "--cpus-per-trial", "1"]
SPACE = ("fusion: {method: none}\npruning: {importance: l2, sparsity: {low: 0.0, high: 0.9}}\n"
         "finetune: {epochs: 1, batch_size: 32}\n")


@pytest.mark.slow
@pytest.mark.parametrize("trunk, channels", [("cnn", "[8,16,32]"), ("resnet", "[8,16,32]")])
def test_scenes_search_front_and_apply_reproduces_the_knee(tmp_path, trunk, channels):
    from reports import experiment, select
    from spaces import Policy
    from spaces.scores import task_score

    (tmp_path / "space.yaml").write_text(SPACE)
    storage, exp = tmp_path / "runs", tmp_path / "runs" / "scenes"
    code, out, err = run_cli("search", *SCENES, "--trunk", trunk, "--model-option", f"channels={channels}", *TRAIN,
                             "--space", tmp_path / "space.yaml", "--storage", storage, "--name", "scenes",
                             timeout=1500)
    assert code == 0, err[-3000:]
    df = experiment.load_experiment(exp)
    front = select.front(df, experiment.objectives(exp), exp)
    assert len(front) >= 3, front[["score", "params"]]
    # Which trials make the front depends on their latencies, timed on a shared machine (the
    # same ten trials gave fronts spanning 2.1× and 3× in params); its ends do not: the
    # smallest model and the best-scoring one are on it whatever the latencies.
    finished = df[df["status"] == "finished"]
    on_front = set(front["trial_id"])
    assert finished.loc[finished["params"].idxmin(), "trial_id"] in on_front
    assert finished.loc[finished["score"].idxmax(), "trial_id"] in on_front
    dense = experiment.load_dense(exp)
    assert dense["senses"] == {"semantic": "max", "depth": "min", "normals": "min"}
    page = (exp / "report.html").read_text()
    assert "depth: abs_err ↓ (lower is better)" in page and "semantic: miou ↑" in page

    policy = Policy.from_yaml(exp / "policy.yaml")           # the knee, exported by the search
    code, out, err = run_cli("apply", exp / "policy.yaml", "-o", tmp_path / "model", "--cache", storage / "_artifacts",
                             timeout=900)
    assert code == 0, err[-3000:]
    applied = json.loads((tmp_path / "model" / "metrics.json").read_text())
    measured = policy.provenance["metrics"]
    for task, sense in dense["senses"].items():
        key = f"metric/{task}"
        assert abs(task_score(applied[key], measured[key], sense)) <= 0.5, (task, applied[key], measured[key])
    assert applied["params"] == measured["params"]
