"""Merging leaves statistics alone, and a NaN or inf in a merged or pruned model ends its trial
with a reason that says what and where."""
import dataclasses

import pytest
import torch
from conftest import tiny_policy
from torch import nn

from mtl_models import artifacts, fusion
from mtl_models.training.finite import NonFinite, check_finite
from mtl_models.pipeline import MeasureSpec, apply_policy, start_model

FAST = MeasureSpec(latency_batch=16, runs=2, warmup=1)


def bn_state(seed, var_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return {"trunk.0.weight": torch.randn(4, 3, generator=g), "trunk.1.weight": torch.rand(4, generator=g) + 0.5,
            "trunk.1.bias": torch.randn(4, generator=g), "trunk.1.running_mean": torch.randn(4, generator=g),
            "trunk.1.running_var": torch.rand(4, generator=g) + 0.5 + var_shift,
            "trunk.1.num_batches_tracked": torch.tensor(100 + seed)}


@pytest.mark.parametrize("method, params", [("average", {}), ("ties", {}), ("dare_linear", {"drop_rate": 0.95}),
                                            ("dare_ties", {"drop_rate": 0.95})])
def test_batchnorm_statistics_come_from_the_base(method, params):
    base = bn_state(0)
    experts = {"a": bn_state(1, var_shift=-0.4), "b": bn_state(2, var_shift=-0.4)}
    merged = fusion.merge(base, experts, method, {"a": 1.5, "b": 1.5}, **params)
    for key in ("trunk.1.running_mean", "trunk.1.running_var", "trunk.1.num_batches_tracked"):
        assert torch.equal(merged[key], base[key]), key
    assert not torch.equal(merged["trunk.0.weight"], base["trunk.0.weight"])  # the weights are merged


def test_merged_like_weights_a_running_variance_goes_negative():
    """Why: what merging did before (buffers=() merges everything) breaks BatchNorm."""
    base = bn_state(0)
    experts = {"a": bn_state(1, var_shift=-0.4), "b": bn_state(2, var_shift=-0.4)}
    merged = fusion.merge(base, experts, "dare_linear", {"a": 1.5, "b": 1.5}, buffers=(), drop_rate=0.9, seed=3)
    assert (merged["trunk.1.running_var"] < 0).any()


def test_every_buffer_a_model_names_is_kept():
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("table", torch.arange(3.0))  # non-learned, not a BatchNorm's

    model = WithTable()
    assert fusion.buffer_keys(model) == {"table"}
    base = model.state_dict()
    expert = {k: v + 1.0 for k, v in base.items()}
    merged = fusion.merge(base, {"a": expert}, "task_arithmetic", {"a": 1.0}, buffers=fusion.buffer_keys(model))
    assert torch.equal(merged["table"], base["table"])
    torch.testing.assert_close(merged["fc.weight"], expert["fc.weight"])


# --- a BN-bearing residual trunk, DARE up to drop_rate 0.95 -----------------------------------

@pytest.fixture(scope="module")
def resnet(tiny_suite, tmp_path_factory):
    """(suite, artifacts, model spec) of the built-in `resnet` trunk, trained tiny, with experts."""
    torch.set_num_threads(1)
    suite = tiny_suite
    spec = {"trunk": "resnet", "channels": [8, 16]}
    art = artifacts.prepare(suite, spec, artifacts.TrainSpec(epochs=2, expert_epochs=1),
                            cache_dir=tmp_path_factory.mktemp("resnet"), experts=True, log=lambda *a: None)
    assert any(isinstance(m, nn.BatchNorm2d) for m in suite.build_model(**spec).modules())
    return suite, art, spec


def _policy(suite, spec, method, drop_rate, **extra):
    fusion_spec = {"method": method, "coefficients": {t: 1.5 for t in suite.task_names},
                   "params": {"drop_rate": drop_rate}}
    return tiny_policy(suite, model=spec, fusion=fusion_spec, pruning={"sparsity": {}},
                       finetune={"epochs": 0.0}, **extra)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_up_to_095_on_a_resnet_trunk_gives_no_nan_trial(resnet, method):
    suite, art, spec = resnet
    for seed, drop_rate in enumerate((0.5, 0.9, 0.95, 0.95)):
        _, metrics = apply_policy(suite, _policy(suite, spec, method, drop_rate, seed=seed), art, measure_spec=FAST)
        values = [v for v in metrics.values() if isinstance(v, float)]
        assert values and all(torch.isfinite(torch.tensor(values))), (drop_rate, seed, metrics)


def test_recalibrated_statistics_fit_the_merged_weights(resnet):
    """The statistics a merged trunk runs with are those of its own activations."""
    suite, art, spec = resnet
    policy = _policy(suite, spec, "dare_linear", 0.9)
    base_stats = start_model(suite, policy, art, device="cpu", statistics="base")
    recalibrated = start_model(suite, policy, art, device="cpu")
    bn = next(k for k in art.base if k.endswith("bn1.running_var") and ".0." in k)
    assert torch.equal(base_stats.state_dict()[bn], art.base[bn])
    assert not torch.equal(recalibrated.state_dict()[bn], art.base[bn])
    assert (recalibrated.state_dict()[bn] > 0).all()


# --- NaN / inf: the reason says what and where ------------------------------------------------

def test_an_overflowing_merge_fails_naming_the_tensor(tiny_suite, tiny_artifacts):
    huge = {t: {**s, "trunk.fc1.weight": torch.full_like(s["trunk.fc1.weight"], 3e38)}
            for t, s in tiny_artifacts.experts.items()}
    broken = dataclasses.replace(tiny_artifacts, experts=huge)
    policy = tiny_policy(tiny_suite, fusion={"method": "task_arithmetic",
                                             "coefficients": {t: 1.0 for t in tiny_suite.task_names}})
    with pytest.raises(NonFinite, match=r"the model merged by task_arithmetic holds \d+ inf .* in trunk.fc1.weight"):
        apply_policy(tiny_suite, policy, broken, measure_spec=FAST)


def test_a_pruned_model_whose_outputs_overflow_fails_naming_the_task(tiny_suite, tiny_artifacts):
    base = dict(tiny_artifacts.base)
    base["trunk.fc2.weight"] = base["trunk.fc2.weight"].sign() * 3e38  # finite, but the activations overflow
    broken = dataclasses.replace(tiny_artifacts, base=base)
    with pytest.raises(NonFinite, match=r"the model pruned in step 1 of 1 outputs .*(NaN|inf).* for task 'left'"):
        apply_policy(tiny_suite, tiny_policy(tiny_suite), broken, measure_spec=FAST)


def test_check_finite_leaves_the_training_mode_and_passes_a_finite_model(tiny_suite):
    model = tiny_suite.build_model(trunk="cnn", channels=[4, 8], fc=16).train()
    check_finite(model, "the model", tiny_suite.train.x[:8])
    assert model.training
    with torch.no_grad():
        model.trunk.bn1.running_var[0] = float("nan")
    with pytest.raises(NonFinite, match=r"holds 1 NaN of 4 values in trunk.bn1.running_var"):
        check_finite(model, "the model", tiny_suite.train.x[:8])
    with torch.no_grad():
        model.trunk.bn1.running_var[0] = -0.5  # what merging statistics as task vectors did
    with pytest.raises(NonFinite, match=r"holds 1 negative BatchNorm variances of 4 in trunk.bn1.running_var.*NaN"):
        check_finite(model, "the model", tiny_suite.train.x[:8])
