"""Bring your own tasks and model: the tabular suite, plugin suites, and --base-checkpoint.

Three real end-to-end runs through the `prunefuse` console script (a CSV tabular search →
report → export --knee → apply; the worked plugin example `examples/shapes_suite.py` →
its own report and knee policy → apply; a Parquet search started from a user's
checkpoint), all tiny (4 trials, 2 epochs, width 32, cheap space). The bad-input cases run
`search.cli.main` in-process (the same code the console script runs, minus a 3-second
interpreter start each); a few are repeated through the real script.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli

TASKS = ["--task", "churn:classification:churn", "--task", "spend:regression:spend"]
TINY = ["--trials", "4", "--train-option", "epochs=2", "--train-option", "expert_epochs=1",
        "--model-option", "width=32", "--cpus-per-trial", "1"]
SPACE = "fusion: {method: none}\npruning: {importance: l2}\nfinetune: {epochs: 1}\n"


def make_frame(n: int = 600, seed: int = 0):
    """Numeric a, b; categorical c; a classification label (yes/no) and a regression label."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n) * 10 + 5
    c = rng.choice(["red", "green", "blue"], size=n)
    churn = np.where(a + (c == "red") + rng.normal(size=n) * 0.3 > 0.5, "yes", "no")
    spend = 3 * a + 0.2 * b + (c == "blue") * 2 + rng.normal(size=n) * 0.5
    return pd.DataFrame(dict(a=a, b=b, c=c, churn=churn, spend=spend))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("byo")
    df = make_frame()
    df.to_csv(d / "f.csv", index=False)
    df.to_parquet(d / "f.parquet")
    (d / "space.yaml").write_text(SPACE)
    return d


def tabular_options(path, **extra):
    return dict(path=str(path), features=["a", "b", "c"],
                tasks=["churn:classification:churn", "spend:regression:spend"], **extra)


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunefuse: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def cli_main(capsys, *args):
    """search.cli.main in-process: (exit code, stdout, stderr)."""
    from search.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- the tabular suite, in-process ---------------------------------------------------

def test_tabular_encoding_and_seeded_splits(data):
    from mtl_models import suites

    s = suites.get("tabular", **tabular_options(data / "f.csv"))
    assert s.input_shape == (2 + 3,)                       # a, b standardised + c one-hot (3)
    assert [(t.name, t.kind, t.num_outputs, t.metric) for t in s.tasks] == \
        [("churn", "classification", 2, "accuracy"), ("spend", "regression", 1, "r2")]
    assert (len(s.train), len(s.val), len(s.test)) == (420, 90, 90)
    x = s.train.x.numpy()
    assert np.allclose(x[:, :2].mean(0), 0, atol=1e-5) and np.allclose(x[:, :2].std(0), 1, atol=1e-3)
    assert set(np.unique(x[:, 2:])) == {0.0, 1.0} and np.all(x[:, 2:].sum(1) == 1)
    assert s.options["data_sha256"] and s.options["path"] == str(data / "f.csv")
    # Seeded: the same seed gives the same split, another seed another one.
    again = suites.get("tabular", **tabular_options(data / "f.csv"))
    assert np.array_equal(again.val.x.numpy(), s.val.x.numpy())
    other = suites.get("tabular", **tabular_options(data / "f.csv", seed=1))
    assert not np.array_equal(other.val.x.numpy(), s.val.x.numpy())
    # Parquet gives the same suite as the CSV it was written from.
    pq = suites.get("tabular", **tabular_options(data / "f.parquet"))
    assert np.allclose(pq.train.x.numpy(), x, atol=1e-6)
    assert all(np.allclose(pq.test.y[t].numpy(), s.test.y[t].numpy(), atol=1e-6) for t in s.task_names)


def test_tabular_bad_inputs_fail_with_one_line_naming_the_column(data, tmp_path, capsys):
    df = make_frame()
    cases = {}
    bad = df.copy()
    bad.loc[17, "b"] = np.nan
    cases["missing.csv"] = (bad, ["'b'", "missing", "row 17"])
    bad = df.copy().astype({"b": object})
    bad.loc[5, "b"] = "?"
    cases["text_feature.csv"] = (bad, ["'b'", "'?'"])
    bad = df.copy().astype({"spend": object})
    bad.loc[3, "spend"] = "lots"
    cases["text_label.csv"] = (bad, ["'spend'", "'lots'"])
    bad = df.copy()
    bad.loc[9, "spend"] = np.inf
    cases["inf_label.parquet"] = (bad, ["'spend'", "inf"])
    bad = df.copy()
    bad.loc[4, "churn"] = None
    cases["missing_label.parquet"] = (bad, ["'churn'", "missing"])
    storage = tmp_path / "runs"
    for name, (frame, words) in cases.items():
        path = tmp_path / name
        frame.to_parquet(path) if name.endswith(".parquet") else frame.to_csv(path, index=False)
        code, _, err = cli_main(capsys, "search", "--suite", "tabular", "--data", path, "--features", "a,b,c",
                                *TASKS, "--storage", storage, "--name", "bad", "--trials", "1")
        assert_one_line_error(code, err, *words)
    good = data / "f.csv"
    for args, words in [
        (["--features", "a,b,c", "--task", "churn:classification:churned"], ["'churned'", "does not exist"]),
        (["--features", "a,zz", *TASKS], ["'zz'", "does not exist"]),
        (["--features", "a,b,c", "--task", "spend:classification:spend"], ["'spend'", "regression"]),
        (["--features", "a,b,c", "--task", "churn:classify:churn"], ["classify"]),
        (["--features", "a,b,c", "--task", "my.task:classification:churn"], ["my.task"]),
        (["--features", "a,b,churn", "--task", "churn:classification:churn"], ["'churn'", "both"]),
        (["--features", "a,b,c"], ["--task"]),
    ]:
        code, _, err = cli_main(capsys, "search", "--suite", "tabular", "--data", good, *args,
                                "--storage", storage, "--name", "bad", "--trials", "1")
        assert_one_line_error(code, err, *words)
    code, _, err = cli_main(capsys, "search", "--suite", "tabular", "--data", tmp_path / "nope.csv",
                            "--features", "a", *TASKS, "--storage", storage, "--name", "bad")
    assert_one_line_error(code, err, "nope.csv", "not found")
    assert not storage.exists()  # nothing written for any of them


# --- plugins, in-process -------------------------------------------------------------

BAD_PLUGIN = '''
import torch
from torch import nn
from examples.shapes_suite import make_suite as shapes

class NoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(256, 8))
    def forward(self, x):
        return self.trunk(x)

class TensorOut(NoHeads):
    def __init__(self, tasks):
        super().__init__()
        self.heads = nn.ModuleDict({t.name: nn.Linear(8, t.num_outputs) for t in tasks})
    def forward(self, x):
        return self.trunk(x)

def _with(factory):
    def make(**options):
        s = shapes(train_size=20, val_size=10, test_size=10)
        s.model_factory = factory
        return s
    return make

make_no_heads = _with(lambda suite, **kw: NoHeads())
make_tensor_out = _with(lambda suite, **kw: TensorOut(suite.tasks))
def make_not_a_suite():
    return {"tasks": []}
'''


def test_plugin_suite_and_model_contract(tmp_path, monkeypatch):
    from mtl_models import suites
    from mtl_models.pruning import prunable_layers
    from spaces.errors import PrunefuseError

    monkeypatch.chdir(ROOT)
    s = suites.get("examples.shapes_suite:make_suite", train_size=60, val_size=20, test_size=20)
    assert s.name == "examples.shapes_suite:make_suite"       # what a policy records
    assert s.task_names == ["shape", "size"] and s.input_shape == (1, 16, 16)
    model = s.build_model(trunk="cnn", width=16)
    assert type(model).__name__ == "ShapesNet" and sorted(model.heads) == ["shape", "size"]
    assert prunable_layers(model) == ["trunk.conv1", "trunk.conv2", "trunk.fc"]
    out = model(s.example_inputs(3))
    assert out["shape"].shape == (3, 3) and out["size"].shape == (3, 1)
    with pytest.raises(PrunefuseError, match="trunks 'mlp' and 'cnn'"):
        s.build_model(trunk="resnet")
    with pytest.raises(PrunefuseError, match="has no option 'bogus'"):
        suites.get("examples.shapes_suite:make_suite", bogus=1)

    (tmp_path / "byo_bad_plugin.py").write_text(BAD_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PrunefuseError, match="no `heads` nn.ModuleDict"):
        suites.get("byo_bad_plugin:make_no_heads").build_model()
    with pytest.raises(PrunefuseError, match="must return a dict"):
        suites.get("byo_bad_plugin:make_tensor_out").build_model()
    with pytest.raises(PrunefuseError, match="expected a TaskSuite"):
        suites.get("byo_bad_plugin:make_not_a_suite")
    with pytest.raises(PrunefuseError, match="no function 'nothing'"):
        suites.get("byo_bad_plugin:nothing")
    with pytest.raises(PrunefuseError, match="cannot import suite plugin module 'no_such_pkg.mod'"):
        suites.get("no_such_pkg.mod:make")


# --- end to end through the console script -------------------------------------------

def test_tabular_csv_search_report_export_apply(data, tmp_path, capsys):
    storage, exp = tmp_path / "runs", tmp_path / "runs" / "t"
    code, out, err = run_cli("search", "--suite", "tabular", "--data", data / "f.csv", "--features", "a,b,c",
                             *TASKS, "--storage", storage, "--name", "t", *TINY,
                             "--space", data / "space.yaml", "--no-report")
    assert code == 0, err[-3000:]
    assert len(list(exp.glob("trial_*"))) == 4
    code, out, err = run_cli("report", exp)
    assert code == 0, err[-3000:]
    assert (exp / "report.html").stat().st_size > 10_000
    code, out, err = run_cli("export", exp, "--knee", "-o", tmp_path / "policy.yaml")
    assert code == 0, err[-3000:]

    from spaces import Policy

    policy = Policy.from_yaml(tmp_path / "policy.yaml")
    assert policy.suite["name"] == "tabular" and policy.suite["data_sha256"]
    assert policy.suite["path"] == str(data / "f.csv") and policy.model == {"trunk": "mlp", "width": 32}
    # Applied from another folder: the policy alone rebuilds suite and model, and reproduces the trial.
    code, out, err = run_cli("apply", tmp_path / "policy.yaml", "-o", tmp_path / "model",
                             "--cache", storage / "_artifacts", cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "reusing the dense base" in out
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["score"] == pytest.approx(policy.provenance["metrics"]["score"], abs=1e-6)

    _apply_mismatches(policy, data, tmp_path, storage, capsys)


def _apply_mismatches(policy, data, tmp_path, storage, capsys):
    """A policy for another suite or model fails before any training, naming the mismatch."""

    def apply_fails(changed: dict, *words):
        path = tmp_path / "changed.yaml"
        policy.replace(**changed).to_yaml(path)
        code, _, err = cli_main(capsys, "apply", path, "-o", tmp_path / "nope", "--cache", storage / "_artifacts")
        assert_one_line_error(code, err, *words)
        assert not (tmp_path / "nope").exists()

    pruning = policy.pruning.model_dump()
    apply_fails({"pruning": {**pruning, "sparsity": {"trunk.fc9": 0.5}}}, "trunk.fc9")
    weighting = policy.weighting.model_dump()
    apply_fails({"weighting": {**weighting, "weights": {"churn": 0.5, "spent": 0.5}}}, "spent")
    if policy.pruning.sparsity.get("trunk.fc3"):
        apply_fails({"model": {"trunk": "mlp", "width": 32, "depth": 2}}, "trunk.fc3")
    apply_fails({"model": {"trunk": "mlp", "widht": 32}}, "widht")
    # The data file changed since the search: its recorded SHA-256 no longer matches.
    changed = tmp_path / "changed.csv"
    changed.write_text((data / "f.csv").read_text() + "1,2,red,no,3\n")
    apply_fails({"suite": {**policy.suite, "path": str(changed)}}, "changed.csv", "has changed")
    # A policy without the hash (another file's suite) names the first differing suite key.
    apply_fails({"suite": {k: v for k, v in policy.suite.items() if k != "data_sha256"}}, "no data_sha256")


def test_plugin_example_end_to_end(data, tmp_path):
    storage, exp = tmp_path / "runs", tmp_path / "runs" / "shapes"
    suite = "examples.shapes_suite:make_suite"
    code, out, err = run_cli("search", "--suite", suite, "--suite-option", "train_size=400",
                             "--suite-option", "val_size=100", "--suite-option", "test_size=100",
                             "--trunk", "cnn", "--model-option", "channels=4",
                             "--storage", storage, "--name", "shapes", *TINY, "--space", data / "space.yaml",
                             cwd=ROOT)
    assert code == 0, err[-3000:]
    # The search itself wrote the report and the knee policy (no --no-report).
    assert (exp / "report.html").is_file() and (exp / "policy.yaml").is_file()
    from spaces import Policy

    policy = Policy.from_yaml(exp / "policy.yaml")
    assert policy.suite == {"name": suite, "seed": 0, "train_size": 400, "val_size": 100, "test_size": 100,
                            "noise": 0.1}
    assert policy.model == {"trunk": "cnn", "width": 32, "channels": 4}
    assert set(policy.pruning.sparsity) <= {"trunk.conv1", "trunk.conv2", "trunk.fc"}
    code, out, err = run_cli("apply", exp / "policy.yaml", "-o", tmp_path / "model",
                             "--cache", storage / "_artifacts", cwd=ROOT)
    assert code == 0, err[-3000:]
    from mtl_models.models import checkpoint

    model, _ = checkpoint.load(tmp_path / "model")
    assert type(model).__name__ == "ShapesNet"
    # From a folder that does not hold the plugin, apply says so in one line.
    code, out, err = run_cli("apply", exp / "policy.yaml", "-o", tmp_path / "model2", cwd=tmp_path)
    assert_one_line_error(code, err, "examples.shapes_suite", "PYTHONPATH")
    assert not (tmp_path / "model2").exists()


def test_base_checkpoint_parquet(data, tmp_path, capsys):
    import torch

    from mtl_models import suites
    from mtl_models.training.train import TrainOptions, evaluate, train

    suite = suites.get("tabular", **tabular_options(data / "f.parquet"))
    torch.manual_seed(0)
    model = suite.build_model(trunk="mlp", width=32)
    train(model, suite, TrainOptions(epochs=10, lr=3e-3, batch_size=64))
    expected = evaluate(model, suite, "val")
    torch.save(model.state_dict(), tmp_path / "good.pt")
    torch.save(suite.build_model(trunk="mlp", width=64).state_dict(), tmp_path / "wide.pt")
    torch.save(model, tmp_path / "whole.pt")               # pickles the nn.Module: refused
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")

    storage = tmp_path / "runs"
    search = ["search", "--suite", "tabular", "--data", data / "f.parquet", "--features", "a,b,c", *TASKS,
              "--storage", storage, "--name", "ck", "--model-option", "width=32", "--space", data / "space.yaml"]
    for name, words in [("wide.pt", ["'trunk.fc1.weight'", "(64, 5)", "(32, 5)"]),
                        ("whole.pt", ["whole.pt", "pickles Python objects", "state_dict()"]),
                        ("junk.pt", ["junk.pt", "not a torch state dict"]),
                        ("absent.pt", ["absent.pt", "not found"])]:
        code, _, err = cli_main(capsys, *search, "--base-checkpoint", tmp_path / name)
        assert_one_line_error(code, err, *words)
    assert not storage.exists()
    # The same two failures through the real console script.
    for name, word in [("wide.pt", "'trunk.fc1.weight'"), ("whole.pt", "pickles Python objects")]:
        code, _, err = run_cli(*search, "--base-checkpoint", tmp_path / name)
        assert_one_line_error(code, err, word)
    assert not storage.exists()

    # epochs=50 would take a while: the checkpoint replaces base training altogether.
    code, out, err = run_cli(*search, "--trials", "2", "--train-option", "epochs=50", "--no-report",
                             "--base-checkpoint", tmp_path / "good.pt")
    assert code == 0, err[-3000:]
    assert "training the dense base" not in out and "loading the base checkpoint" in out
    dense = json.loads((storage / "ck" / "dense.json").read_text())
    assert dense["dense_val"] == pytest.approx(expected, abs=1e-5)
    code, out, err = run_cli("export", storage / "ck", "--knee", "-o", tmp_path / "policy.yaml")
    assert code == 0, err[-3000:]
    from spaces import Policy

    policy = Policy.from_yaml(tmp_path / "policy.yaml")
    assert policy.base.checkpoint == str(tmp_path / "good.pt")
    # A policy whose model is wider than the checkpoint it names fails naming the key.
    wide = policy.replace(model={"trunk": "mlp", "width": 64})
    wide.to_yaml(tmp_path / "wide_policy.yaml")
    code, _, err = cli_main(capsys, "apply", tmp_path / "wide_policy.yaml", "-o", tmp_path / "out",
                            "--cache", storage / "_artifacts")
    assert_one_line_error(code, err, "trunk.fc1.weight")
    assert not (tmp_path / "out").exists()
