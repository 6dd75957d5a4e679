"""What `measure` times: the inference form computes the model's function, faster layouts only."""
import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mtl_models.measuring import measure
from mtl_models.pruning import prunable_layers, prune
from spaces.policy import Pruning


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
    prune(model, Pruning(sparsity={n: 0.5 for n in prunable_layers(model)}, mode="unstructured", importance="l1"),
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
        prune(model, Pruning(sparsity={n: 0.5 for n in prunable_layers(model)}, mode="unstructured", importance="l1"),
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


class _Block(nn.Module):
    """torchvision-style BasicBlock with a 1×1 downsample branch."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class _ResidualTrunk(nn.Module):
    """7 BatchNorms: 5 after a lone conv / linear output (foldable: in the stem, inside the
    residual block and its downsample branch, after the fc), one after an add and one after a
    conv whose output also feeds a skip (both must stay)."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList([_Block(8, 16, 2)])
        self.post_add_bn = nn.BatchNorm2d(16)                       # after an add: stays
        self.mix, self.mix_bn = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)  # conv output also skips: stays
        self.fc, self.fc_bn = nn.Linear(16, 12), nn.BatchNorm1d(12)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = self.post_add_bn(x + x.flip(-1))
        m = self.mix(x)
        x = torch.relu(self.mix_bn(m)) + m
        return torch.relu(self.fc_bn(self.fc(x.mean(dim=(2, 3)))))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 12)

    def forward(self, x):
        x = self.seq(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _two_heads(trunk):
    from mtl_models.models import MTLModel

    return MTLModel(trunk, {"a": nn.Linear(12, 3), "b": nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6))})


def _norms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_every_conv_or_linear_batchnorm_pair_the_graph_shows_is_folded(suite):
    from mtl_models.deployment.folding import foldable_pairs

    model = trained_like(_two_heads(_ResidualTrunk()), suite)
    assert len(_norms(model)) == 8  # 7 in the trunk, one in a head
    pairs = foldable_pairs(model)
    assert len(pairs) == 6 and ("trunk.blocks.0.downsample.0", "trunk.blocks.0.downsample.1") in pairs
    assert ("trunk.fc", "trunk.fc_bn") in pairs and ("heads.b.0", "heads.b.1") in pairs
    form = measure.inference_form(model)
    assert {type(m) for m in _norms(form)} == {nn.BatchNorm2d} and len(_norms(form)) == 2
    assert form.trunk.post_add_bn is not None and isinstance(form.trunk.mix_bn, nn.BatchNorm2d)
    assert len(_norms(model)) == 8  # the trained model keeps all of them
    x = suite.test.x[:32]
    got = outputs(form, x.contiguous(memory_format=torch.channels_last))
    for task, want in outputs(model, x).items():
        torch.testing.assert_close(got[task], want, rtol=1e-4, atol=1e-5)


def test_a_model_fx_cannot_trace_folds_only_sequential_pairs(suite):
    from mtl_models.deployment.folding import foldable_pairs

    model = trained_like(_two_heads(_Untraceable()), suite)
    assert foldable_pairs(model) == [("trunk.seq.0", "trunk.seq.1"), ("heads.b.0", "heads.b.1")]
    form = measure.inference_form(model)
    assert _norms(form) == [form.trunk.bn]
    x = suite.test.x[:32]
    got = outputs(form, x)
    for task, want in outputs(model, x).items():
        torch.testing.assert_close(got[task], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trunk", ["cnn", "resnet", "mobilenet"])
def test_every_batchnorm_of_the_builtin_image_trunks_is_folded(suite, trunk):
    """In these trunks each BatchNorm reads one conv's output (none follows an add)."""
    model = trained_like(suite.build_model(trunk=trunk), suite)
    assert _norms(model)
    form = measure.inference_form(model)
    assert _norms(form) == []
    x = suite.test.x[:32]
    got = outputs(form, x.contiguous(memory_format=torch.channels_last))
    for task, want in outputs(model, x).items():
        torch.testing.assert_close(got[task], want, rtol=1e-4, atol=1e-5)
