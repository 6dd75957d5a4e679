"""Multi-label tasks in the tabular suite: search → report → export → apply, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli

TINY = ["--trials", "4", "--train-option", "epochs=6", "--train-option", "batch_size=32", "--train-option", "expert_epochs=1",
        "--model-option", "width=32", "--cpus-per-trial", "1"]
SPACE = "fusion: {method: none}\npruning: {importance: [l2, multitask_taylor]}\nfinetune: {epochs: 1}\n"
TASKS = ["--task", "tags:multilabel:red,big,fast", "--task", "price:regression:price"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import pandas as pd

    d = tmp_path_factory.mktemp("multilabel")
    rng = np.random.default_rng(0)
    n = 600
    a, b, c = rng.normal(size=n), rng.normal(size=n), rng.choice(["x", "y"], size=n)
    frame = pd.DataFrame(dict(a=a, b=b, c=c, red=(a > 0).astype(int), big=(b + 0.3 * a > 0.2),
                              fast=((a - b) > 0.5).astype(float), price=2 * a - b + rng.normal(size=n) * 0.3))
    frame.to_csv(d / "f.csv", index=False)
    (d / "space.yaml").write_text(SPACE)
    return d


def test_a_multilabel_task_is_one_head_with_one_logit_per_label(data):
    from mtl_models import suites

    s = suites.get("tabular", path=str(data / "f.csv"), features=["a", "b", "c"],
                   tasks=["tags:multilabel:red,big,fast", "price:regression:price"])
    tags = s.task("tags")
    assert (tags.kind, tags.num_outputs, tags.metric, tags.sense) == ("multilabel", 3, "label_accuracy", "max")
    assert s.train.y["tags"].shape == (len(s.train), 3) and set(s.train.y["tags"].unique().tolist()) == {0.0, 1.0}
    assert s.build_model(trunk="mlp", width=16)(s.val.x[:5])["tags"].shape == (5, 3)


@pytest.mark.parametrize("task, words", [
    ("tags:multilabel:red,price", "'price' holds"),            # numbers other than 0/1
    ("tags:multilabel:red", "needs two or more columns"),
    ("tags:multilabel:red,c", "holds text"),
    ("tags:multilabel:red,nope", "'nope' does not exist"),
    ("tags:multilabel:red,red", "named twice"),
])
def test_bad_multilabel_columns_fail_in_one_line(data, task, words):
    from mtl_models import suites
    from spaces.errors import PrunefuseError

    with pytest.raises(PrunefuseError) as info:
        suites.get("tabular", path=str(data / "f.csv"), features=["a", "b"], tasks=[task])
    assert words in str(info.value) and "\n" not in str(info.value)


def test_multilabel_search_report_export_apply(data, tmp_path):
    storage, exp = tmp_path / "runs", tmp_path / "runs" / "ml"
    code, out, err = run_cli("search", "--suite", "tabular", "--data", data / "f.csv", "--features", "a,b,c",
                             *TASKS, "--storage", storage, "--name", "ml", *TINY, "--space", data / "space.yaml",
                             "--max-task-drop", "50")
    assert code == 0, err[-3000:]
    dense = json.loads((exp / "dense.json").read_text())
    assert dense["senses"] == {"tags": "max", "price": "max"} and dense["task_metrics"]["tags"] == "label_accuracy"
    assert dense["metric/tags"] > 0.75          # the labels are learnable from a, b
    page = (exp / "report.html").read_text()
    assert "tags: label_accuracy ↑" in page and "Δm% vs dense" in page
    code, out, err = run_cli("export", exp, "--knee", "-o", tmp_path / "policy.yaml")
    assert code == 0, err[-3000:]
    from spaces import Policy

    policy = Policy.from_yaml(tmp_path / "policy.yaml")
    code, out, err = run_cli("apply", tmp_path / "policy.yaml", "-o", tmp_path / "model",
                             "--cache", storage / "_artifacts", cwd=tmp_path)
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    for key in ("score", "metric/tags", "metric/price", "params"):
        assert metrics[key] == pytest.approx(policy.provenance["metrics"][key], abs=1e-6), key
