"""The deployed model: ONNX export and parity on every built-in trunk, int8 quantization in
the policy, ONNX Runtime latency for the dense base and the trials alike, MLflow tracking."""
import json

import pytest
import torch
import yaml

from conftest import TINY_SUITE, run_cli, tiny_policy
from mtl_models.deployment import deploy, quantize
from mtl_models.models import TRUNKS
from spaces import PrunefuseError
from spaces.policy import Quantization


def _suite_for(trunk: str):
    """A tiny suite the trunk takes: images for most, token ids for a token trunk."""
    from mtl_models import suites

    for name, options in (("multidigits", TINY_SUITE), ("sequences", {})):
        suite = suites.get(name, **options)
        try:
            return suite, suite.build_model(trunk=trunk)
        except PrunefuseError:
            continue
    pytest.fail(f"no built-in suite takes trunk {trunk!r}")


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_onnx_parity_on_every_built_in_trunk(trunk):
    torch.manual_seed(0)
    suite, model = _suite_for(trunk)
    model.eval()
    graph = deploy.export_onnx(model, suite.example_inputs(2))
    assert deploy.check_parity(model, graph, suite.val.x[:64]) <= 1e-3
    sess = deploy.session(graph)
    assert [o.name for o in sess.get_outputs()] == suite.task_names      # one named output per task
    for batch in (1, 7):                                                   # the batch axis is dynamic
        out = deploy.run(sess, suite.val.x[:batch])
        assert all(v.shape[0] == batch for v in out.values())


def test_parity_beyond_tolerance_is_one_error(tiny_suite):
    a, b = tiny_suite.build_model(trunk="mlp", width=16), tiny_suite.build_model(trunk="mlp", width=16)
    with pytest.raises(PrunefuseError, match="ONNX parity failed: .* up to"):
        deploy.check_parity(a, deploy.export_onnx(b, tiny_suite.example_inputs(2)), tiny_suite.val.x[:32])


def test_quantization_is_deterministic_and_int8_is_counted(tiny_suite, tiny_artifacts):
    model = tiny_suite.build_model(trunk="mlp", width=64, depth=2)
    model.load_state_dict(tiny_artifacts.base)
    fp32 = deploy.graph_bytes(deploy.export_onnx(model, tiny_suite.example_inputs(2)))
    for method in quantize.METHODS:
        spec = Quantization(method=method, calibration_samples=256)
        first, again = quantize.quantize(model, tiny_suite, spec), quantize.quantize(model, tiny_suite, spec)
        assert first.onnx_model == again.onnx_model                        # rebuilt byte for byte
        assert deploy.graph_bytes(first.onnx_model) < 0.4 * fp32, method   # int8 weights: one byte each
        assert set(first(tiny_suite.val.x[:5])) == set(tiny_suite.task_names)


def test_policy_methods_are_the_quantizers():
    from typing import get_args

    assert set(get_args(Quantization.model_fields["method"].annotation)) == {"none", *quantize.METHODS}


def test_quantized_trial_measures_the_int8_graph(tiny_suite, tiny_artifacts):
    from mtl_models.pipeline import MeasureSpec, apply_policy

    spec = MeasureSpec(latency_batch=32, runs=3, warmup=1, latency_backend="onnxruntime")
    _, m = apply_policy(tiny_suite, tiny_policy(tiny_suite, quantization={"method": "dynamic_int8"}),
                        tiny_artifacts, measure_spec=spec)
    assert m["quantization"] == "dynamic_int8" and m["latency_backend"] == "onnxruntime"
    assert m["bytes"] < 0.5 * m["fp32_bytes"] and abs(m["score"] - m["fp32_score"]) < 5
    with pytest.raises(PrunefuseError, match="--latency-backend onnxruntime"):
        apply_policy(tiny_suite, tiny_policy(tiny_suite, quantization={"method": "static_int8"}), tiny_artifacts,
                     measure_spec=MeasureSpec(latency_batch=32, runs=3))


# --- the product: a tiny search with int8 in the space, timed in ONNX Runtime, tracked in MLflow ---

TINY = ["--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=400", "--suite-option", "test_pairs=400",
        "--train-option", "epochs=3", "--train-option", "expert_epochs=1", "--model-option", "width=64",
        "--model-option", "depth=2", "--measure-option", "latency_batch=64", "--measure-option", "runs=5"]
SPACE = {"fusion": {"method": "none"}, "pruning": {"importance": "l2"}, "finetune": {"epochs": 0.5},
         "quantization": {"method": ["dynamic_int8", "static_int8"], "calibration_samples": 256}}
TRIALS = 2


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    code, _, err = run_cli("search", "--storage", root / "runs", "--name", "int8", "--trials", TRIALS,
                             "--space", root / "space.yaml", "--latency-backend", "onnxruntime",
                             "--tracking", "mlflow", "--no-report", *TINY, cwd=root)
    assert code == 0, err[-3000:]
    return root, root / "runs" / "int8"


def test_onnxruntime_times_the_dense_base_and_the_trials_alike(experiment):
    from reports import load_experiment

    _, exp = experiment
    dense = json.loads((exp / "dense.json").read_text())
    assert dense["latency_backend"] == "onnxruntime" and "quantization" not in dense
    df = load_experiment(exp)
    assert len(df) == TRIALS and (df["status"] == "finished").all()
    assert (df["latency_backend"] == "onnxruntime").all() and df["quantization"].isin(quantize.METHODS).all()
    assert (df["bytes"] < 0.5 * df["fp32_bytes"]).all()


def test_mlflow_runs_read_back(experiment, monkeypatch):
    import mlflow

    _, exp = experiment
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the default store needs no opt-out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{exp / 'mlflow.db'}")   # MLflow's recommended backend
    assert not (exp / "mlruns").exists() and (exp / "mlartifacts").is_dir()
    runs = client.search_runs([client.get_experiment_by_name("int8").experiment_id])
    assert len(runs) == TRIALS and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert run.data.params["policy/quantization/method"] in quantize.METHODS   # policy knobs as params
        assert "policy/pruning/sparsity/trunk.fc1" in run.data.params
        assert [m.step for m in client.get_metric_history(run.info.run_id, "score")] == [1]
        text = client.download_artifacts(run.info.run_id, "policy.yaml")
        from spaces import Policy

        assert Policy.from_yaml(text).quantization.method == run.data.params["policy/quantization/method"]


def test_quantized_policy_exported_and_applied_reproduces_the_trial(experiment, tmp_path):
    from mtl_models.models import checkpoint

    root, exp = experiment
    code, _, err = run_cli("export", exp, "--knee", "-o", tmp_path / "p.yaml", cwd=root)
    assert code == 0, err
    policy = yaml.safe_load((tmp_path / "p.yaml").read_text())
    measured = policy["provenance"]["metrics"]
    code, out, err = run_cli("apply", tmp_path / "p.yaml", "-o", tmp_path / "model",
                             "--cache", root / "runs" / "_artifacts", cwd=root)
    assert code == 0, err
    applied = json.loads((tmp_path / "model" / "metrics.json").read_text())
    for key in [k for k in measured if k.startswith(("metric/", "test/"))]:
        assert abs(applied[key] - measured[key]) * 100 <= 0.5, key   # within 0.5 points
    assert applied["latency_backend"] == "onnxruntime" and applied["quantization"] == policy["quantization"]["method"]
    assert applied["onnx_max_abs_diff"] < 1e-3 and "max abs diff" in out
    # model.onnx is the int8 graph; model.pt + policy rebuild it byte for byte
    model, loaded = checkpoint.load(tmp_path / "model")
    suite_model = quantize.quantize(model, _suite(loaded), loaded.quantization)
    assert suite_model.onnx_model == (tmp_path / "model" / "model.onnx").read_bytes()
    assert deploy.graph_bytes(suite_model.onnx_model) == applied["bytes"]


def _suite(policy):
    from mtl_models import suites

    return suites.from_spec(policy.suite)


def test_int8_space_timed_in_torch_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"quantization": {"method": "static_int8"}}))
    code, _, err = run_cli("search", "--storage", tmp_path / "runs", "--space", tmp_path / "space.yaml",
                           "--trials", 1, *TINY, cwd=tmp_path)
    assert code == 2 and err.count("\n") == 1 and "--latency-backend onnxruntime" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    code, _, err = run_cli("search", "--tracking", "wandb", "--trials", 1, cwd=tmp_path)
    assert code == 2 and "expected mlflow or mlflow=URI" in err


def test_tracking_defaults_to_sqlite_in_the_experiment_and_keeps_a_given_uri(tmp_path):
    from search import tracking
    from search.config import SearchConfig

    cfg = SearchConfig(name="t", storage=str(tmp_path), tracking="mlflow")
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 't' / 'mlflow.db'}"
    assert tracking.artifact_location(cfg) == f"file://{tmp_path / 't' / 'mlartifacts'}"
    for given in ("http://host:5000", "sqlite:////data/mine.db", "file:///data/mlruns"):
        cfg = SearchConfig(name="t", storage=str(tmp_path), tracking=f"mlflow={given}")
        assert tracking.tracking_uri(cfg) == given and tracking.artifact_location(cfg) is None
