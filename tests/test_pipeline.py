"""The cycle on tiny real models: reproducible, reports every step, saves without pickle."""
import pytest
import torch

from conftest import tiny_policy
from mtl_models.models import checkpoint
from mtl_models.pipeline import MeasureSpec, apply_policy
from spaces import PrunefuseError

FAST = MeasureSpec(latency_batch=32, runs=5, warmup=1)


def test_same_policy_same_metrics(tiny_suite, tiny_artifacts):
    policy = tiny_policy(tiny_suite)
    _, a = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST)
    _, b = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST)
    quality = [k for k in a if k == "score" or k.startswith(("metric/", "test/"))]
    assert {k: a[k] for k in quality} == {k: b[k] for k in quality}
    assert a["params"] == b["params"] < sum(v.numel() for k, v in tiny_artifacts.base.items() if "running" not in k)


def test_reports_after_every_pruning_step(tiny_suite, tiny_artifacts):
    seen = []
    policy = tiny_policy(tiny_suite, pruning={"steps": 3, "sparsity": {"trunk.fc1": 0.6, "trunk.fc2": 0.6}})
    _, final = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST,
                            on_step=lambda step, steps, m: seen.append((step, steps, m["params"])))
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert seen[0][2] > seen[1][2] > seen[2][2] == final["params"]  # the cubic ramp removes more each step


def test_policy_round_to_reaches_the_pruner(tiny_suite, tiny_artifacts):
    policy = tiny_policy(tiny_suite, pruning={"round_to": 16, "sparsity": {"trunk.fc1": 0.3, "trunk.fc2": 0.55}})
    model, _ = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST)
    # 64 units: ⌊44.8⌋ = 44 → 48 and ⌊28.8⌋ = 28 → 32 (multiples of 16), not 44 and 28.
    assert (model.trunk.fc1.out_features, model.trunk.fc2.out_features) == (48, 32)


@pytest.mark.parametrize("method", ["average", "ties", "dare_linear"])
def test_fused_then_pruned(tiny_suite, tiny_artifacts, method):
    coefficients = {t: 0.8 for t in tiny_suite.task_names}
    policy = tiny_policy(tiny_suite, fusion={"method": method, "coefficients": coefficients})
    model, metrics = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST)
    assert metrics["params"] < 8000 and 0.0 <= metrics["metric/left"] <= 1.0
    assert set(model(tiny_suite.example_inputs(2))) == set(tiny_suite.task_names)


def test_dare_masks_follow_the_policy_seed(tiny_suite, tiny_artifacts):
    """DARE's drop masks come from the policy's seed (not a fixed 0); an explicit knob wins."""
    from mtl_models.pipeline import start_model

    coefficients = {t: 0.8 for t in tiny_suite.task_names}

    def trunk(policy_seed, **params):
        fusion = {"method": "dare_linear", "coefficients": coefficients, "params": {"drop_rate": 0.5, **params}}
        policy = tiny_policy(tiny_suite, seed=policy_seed, fusion=fusion)
        model = start_model(tiny_suite, policy, tiny_artifacts, device="cpu")
        return torch.cat([v.flatten() for k, v in model.state_dict().items() if k.startswith("trunk.")])

    assert torch.equal(trunk(1), trunk(1))
    assert not torch.equal(trunk(1), trunk(2))
    assert torch.equal(trunk(1, seed=5), trunk(2, seed=5))


def test_rlw_follows_the_policy_seed(tiny_suite):
    from mtl_models.pipeline import weighting_spec

    assert weighting_spec(tiny_policy(tiny_suite, seed=7, weighting={"method": "rlw"}))["seed"] == 7
    explicit = tiny_policy(tiny_suite, seed=7, weighting={"method": "rlw", "params": {"seed": 3}})
    assert weighting_spec(explicit)["seed"] == 3
    assert "seed" not in weighting_spec(tiny_policy(tiny_suite, seed=7, weighting={"method": "equal"}))


def test_fusion_changes_the_starting_trunk(tiny_suite, tiny_artifacts):
    from mtl_models.pipeline import start_model

    plain = start_model(tiny_suite, tiny_policy(tiny_suite), tiny_artifacts, device="cpu")
    fused = start_model(tiny_suite, tiny_policy(tiny_suite, fusion={
        "method": "task_arithmetic", "coefficients": {t: 1.0 for t in tiny_suite.task_names}}),
        tiny_artifacts, device="cpu")
    w0, w1 = plain.trunk.fc1.weight, fused.trunk.fc1.weight
    base, experts = tiny_artifacts.base["trunk.fc1.weight"], tiny_artifacts.experts
    expected = base + sum(experts[t]["trunk.fc1.weight"] - base for t in experts)
    torch.testing.assert_close(w0, base)
    torch.testing.assert_close(w1, expected)
    # Each head comes from its own expert, not from the base.
    torch.testing.assert_close(fused.heads["left"].weight, experts["left"]["heads.left.weight"])


def test_saved_model_loads_weights_only_and_predicts_the_same(tiny_suite, tiny_artifacts, tmp_path):
    policy = tiny_policy(tiny_suite)
    model, metrics = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST)
    checkpoint.save(model, policy, metrics, tmp_path / "out")
    torch.load(tmp_path / "out" / "model.pt", weights_only=True)  # no pickle needed
    loaded, loaded_policy = checkpoint.load(tmp_path / "out")
    assert loaded_policy == policy
    x = tiny_suite.example_inputs(16)
    with torch.no_grad():
        for task, out in model.eval()(x).items():
            torch.testing.assert_close(loaded(x)[task], out)


def test_cnn_structured_model_round_trips(tiny_suite, tmp_path):
    from mtl_models.pruning import prune

    torch.manual_seed(0)
    model = tiny_suite.build_model(trunk="cnn", channels=[8, 16], fc=32)
    prune(model, {"trunk.conv1": 0.5, "trunk.conv2": 0.5, "trunk.fc": 0.5}, example_inputs=tiny_suite.example_inputs(2))
    policy = tiny_policy(tiny_suite, model={"trunk": "cnn", "channels": [8, 16], "fc": 32})
    checkpoint.save(model, policy, {}, tmp_path / "cnn")
    loaded, _ = checkpoint.load(tmp_path / "cnn")
    x = tiny_suite.example_inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["left"], model.eval()(x)["left"])


def test_save_replaces_a_folder_only_when_complete(tiny_suite, tiny_artifacts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_text("previous")

    class Broken(torch.nn.Module):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.save(Broken(), tiny_policy(tiny_suite), {}, out)
    assert (out / "model.pt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("change, words", [
    ({"pruning": {"sparsity": {"trunk.fc9": 0.5}}}, "prunes layer 'trunk.fc9'"),
    ({"weighting": {"method": "static", "weights": {"left": 1.0, "up": 1.0}}}, "names tasks"),
    ({"model": {"trunk": "mlp", "width": 32, "depth": 2}}, "the trained base is"),
    ({"suite": {"name": "multidigits", "seed": 7}}, "the policy is for suite"),
    ({"fusion": {"method": "tie", "coefficients": {"left": 1.0, "right": 1.0, "sum": 1.0}}}, "unknown fusion method"),
    ({"pruning": {"importance": "hessian", "sparsity": {"trunk.fc1": 0.1}}}, "unknown importance 'hessian'"),
])
def test_a_policy_that_does_not_fit_is_refused(tiny_suite, tiny_artifacts, change, words):
    with pytest.raises(PrunefuseError, match=words):
        apply_policy(tiny_suite, tiny_policy(tiny_suite, **change), tiny_artifacts, measure_spec=FAST)


def test_nan_loss_fails_with_its_reason(tiny_suite, tiny_artifacts):
    import dataclasses

    from mtl_models.suites import Split

    x = tiny_suite.train.x.clone()
    x[::7] = float("nan")  # corrupt inputs: the fine-tune's loss becomes nan
    broken = dataclasses.replace(tiny_suite, train=Split(x, tiny_suite.train.y))
    with pytest.raises(FloatingPointError, match="is nan"):
        apply_policy(broken, tiny_policy(tiny_suite), tiny_artifacts, measure_spec=FAST)


def test_measured_costs_are_consistent(tiny_suite, tiny_artifacts):
    _, m = apply_policy(tiny_suite, tiny_policy(tiny_suite), tiny_artifacts, measure_spec=FAST)
    assert m["nonzero_params"] <= m["params"]
    assert m["bytes"] <= 4 * (m["params"] + 64)  # fp32 weights (+ nothing hidden)
    assert m["macs"] > 0 and m["latency_ms"] > 0
    assert m["latency_batch"] == 32 and m["device"] == "cpu"
    # The score is the mean oriented change vs the dense base, in percent (spaces.scores).
    dense = tiny_artifacts.dense_metrics["val"]
    expected = sum((1 if t.higher_is_better else -1) * (m[f"metric/{t.name}"] - dense[t.name]) / abs(dense[t.name])
                   for t in tiny_suite.tasks) / 3 * 100
    assert m["score"] == pytest.approx(expected)


def test_save_never_replaces_a_folder_with_other_files(tiny_suite, tiny_artifacts, tmp_path):
    from spaces import PrunefuseError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    model = tiny_suite.build_model(trunk="mlp", width=64, depth=2)
    with pytest.raises(PrunefuseError, match="not a saved prunefuse model"):
        checkpoint.save(model, tiny_policy(tiny_suite), {}, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    checkpoint.save(model, tiny_policy(tiny_suite), {}, tmp_path / "fresh")
    checkpoint.save(model, tiny_policy(tiny_suite), {}, tmp_path / "fresh")  # an earlier save may be replaced


def test_zero_epochs_trains_nothing(tiny_suite):
    from mtl_models.training.train import TrainOptions, train

    model = tiny_suite.build_model(trunk="mlp", width=16, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train(model, tiny_suite, TrainOptions(epochs=0, lr=1.0)) == []
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_a_method_typo_fails_before_any_training(tiny_suite, tmp_path):
    from mtl_models.pipeline import check_fits

    for change, words in [({"weighting": {"method": "uncertainity"}}, "unknown weighting method"),
                          ({"fusion": {"method": "tiez", "coefficients": {t: 1.0 for t in tiny_suite.task_names}}},
                           "unknown fusion method 'tiez'"),
                          ({"fusion": {"method": "ties", "coefficients": {t: 1.0 for t in tiny_suite.task_names},
                                       "params": {"densty": 0.2}}}, "unknown parameter 'densty'")]:
        with pytest.raises(PrunefuseError, match=words):
            check_fits(tiny_suite, tiny_policy(tiny_suite, **change))


def test_the_model_side_runs_without_importing_ray(tiny_suite):
    """`apply` and notebooks use mtl_models alone; Ray is only for searches."""
    import subprocess
    import sys

    code = ("import sys, mtl_models.pipeline, mtl_models.artifacts as a; d = a.job_device(); "
            "print(d, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "False"]
