"""The README's main job, with its defaults, meets the first issue's acceptance criteria."""
import time

import pytest
import yaml

from conftest import run_cli


@pytest.mark.slow
def test_default_search_front_and_reproduction(tmp_path):
    from reports import experiment, select

    start = time.time()
    code, out, err = run_cli("search", "--storage", tmp_path / "runs", "--name", "default", cwd=tmp_path, timeout=900)
    assert code == 0, err[-3000:]
    assert time.time() - start < 600
    exp = tmp_path / "runs" / "default"
    assert (exp / "report.html").is_file() and (exp / "policy.yaml").is_file()

    df = experiment.load_experiment(exp)
    assert (df["status"] == "finished").sum() >= 24
    objectives = experiment.objectives(exp)
    front = select.front(df, objectives, exp)
    dense = experiment.load_dense(exp)
    assert len(front) >= 3
    assert front["params"].max() / front["params"].min() >= 3

    def left_right(row):
        return (row["metric/left"] + row["metric/right"]) / 2

    dense_lr = left_right(dense)
    best = front.loc[front["score"].idxmax()]
    assert left_right(best) >= 0.95 * dense_lr
    small = front[front["params"] <= dense["params"] / 3]
    assert len(small) and max(left_right(r) for _, r in small.iterrows()) >= 0.85 * dense_lr

    # The exported knee policy, applied, reproduces its trial's per-task metrics within 0.5 points.
    code, out, err = run_cli("apply", exp / "policy.yaml", "-o", tmp_path / "model",
                             "--cache", tmp_path / "runs" / "_artifacts", cwd=tmp_path)
    assert code == 0, err
    measured = yaml.safe_load((exp / "policy.yaml").read_text())["provenance"]["metrics"]
    import json

    applied = json.loads((tmp_path / "model" / "metrics.json").read_text())
    for key in [k for k in measured if k.startswith(("metric/", "test/"))]:
        assert abs(applied[key] - measured[key]) * 100 <= 0.5, key
