"""The product as a user meets it: the `prunefuse` console script on a tiny real search."""
import json

import pytest
import yaml

from conftest import run_cli

TINY = ["--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=400", "--suite-option", "test_pairs=400",
        "--train-option", "epochs=3", "--train-option", "expert_epochs=1", "--model-option", "width=64",
        "--model-option", "depth=2", "--measure-option", "latency_batch=64", "--measure-option", "runs=10"]
SPACE = {"fusion": {"method": ["none", "ties"]}, "pruning": {"importance": ["l2", "multitask_taylor"]},
         "finetune": {"epochs": 0.5}}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    code, out, err = run_cli("search", "--storage", root / "runs", "--name", "tiny", "--trials", 8,
                             "--space", root / "space.yaml", *TINY, cwd=root)
    assert code == 0, err[-3000:]
    return root, root / "runs" / "tiny", out


def test_search_leaves_experiment_report_and_policy(experiment):
    root, exp, out = experiment
    for name in ("prunefuse.json", "dense.json", "finished.json", "optuna.db", "report.html", "policy.yaml"):
        assert (exp / name).is_file(), name
    trials = sorted(exp.glob("trial_*"))
    assert len(trials) == 8 and all((t / "policy.yaml").is_file() for t in trials)
    assert "knee policy" in out and "next: prunefuse apply" in out
    # the search ran from `root` with storage root/runs, i.e. ./runs: apply's default cache fits
    assert "--cache" not in [line for line in out.splitlines() if line.startswith("next:")][0]
    html = (exp / "report.html").read_text()
    assert "<script src=\"http" not in html and len(html) > 1_000_000  # plotly.js inlined
    # the end of a search re-timed the front and the dense base in one process; the report shows both figures
    timings = json.loads((exp / "remeasured.json").read_text())
    assert "dense" in timings and len(timings) >= 2 and "latency_ms during the search" in html
    # the report of a real search: every figure drawn, and each front point's export command
    assert html.count('class="plotly-graph-div"') == 6 and f"prunefuse export {exp} --trial" in html


def test_every_trial_recorded_with_node_and_metrics(experiment):
    from reports import load_experiment

    _, exp, _ = experiment
    df = load_experiment(exp)
    assert (df["status"] == "finished").all() and len(df) == 8
    assert df["node_id"].str.len().gt(10).all() and (df["device"] == "cpu").all()
    for col in ("score", "params", "latency_ms", "macs", "bytes", "delta_m", "metric/left", "test/sum",
                "policy/pruning/sparsity/trunk.fc1", "policy/weighting/weights/left"):
        assert df[col].notna().all(), col


def test_optuna_study_is_in_sqlite(experiment):
    import optuna

    _, exp, _ = experiment
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8 and len(study.directions) == 3


def test_export_then_apply_reproduces_the_trial(experiment, tmp_path):
    root, exp, _ = experiment
    code, out, err = run_cli("export", exp, "--knee", "-o", tmp_path / "p.yaml", cwd=root)
    assert code == 0, err
    policy = yaml.safe_load((tmp_path / "p.yaml").read_text())
    measured = policy["provenance"]["metrics"]
    code, out, err = run_cli("apply", tmp_path / "p.yaml", "-o", tmp_path / "model",
                             "--cache", root / "runs" / "_artifacts", cwd=root)
    assert code == 0, err
    applied = json.loads((tmp_path / "model" / "metrics.json").read_text())
    for key in [k for k in measured if k.startswith(("metric/", "test/"))]:
        assert abs(applied[key] - measured[key]) * 100 <= 0.5, key   # within 0.5 points
    assert applied["params"] == measured["params"]
    assert "reusing the dense base" in out  # the cache, not a retrain
    assert applied["matches_trial"] is True and "matches its trial" in out  # said on screen, not only in the file


def test_export_by_trial_and_by_constraints(experiment, tmp_path):
    from reports import load_experiment

    root, exp, _ = experiment
    df = load_experiment(exp)
    smallest = df.loc[df["params"].idxmin()]
    code, _, err = run_cli("export", exp, "--trial", smallest["trial_id"], "-o", tmp_path / "a.yaml")
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "a.yaml").read_text())["provenance"]["trial"] == smallest["trial_id"]
    budget = int(df["params"].median())
    code, _, err = run_cli("export", exp, "--max-params", budget, "-o", tmp_path / "b.yaml")
    assert code == 0, err
    chosen = yaml.safe_load((tmp_path / "b.yaml").read_text())["provenance"]["metrics"]
    assert chosen["params"] <= budget
    feasible = df[df["params"] <= budget]
    assert chosen["score"] == pytest.approx(feasible["score"].max())


def _one_line_error(code, err):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunefuse: error:"), err
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["search", "--suite", "nope"], "unknown suite 'nope'"),
    (["search", "--suite-option", "offset=12"], "offset=12 is out of range"),
    (["search", "--suite-option", "colour=red"], "has no option 'colour'"),
    (["search", "--trunk", "resnext"], "unknown trunk 'resnext'"),
    (["search", "--objectives", "score:max,speed:min"], "unknown objective 'speed'"),
    (["search", "--sampler", "grid"], "unknown sampler 'grid'"),
    (["search", "--train-option", "epoch=3"], "'epoch' is not known"),
    (["search", "--trials", "0"], "--trials 0"),
    (["search", "--suite-option", "seed=abc"], "cannot be built with options"),
    (["search", "--model-option", "width=0"], "width=0 is out of range"),
    (["search", "--train-option", "epochs=abc"], "training epochs='abc'"),
    (["search", "--measure-option", "runs=0"], "measure runs=0 is out of range"),
    (["report", "runs/does-not-exist"], "not found"),
    (["export", "runs/does-not-exist", "--knee", "-o", "x.yaml"], "not found"),
    (["apply", "missing.yaml", "-o", "out"], "policy file 'missing.yaml' not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    code, out, err = run_cli(*args, "--storage", tmp_path / "runs", cwd=tmp_path) if args[0] == "search" \
        else run_cli(*args, cwd=tmp_path)
    assert words in _one_line_error(code, err)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists() and not (tmp_path / "x.yaml").exists()


def test_bad_space_and_policy_files(tmp_path):
    (tmp_path / "space.yaml").write_text("pruning:\n  sparsity: {low: 0.0, high: 1.5}\n")
    line = _one_line_error(*run_cli("search", "--space", tmp_path / "space.yaml", "--storage", tmp_path / "runs",
                                    cwd=tmp_path)[::2])
    assert "reaches 1.5" in line
    (tmp_path / "space.yaml").write_text("pruning: {sparsity: [0.1, \n")
    assert "malformed YAML" in _one_line_error(*run_cli("search", "--space", tmp_path / "space.yaml",
                                                        cwd=tmp_path)[::2])
    (tmp_path / "p.yaml").write_text("schema: prunefuse.policy/1\nsuite: {name: multidigits}\nmodel: {trunk: mlp}\n"
                                     "pruning: {sparsity: {trunk.fc1: 1.2}}\n")
    assert "sparsity of trunk.fc1 is 1.2" in _one_line_error(*run_cli("apply", tmp_path / "p.yaml", "-o",
                                                                      tmp_path / "out", cwd=tmp_path)[::2])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_existing_experiment_is_not_overwritten(experiment):
    root, exp, _ = experiment
    before = (exp / "prunefuse.json").read_text()
    line = _one_line_error(*run_cli("search", "--storage", root / "runs", "--name", "tiny", cwd=root)[::2])
    assert "already exists" in line and "--resume tiny" in line
    assert (exp / "prunefuse.json").read_text() == before


def test_export_to_an_existing_file_is_atomic(experiment, tmp_path, monkeypatch, capsys):
    """A real export whose final rename fails (a full disk at the last moment) leaves the old
    file whole and no temporary file beside it, and says so in one line."""
    import os

    from search import cli

    root, exp, _ = experiment
    target = tmp_path / "keep.yaml"
    target.write_text("previous\n")
    renames = []

    def full_disk(src, dst):
        renames.append(dst)
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli.main(["export", str(exp), "--knee", "-o", str(target)]) == 2
    assert [str(d) for d in renames] == [str(target)]  # the export got as far as replacing the file
    assert target.read_text() == "previous\n" and [f.name for f in tmp_path.iterdir()] == ["keep.yaml"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0].lower()


def test_report_remeasure_times_the_front_alone(experiment, tmp_path):
    from reports import experiment as exp_io
    from reports import select

    root, exp, _ = experiment
    searched = (exp / "remeasured.json").read_text()  # the search's own end-of-search re-timing
    df = exp_io.load_experiment(exp)
    front = select.front(df, exp_io.objectives(exp), exp)
    # As if an earlier re-timing had found a trial slow and taken it off the front.
    off = df[(df["status"] == "finished") & ~df["trial_id"].isin(front["trial_id"])]["trial_id"].iloc[0]
    (exp / "remeasured.json").write_text(json.dumps({**json.loads(searched), off: 1e6}))
    code, out, err = run_cli("report", exp, "--remeasure", "-o", tmp_path / "r.html", cwd=root)
    assert code == 0, err
    timings = json.loads((exp / "remeasured.json").read_text())
    dense = timings.pop("dense")
    assert set(front["trial_id"]) <= set(timings) and all(v > 0 for v in [dense, *timings.values()])
    # A trial an earlier re-timing took off the front keeps that figure (not its search-time one).
    assert timings[off] == 1e6
    df = exp_io.load_experiment(exp)
    assert (df.set_index("trial_id").loc[list(timings), "latency_ms"].to_numpy() == list(timings.values())).all()
    # "in the search" is the search's own figure, not the earlier re-timing the loader overlays.
    for _, row in front.iterrows():
        assert f"{row['trial_id']}: {row['latency_ms_search']:.3f} ms in the search" in out
    assert exp_io.load_dense(exp)["latency_ms"] == dense  # the dense base re-timed with the front
    assert "re-measured in one process, interleaved with the dense base" in (tmp_path / "r.html").read_text()
    (exp / "remeasured.json").write_text(searched)  # leave the shared experiment as the search wrote it


@pytest.mark.parametrize("args, words", [
    (["export", "runs/x"], "export: the following arguments are required: -o/--output"),
    (["search", "--trials", "many"], "search: argument --trials: invalid int value"),
    (["search", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_argument_mistakes_are_one_line_too(tmp_path, args, words):
    assert words in _one_line_error(*run_cli(*args, cwd=tmp_path)[::2])


def test_export_refuses_mixed_selectors_and_bad_floors(experiment, tmp_path):
    root, exp, _ = experiment
    line = _one_line_error(*run_cli("export", exp, "--knee", "--max-params", 0, "-o", tmp_path / "a.yaml")[::2])
    assert "choose one way" in line
    line = _one_line_error(*run_cli("export", exp, "--min-task", "left=abc", "-o", tmp_path / "a.yaml")[::2])
    assert "--min-task left='abc'" in line
    assert not (tmp_path / "a.yaml").exists()


def test_a_malformed_experiment_file_is_one_line(tmp_path):
    exp = tmp_path / "runs" / "broken"
    exp.mkdir(parents=True)
    (exp / "prunefuse.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(*run_cli("export", exp, "--knee", "-o", tmp_path / "p.yaml")[::2])
    assert "not a prunefuse experiment file" in _one_line_error(
        *run_cli("search", "--resume", "broken", "--storage", tmp_path / "runs")[::2])


def test_the_dense_control_gets_exactly_the_trials_fine_tune(experiment):
    """control.json: the base fine-tuned with the trials' own fine-tune (epochs, lr, batch size,
    precision, seed), unpruned and unfused, measured like a trial; the report draws it."""
    from spaces import Policy

    root, exp, out = experiment
    control = json.loads((exp / "control.json").read_text())
    policy = Policy.from_dict(control["policy"])
    for trial in sorted(exp.glob("trial_*")):
        trial_policy = Policy.from_yaml(trial / "policy.yaml")
        assert policy.finetune == trial_policy.finetune and policy.seed == trial_policy.seed
        assert policy.base == trial_policy.base and policy.model == trial_policy.model
    assert policy.fusion is None and not policy.pruning.sparsity and policy.pruning.global_sparsity is None
    dense = json.loads((exp / "dense.json").read_text())
    assert control["params"] == dense["params"]  # nothing pruned
    assert any(control[k] != dense[k] for k in control if k.startswith("metric/"))  # but it was fine-tuned
    assert "dense control (the base fine-tuned as every trial is)" in out
    html = (exp / "report.html").read_text()
    assert '"name":"dense control"' in html and "Δm% vs control" in html and "<dt>dense control</dt>" in html


def test_export_floors_against_the_control(experiment, tmp_path):
    root, exp, _ = experiment
    code, out, err = run_cli("export", exp, "--knee", "--max-task-drop", 100, "--floors-vs", "control",
                             "-o", tmp_path / "p.yaml", cwd=root)
    assert code == 0, err
    # floors no trial can meet: one line, nothing written
    code, out, err = run_cli("export", exp, "--knee", "--max-task-drop", 0, "--floors-vs", "control",
                             "-o", tmp_path / "q.yaml", cwd=root)
    assert code == 2 and not (tmp_path / "q.yaml").exists() and len(err.strip().splitlines()) == 1


def test_export_against_a_control_an_old_experiment_lacks(experiment, tmp_path):
    import shutil

    root, exp, _ = experiment
    old = tmp_path / "old"
    shutil.copytree(exp, old)
    (old / "control.json").unlink()
    code, out, err = run_cli("export", old, "--knee", "--max-task-drop", 5, "--floors-vs", "control",
                             "-o", tmp_path / "p.yaml", cwd=root)
    assert code == 2 and "no dense control" in err and not (tmp_path / "p.yaml").exists()
