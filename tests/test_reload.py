"""Reload of anything pruning can change: a structurally pruned model saved as a plain state dict
comes back (fresh model, `checkpoint.resize_to`, strict load) computing what the saved one did.

Every built-in trunk (parametrized over `models.TRUNKS`, so new trunks are covered when they
are added) and the shapes example are pruned by prunefuse's own structured pruning (half the
units, ranked globally); models written the way people write them are pruned by torch-pruning
directly (50% of every coupled group, heads' outputs kept): a torchvision-style ResNet (BasicBlock stages,
1×1 downsample branches), a MobileNetV2-style net (inverted residuals, depthwise convs,
a grouped conv) and a token model (nn.Embedding, a cls token, a position embedding,
LayerNorm).
"""

import pytest
import torch
import torch_pruning as tp
from conftest import tiny_policy
from torch import nn

from mtl_models.models import checkpoint
from mtl_models import models, suites
from mtl_models.models import MTLModel
from mtl_models.models.resize import RESIZERS, resize_to
from spaces import PrunefuseError
from spaces.policy import Pruning

# --- models as people write them ----------------------------------------------------------

class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    def __init__(self, in_ch=1, widths=(8, 16, 32)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            layers.append(nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)


class ConvBNReLU(nn.Sequential):
    """torchvision.models.mobilenetv2's Conv2dNormActivation."""

    def __init__(self, inp, oup, kernel=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [ConvBNReLU(inp, hidden, kernel=1)]
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),      # depthwise
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]     # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetTrunk(nn.Module):
    def __init__(self, in_ch=1):
        super().__init__()
        self.features = nn.Sequential(ConvBNReLU(in_ch, 8, stride=1), InvertedResidual(8, 8, 1, 1),
                                      InvertedResidual(8, 12, 2, 4), InvertedResidual(12, 12, 1, 4),
                                      ConvBNReLU(12, 16, kernel=1, groups=2))     # a grouped (not depthwise) conv
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)


class TokenTrunk(nn.Module):
    """Embedding + cls token + position embedding, pre-norm residual MLP, final LayerNorm."""

    def __init__(self, vocab=20, length=6, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, length + 1, dim) * 0.5)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.out = nn.LayerNorm(dim)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.out(x[:, 0])


def multitask(trunk, features):
    return MTLModel(trunk, {"a": nn.Linear(features, 3), "b": nn.Linear(features, 1)})


# --- prune, reload, compare -----------------------------------------------------------------

def trained_like(model, x, seed=0):
    """Affine norm parameters away from 1 / 0 and BatchNorm statistics from real batches."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        for _ in range(3):
            model(x)
    return model.eval()


def prune_half(model, x):
    """Remove 50% of every prunable group of the trunk (torch-pruning; heads' outputs kept)."""
    unwrapped = [(p, p.dim() - 1) for n, p in model.trunk.named_parameters() if "." not in n]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=list(model.heads.values()),
                                       unwrapped_parameters=unwrapped or None)
    pruner.step()
    return trained_like(model, x, seed=1)


def prune_with_prunefuse(model, x):
    """Half of the trunk's units, ranked globally, by prunefuse's own structured pruning (which
    removes whole attention heads: the form `resize` gives back)."""
    from mtl_models.pruning import prune

    prune(model, Pruning(sparsity={}, global_sparsity=0.5), example_inputs=x)
    return trained_like(model, x, seed=1)


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_same_outputs(loaded, saved, x):
    want, got = outputs(saved, x), outputs(loaded, x)
    assert got.keys() == want.keys()
    for task in want:
        torch.testing.assert_close(got[task], want[task], rtol=1e-5, atol=1e-6)


def reloaded(factory, pruned):
    """A fresh model from `factory`, resized to `pruned`'s state dict and loaded strictly."""
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    fresh = factory()
    resize_to(fresh, state)
    fresh.load_state_dict(state, strict=True)
    return fresh


IMAGES = torch.randn(8, 1, 10, 10)
TOKENS = torch.randint(0, 20, (8, 6))
PLAIN = {
    "resnet (torchvision BasicBlock, downsample)": (lambda: multitask(ResNetTrunk(), 32), IMAGES),
    "mobilenetv2 (depthwise, grouped)": (lambda: multitask(MobileNetTrunk(), 16), IMAGES),
    "tokens (Embedding, cls token, pos embed, LayerNorm)": (lambda: multitask(TokenTrunk(), 16), TOKENS),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_torch_models_reload_after_pruning(name):
    factory, x = PLAIN[name]
    torch.manual_seed(0)
    model = prune_half(trained_like(factory(), x), x)
    dense = factory()
    assert any(dense.state_dict()[k].shape != v.shape for k, v in model.state_dict().items())
    loaded = reloaded(factory, model)
    assert_same_outputs(loaded, model, x)
    # The attributes a forward and a later prune read match the tensors.
    for a, b in zip(loaded.modules(), model.modules()):
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                     "normalized_shape", "num_embeddings", "embedding_dim"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (type(a).__name__, attr)


def test_pruned_depthwise_conv_gets_its_new_groups():
    model = multitask(MobileNetTrunk(), 16)
    prune_half(model, IMAGES)
    depthwise = model.trunk.features[2].conv[1][0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels < 48
    loaded = reloaded(lambda: multitask(MobileNetTrunk(), 16), model)
    assert loaded.trunk.features[2].conv[1][0].groups == depthwise.groups
    grouped = loaded.trunk.features[4][0]
    assert grouped.groups == 2 and grouped.in_channels == model.trunk.features[4][0].in_channels


def test_embedding_rows_and_bare_parameters_follow_the_saved_shapes():
    """Shapes pruning tools change by hand: a smaller vocabulary, a shorter position table."""
    model = multitask(TokenTrunk(vocab=20, length=6), 16)
    state = model.state_dict()
    state["trunk.embed.weight"] = state["trunk.embed.weight"][:12].clone()
    state["trunk.pos_embed"] = state["trunk.pos_embed"][:, :5].clone()
    fresh = multitask(TokenTrunk(vocab=20, length=6), 16)
    resize_to(fresh, state)
    fresh.load_state_dict(state, strict=True)
    assert fresh.trunk.embed.num_embeddings == 12 and fresh.trunk.pos_embed.shape == (1, 5, 16)
    assert fresh.trunk.pos_embed.requires_grad
    assert outputs(fresh, torch.randint(0, 12, (2, 4)))["a"].shape == (2, 3)


def test_a_registry_entry_is_all_a_new_module_type_needs():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n, self.gain = n, nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.gain.view(1, self.n)

    state = {"gain": torch.full((3,), 2.0)}
    plain = Scale(5)
    resize_to(plain, state)
    assert plain.n == 5  # the tensor follows, the attribute does not: forward would break
    try:
        RESIZERS[Scale] = lambda m: setattr(m, "n", m.gain.numel())
        fixed = Scale(5)
        resize_to(fixed, state)
        fixed.load_state_dict(state, strict=True)
        assert fixed.n == 3 and fixed(torch.ones(2, 3)).sum() == 12.0
    finally:
        del RESIZERS[Scale]


def test_a_state_that_does_not_fit_is_one_clear_error(tiny_suite, tmp_path):
    model = tiny_suite.build_model(trunk="mlp", width=16, depth=1)
    checkpoint.save(model, tiny_policy(tiny_suite, model={"trunk": "mlp", "width": 16, "depth": 1}), {},
                    tmp_path / "m")
    state = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    state["trunk.extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "m" / "model.pt")
    with pytest.raises(PrunefuseError, match="does not fit the model its policy builds.*trunk.extra"):
        checkpoint.load(tmp_path / "m")


# --- every built-in trunk and the shapes example, through save / load ------------------------

def _suite_for(trunk, tiny_suite):
    """The first small suite whose inputs the trunk takes (images, else token ids)."""
    candidates = [tiny_suite, suites.get("sequences", train_samples=64, val_samples=16, test_samples=16)]
    for suite in candidates:
        try:
            suite.build_model(trunk=trunk)
            return suite
        except PrunefuseError:
            continue
    pytest.fail(f"no test suite fits trunk {trunk!r}")


@pytest.mark.parametrize("trunk", sorted(models.TRUNKS))
def test_every_builtin_trunk_reloads_after_pruning(trunk, tiny_suite, tmp_path):
    suite = _suite_for(trunk, tiny_suite)
    torch.manual_seed(0)
    model = suite.build_model(trunk=trunk)
    x = suite.train.x[:16]
    dense = {k: v.shape for k, v in model.state_dict().items()}
    prune_with_prunefuse(trained_like(model, x), x)
    assert any(dense[k] != v.shape for k, v in model.state_dict().items())
    checkpoint.save(model, tiny_policy(suite, model={"trunk": trunk}), {}, tmp_path / trunk)
    loaded, _ = checkpoint.load(tmp_path / trunk)
    assert_same_outputs(loaded, model, suite.test.x[:16])


@pytest.mark.parametrize("trunk", ["mlp", "cnn"])
def test_the_shapes_example_reloads_after_pruning(trunk, tmp_path):
    suite = suites.get("examples.shapes_suite:make_suite", train_size=40, val_size=10, test_size=10)
    torch.manual_seed(0)
    model = suite.build_model(trunk=trunk)
    x = suite.train.x[:16]
    prune_with_prunefuse(trained_like(model, x), x)
    checkpoint.save(model, tiny_policy(suite, model={"trunk": trunk}), {}, tmp_path / trunk)
    loaded, _ = checkpoint.load(tmp_path / trunk)
    assert type(loaded).__name__ == "ShapesNet"
    assert_same_outputs(loaded, model, suite.test.x[:10])
