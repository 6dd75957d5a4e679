"""What `measure` times: the inference form computes the model's function, faster layouts only."""
import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mtl_models import measure
from mtl_models.pruning import prunable_layers, prune


@pytest.fixture(scope="module")
def suite(tiny_suite):
    torch.set_num_threads(1)
    return tiny_suite


def trained_like(model, suite, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, as after training."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        for _ in range(3):
            model(suite.train.x[:64])
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return {k: v.clone() for k, v in model(x).items()}


def test_cnn_inference_form_folds_batchnorm_and_computes_the_same(suite):
    model = trained_like(suite.build_model(trunk="cnn", channels=[8, 16], fc=32), suite)
    before = copy.deepcopy(model.state_dict())
    form = measure.inference_form(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in form.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the trained model keeps its BN
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = suite.test.x[:32]
    got = outputs(form, x.contiguous(memory_format=torch.channels_last))
    for task, want in outputs(model, x).items():
        torch.testing.assert_close(got[task], want, rtol=1e-4, atol=1e-5)
    assert form.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_linear_batchnorm1d_is_folded_too(suite):
    model = suite.build_model(trunk="mlp", width=32, depth=2)
    trunk = model.trunk
    # An MLP with BatchNorm1d after each Linear, as users' own trunks often have.
    layers = list(trunk.named_children())
    rebuilt = []
    for name, m in layers:
        rebuilt.append((name, m))
        if isinstance(m, nn.Linear):
            rebuilt.append((f"{name}_bn", nn.BatchNorm1d(m.out_features)))
    model.trunk = nn.Sequential(OrderedDict(rebuilt))
    model = trained_like(model, suite)
    form = measure.inference_form(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in form.modules())
    x = suite.test.x[:32]
    got = outputs(form, x)
    for task, want in outputs(model, x).items():
        torch.testing.assert_close(got[task], want, rtol=1e-4, atol=1e-5)


def test_masked_model_is_timed_with_its_masks_folded(suite):
    torch.manual_seed(0)
    model = suite.build_model(trunk="cnn", channels=[8, 16], fc=32).eval()
    prune(model, {n: 0.5 for n in prunable_layers(model)}, mode="unstructured", importance="l1",
          example_inputs=suite.example_inputs(2))
    form = measure.inference_form(model)
    x = suite.test.x[:16]
    got = outputs(form, x)
    for task, want in outputs(model, x).items():
        torch.testing.assert_close(got[task], want, rtol=1e-4, atol=1e-5)
    assert measure.latency_ms(model, suite.example_inputs(8), runs=3, warmup=1) > 0


def test_latency_as_trained_leaves_the_training_mode_alone(suite):
    model = suite.build_model(trunk="cnn", channels=[8, 16], fc=32).train()
    for as_trained in (False, True):
        assert measure.latency_ms(model, suite.example_inputs(4), runs=2, warmup=1, as_trained=as_trained) > 0
        assert model.training


@pytest.mark.parametrize("masked", [False, True])
def test_measure_model_leaves_the_model_as_it_was(suite, tiny_artifacts, masked):
    """Measuring neither moves, retrains, swaps nor switches the mode of the model it is given."""
    from mtl_models.pipeline import MeasureSpec, measure_model

    torch.manual_seed(0)
    model = suite.build_model(trunk="cnn", channels=[8, 16], fc=32)
    if masked:
        prune(model, {n: 0.5 for n in prunable_layers(model)}, mode="unstructured", importance="l1",
              example_inputs=suite.example_inputs(2))
    model.train()
    params = [id(p) for p in model.parameters()]
    modules = [id(m) for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = measure_model(model, suite, tiny_artifacts, MeasureSpec(latency_batch=8, runs=2, warmup=1))
    assert metrics["macs"] > 0 and metrics["latency_ms"] > 0
    assert model.training and all(m.training for m in model.modules())
    assert [id(p) for p in model.parameters()] == params and [id(m) for m in model.modules()] == modules
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
