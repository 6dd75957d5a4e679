"""Coupled channels: one pruning decision per coupled group, on models written the ways people
write them (torchvision-style ResNet and MobileNetV2 plugins in tests/plugins/coupled_suites.py)
and on the built-in resnet / mobilenet trunks; a policy read back with sorted keys rebuilds
the same model; a model that pruning breaks fails the search before anything is trained."""
import copy
import json
import time

import pytest
import torch

from conftest import run_cli
from mtl_models import suites
from mtl_models.measuring.measure import stored_params
from mtl_models.pruning import coupled_groups, kept_units, prunable_layers, prune
from spaces import PrunefuseError
from spaces.policy import Policy, Pruning

PLUGIN = "tests.plugins.coupled_suites:make_{}"
SMALL = dict(train_pairs=200, val_pairs=50, test_pairs=50)


@pytest.fixture(scope="module")
def plugin():
    torch.set_num_threads(1)
    return {name: suites.get(PLUGIN.format(name), **SMALL) for name in ("resnet", "mobilenet")}


def fresh(suite, seed=0, **spec):
    torch.manual_seed(seed)
    return suite.build_model(**spec).eval()


def groups_of(suite, model):
    return coupled_groups(model, suite.example_inputs(2))


def test_torchvision_resnet_groups(plugin):
    s = plugin["resnet"]
    groups = groups_of(s, fresh(s))
    # The stem and every block of stage 1 add into one residual stream.
    assert groups["trunk.conv1"] == ("trunk.conv1", "trunk.layer1.0.conv2", "trunk.layer1.1.conv2")
    # A downsample branch goes with the block's second conv; a block's first conv is alone.
    assert groups["trunk.layer2.0.conv2"] == ("trunk.layer2.0.conv2", "trunk.layer2.0.downsample.0")
    assert groups["trunk.layer3.0.conv2"] == ("trunk.layer3.0.conv2", "trunk.layer3.0.downsample.0")
    assert groups["trunk.layer1.0.conv1"] == ("trunk.layer1.0.conv1",)
    members = [m for ms in groups.values() for m in ms]
    assert sorted(members) == sorted(prunable_layers(fresh(s)))   # every layer in exactly one group


def test_mobilenet_groups_depthwise_with_neighbours(plugin):
    s = plugin["mobilenet"]
    groups = groups_of(s, fresh(s))
    # expand 1x1 and its depthwise 3x3 (groups = channels) go together ...
    assert groups["trunk.features.2.conv.0.0"] == ("trunk.features.2.conv.0.0", "trunk.features.2.conv.1.0")
    # ... the projections of blocks joined by a residual add go together ...
    assert groups["trunk.features.2.conv.2"] == ("trunk.features.2.conv.2", "trunk.features.3.conv.2")
    # ... and a block without expansion ties its depthwise conv and its projection to the stem.
    assert groups["trunk.features.0.0"] == ("trunk.features.0.0", "trunk.features.1.conv.0.0",
                                            "trunk.features.1.conv.1")


@pytest.mark.parametrize("trunk", ["resnet", "mobilenet"])
def test_structured_pruning_prunes_a_group_together(tiny_suite, trunk):
    model = fresh(tiny_suite, trunk=trunk)
    groups = groups_of(tiny_suite, model)
    widths = {n: m.out_channels for n, m in model.named_modules() if n in prunable_layers(model)}
    prune(model, Pruning(sparsity={name: 0.5 for name in groups}), example_inputs=tiny_suite.example_inputs(2))
    modules = dict(model.named_modules())
    for name, members in groups.items():
        for m in members:
            assert modules[m].out_channels == kept_units(widths[name], 0.5), (name, m)
    assert all(v.shape[0] == 2 for v in model(tiny_suite.example_inputs(2)).values())


class _ScaledTrunk(torch.nn.Module):
    """A stem and a conv whose output a bare parameter scales before the residual add: a
    torchvision ConvNeXt layer scale (channels, 1, 1), or, with `scale_shape` (16, 3), one
    whose channels are not on its last axis."""

    def __init__(self, scale_shape=(16, 1, 1)):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.layer_scale = torch.nn.Parameter(torch.rand(scale_shape))

    def forward(self, x):
        x = self.stem(x)
        y = self.layer_scale * self.conv(x) if self.layer_scale.dim() == 3 else \
            (self.layer_scale * self.conv(x).mean(3)).unsqueeze(3)
        return (x + y).mean((2, 3))


def _scaled_model(scale_shape=(16, 1, 1)):
    from mtl_models.models import MTLModel

    torch.manual_seed(0)
    return MTLModel(_ScaledTrunk(scale_shape), {"a": torch.nn.Linear(16, 10)}).eval()


def test_a_layer_scale_is_pruned_with_its_channels():
    model, x = _scaled_model(), torch.randn(2, 1, 3, 3)
    assert set(coupled_groups(model, x)) == {"trunk.stem"}  # stem, conv and the scale: one group
    prune(model, Pruning(sparsity={"trunk.stem": 0.5}), example_inputs=x)
    assert model.trunk.stem.out_channels == model.trunk.conv.out_channels == 8
    assert model.trunk.layer_scale.shape == (8, 1, 1) and model(x)["a"].shape == (2, 10)


class _ConvNeXtStyleTrunk(torch.nn.Module):
    """facebook ConvNeXt's layout: a channels-first LayerNorm of bare (C,) parameters and a
    layer scale gamma (C,) on a depthwise 7×7 conv's output."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.norm_weight, self.norm_bias = torch.nn.Parameter(torch.ones(16)), torch.nn.Parameter(torch.zeros(16))
        self.dwconv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.gamma = torch.nn.Parameter(torch.full((16,), 0.1))

    def forward(self, x):
        x = self.stem(x)
        u = x.mean(1, keepdim=True)
        y = (x - u) / ((x - u).pow(2).mean(1, keepdim=True) + 1e-6).sqrt()
        y = self.norm_weight[:, None, None] * y + self.norm_bias[:, None, None]
        return (x + self.gamma[:, None, None] * self.dwconv(y)).mean((2, 3))


def test_bare_channel_parameters_are_pruned_without_torch_pruning_warnings():
    """Every bare parameter goes to torch-pruning with its channel axis, so it prunes them
    without warning once per graph it builds (eleven times in one search)."""
    import warnings

    from mtl_models.models import MTLModel

    torch.manual_seed(0)
    model, x = MTLModel(_ConvNeXtStyleTrunk(), {"a": torch.nn.Linear(16, 10)}).eval(), torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune(model, Pruning(sparsity={"trunk.stem": 0.5}), example_inputs=x)
    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    t = model.trunk
    assert t.gamma.shape == t.norm_weight.shape == t.norm_bias.shape == (8,) and t.dwconv.groups == 8
    assert model(x)["a"].shape == (2, 10)


def test_a_group_torch_pruning_refuses_is_an_error_naming_the_member():
    """Not a silent no-op: the policy asked for a width that the model would not get. The probe
    found the group unprunable before (`pruning.left_unpruned`), so it is no decision: a policy
    naming it is refused with the probe's reason."""
    model, x = _scaled_model((16, 3)), torch.randn(2, 1, 3, 3)
    assert "trunk.stem" not in coupled_groups(model, x)
    with pytest.raises(PrunefuseError, match=r"coupled group 'trunk.stem' cannot remove 8 channels: "
                                             r"trunk.layer_scale \(\(16, 3\)\) has only 3"):
        prune(model, Pruning(sparsity={"trunk.stem": 0.5}), example_inputs=x)


def test_plain_trunks_keep_one_group_per_layer(tiny_suite):
    for spec in (dict(trunk="mlp", width=32, depth=2), dict(trunk="cnn", channels=[8, 16], fc=16)):
        model = fresh(tiny_suite, **spec)
        groups = groups_of(tiny_suite, model)
        assert list(groups) == prunable_layers(model)
        assert all(members == (name,) for name, members in groups.items())


def test_members_that_disagree_or_keys_that_decide_nothing_are_refused(plugin):
    s = plugin["resnet"]
    x = s.example_inputs(2)
    model = fresh(s)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunefuseError, match=r"coupled group 'trunk.layer2.0.conv2' different sparsities .*"
                                             r"trunk.layer2.0.conv2=0.5, trunk.layer2.0.downsample.0=0.25"):
        prune(model, Pruning(sparsity={"trunk.layer2.0.downsample.0": 0.25, "trunk.layer2.0.conv2": 0.5}),
              example_inputs=x)
    with pytest.raises(PrunefuseError, match=r"prunes layer 'heads.left', which this model does not have"):
        prune(model, Pruning(sparsity={"heads.left": 0.5}), example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # refused before any change
    # Members that agree decide their group, exactly as its name would.
    by_member = prune(fresh(s), Pruning(sparsity={"trunk.layer2.0.downsample.0": 0.5}), example_inputs=x)
    by_name = prune(fresh(s), Pruning(sparsity={"trunk.layer2.0.conv2": 0.5}), example_inputs=x)
    assert stored_params(by_member) == stored_params(by_name) < stored_params(fresh(s))
    assert all(torch.equal(by_member(x)[t], by_name(x)[t]) for t in s.task_names)


@pytest.mark.parametrize("layout", ["resnet", "mobilenet"])
@pytest.mark.parametrize("mode", ["structured", "unstructured"])
def test_policy_after_sorted_key_json_gives_the_same_model(plugin, layout, mode):
    s = plugin[layout]
    x = s.example_inputs(8)
    names = list(groups_of(s, fresh(s)))
    # Distinct values in reverse forward order: any order-dependence would show.
    sparsity = {name: round(0.1 + 0.8 * i / len(names), 3) for i, name in reversed(list(enumerate(names)))}
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": s.spec, "model": {"trunk": "mlp"},
                               "pruning": {"mode": mode, "sparsity": sparsity}})
    read_back = Policy.from_dict(json.loads(json.dumps(policy.to_dict(), sort_keys=True)))
    assert list(read_back.pruning.sparsity) != list(policy.pruning.sparsity)
    built = {}
    for key, p in (("written", policy), ("read back", read_back)):
        built[key] = prune(fresh(s), Pruning(sparsity=dict(p.pruning.sparsity), mode=mode), example_inputs=x)
    a, b = built["written"], built["read back"]
    assert stored_params(a) == stored_params(b)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    out_a, out_b = a(x), b(x)
    assert all(torch.equal(out_a[t], out_b[t]) for t in s.task_names)


def test_unstructured_masks_every_member_at_its_groups_value(plugin):
    s = plugin["resnet"]
    model = prune(fresh(s), Pruning(sparsity={"trunk.layer2.0.conv2": 0.5}, mode="unstructured"),
                  example_inputs=s.example_inputs(2))
    modules = dict(model.named_modules())
    for m in ("trunk.layer2.0.conv2", "trunk.layer2.0.downsample.0"):
        w = modules[m].weight
        assert (w == 0).sum().item() == int(0.5 * w.numel())
    assert (modules["trunk.layer2.0.conv1"].weight != 0).all()


def test_hardest_pruning_covers_every_mode_scope_and_round_to():
    from spaces.space import SearchSpace, SpaceSpec

    spec = SpaceSpec.model_validate({"pruning": {"mode": ["structured", "unstructured"], "scope": ["layerwise", "global"],
                                                 "round_to": [1, 8], "sparsity": {"low": 0.1, "high": 0.7}}})
    space = SearchSpace(spec, layers=["trunk.a", "trunk.b"], tasks=["t"], suite={"name": "x"}, model={"trunk": "mlp"})
    got = sorted((p.pruning.mode, p.pruning.round_to, p.pruning.global_sparsity or -1, tuple(p.pruning.sparsity.items()))
                 for p in space.hardest_pruning())
    every = (("trunk.a", 0.7), ("trunk.b", 0.7))
    assert got == [("structured", 1, -1, every), ("structured", 1, 0.7, ()), ("structured", 8, -1, every),
                   ("structured", 8, 0.7, ()), ("unstructured", 1, -1, every), ("unstructured", 1, 0.7, ())]


def test_a_group_pruning_breaks_is_left_unpruned_and_named_before_training():
    """The broken model's first conv feeds a buffer of hard-coded width: pruning its group leaves
    a forward that fails. It is found on a copy before anything trains, left out of the
    decisions and named with why (the search prints that line); the other group still prunes,
    and the search's pruning check at the hardest sparsity passes."""
    from mtl_models.pruning import left_unpruned, probe
    from mtl_models.pruning.preflight import check_pruning
    from spaces import Policy
    from tests.plugins.coupled_suites import make_broken

    suite = make_broken(train_pairs=32, val_pairs=16, test_pairs=16)
    model = suite.build_model()
    x = suite.example_inputs(2)
    groups = coupled_groups(model, x)
    left = left_unpruned(model, x)
    assert list(groups) == ["trunk.conv2"] and list(left) == ["trunk.conv1"]
    assert "the pruned forward fails" in left["trunk.conv1"]
    line = probe.describe(left)
    assert "trunk.conv1" in line and "left unpruned" in line and "\n" not in line
    hardest = {"schema": "prunefuse.policy/1", "suite": suite.spec, "model": {"trunk": "broken"},
               "pruning": {"sparsity": {"trunk.conv2": 0.9}}}
    check_pruning(suite, [Policy.from_dict(hardest)])


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- apply checks what it rebuilt ---

def _applied(policy, tmp_path, name):
    from mtl_models.apply import apply_and_save

    return apply_and_save(policy, str(tmp_path / name), cache=str(tmp_path / "cache"), log=lambda *a: None)


def test_a_rebuild_with_other_zeros_is_not_the_trials_model():
    """Unstructured masks change the nonzero count, not the stored one: both must match."""
    from mtl_models.apply import mismatch

    trial = {"params": 1000, "nonzero_params": 400, "metric/a": 0.5, "test/a": 0.5}
    assert mismatch(dict(trial), trial) is None
    assert mismatch({**trial, "nonzero_params": 401}, trial) == "401 nonzero_params rebuilt, 400 in the trial"
    assert mismatch({**trial, "params": 999}, trial) == "999 params rebuilt, 1,000 in the trial"


def test_apply_says_when_the_rebuilt_model_is_not_the_trials(tmp_path):
    s = suites.get("synthetic", dim=8, train_samples=200, val_samples=50, test_samples=50)
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": s.spec,
                               "model": {"trunk": "mlp", "width": 16, "depth": 1},
                               "base": {"epochs": 1, "expert_epochs": 0},
                               "pruning": {"sparsity": {"trunk.fc1": 0.5}}, "finetune": {"epochs": 0}})
    _, metrics = _applied(policy, tmp_path, "plain")                   # nothing measured: nothing to compare
    assert "matches_trial" not in metrics
    measured = {k: v for k, v in metrics.items() if k == "params" or k.startswith(("metric/", "test/"))}
    same = policy.model_copy(update={"provenance": {"metrics": measured}})
    assert _applied(same, tmp_path, "same")[1]["matches_trial"] is True
    for wrong, words in (({"params": measured["params"] + 1}, "params rebuilt"),
                         ({"metric/" + s.task_names[0]: measured["metric/" + s.task_names[0]] + 0.01},
                          "more than 0.5 points")):
        tampered = policy.model_copy(update={"provenance": {"metrics": {**measured, **wrong}}})
        with pytest.raises(PrunefuseError, match=words):
            _applied(tampered, tmp_path, "tampered")
        saved = json.loads((tmp_path / "tampered" / "metrics.json").read_text())
        assert saved["matches_trial"] is False and words.split()[-1] in saved["mismatch"]   # still written


# --- done when: a searched knee policy on the resnet and mobilenet trunks rebuilds its trial's model ---

KNEE_SPACE = "fusion: {method: none}\npruning: {importance: l2, sparsity: {low: 0.0, high: 0.8}}\nfinetune: {epochs: 0.5}\n"
KNEE_ARGS = ["--trials", "4", "--suite-option", "train_pairs=1500", "--suite-option", "val_pairs=400",
             "--suite-option", "test_pairs=400", "--train-option", "epochs=6", "--train-option", "expert_epochs=1",
             "--measure-option", "latency_batch=64", "--measure-option", "runs=5"]


@pytest.mark.slow
@pytest.mark.parametrize("trunk", ["resnet", "mobilenet"])
def test_knee_policy_rebuilds_its_trial_also_after_sorted_key_json(tmp_path, trunk):
    import yaml

    (tmp_path / "space.yaml").write_text(KNEE_SPACE)
    code, out, err = run_cli("search", "--storage", tmp_path / "runs", "--name", trunk, "--trunk", trunk,
                             "--space", tmp_path / "space.yaml", *KNEE_ARGS, cwd=tmp_path, timeout=900)
    assert code == 0, err[-3000:]
    exp = tmp_path / "runs" / trunk
    code, out, err = run_cli("export", exp, "--knee", "-o", tmp_path / "knee.yaml", cwd=tmp_path)
    assert code == 0, err
    knee = yaml.safe_load((tmp_path / "knee.yaml").read_text())
    groups = list(knee["pruning"]["sparsity"])
    assert any(len(m) > 1 for m in coupled_groups(suites.from_spec(knee["suite"]).build_model(**knee["model"]),
                                                  suites.from_spec(knee["suite"]).example_inputs(2)).values())
    # Through a JSON file with sorted keys (what Ray's params.json does to a policy), then back.
    (tmp_path / "sorted.json").write_text(json.dumps(knee, sort_keys=True))
    Policy.from_dict(json.loads((tmp_path / "sorted.json").read_text())).to_yaml(tmp_path / "sorted.yaml")
    assert set(yaml.safe_load((tmp_path / "sorted.yaml").read_text())["pruning"]["sparsity"]) == set(groups)
    measured = knee["provenance"]["metrics"]
    for policy_file in ("knee.yaml", "sorted.yaml"):
        code, out, err = run_cli("apply", tmp_path / policy_file, "-o", tmp_path / f"model-{policy_file}",
                                 "--cache", tmp_path / "runs" / "_artifacts", cwd=tmp_path)
        assert code == 0, err
        applied = json.loads((tmp_path / f"model-{policy_file}" / "metrics.json").read_text())
        assert applied["matches_trial"] is True and applied["params"] == measured["params"]
        for key in [k for k in measured if k.startswith(("metric/", "test/"))]:
            assert abs(applied[key] - measured[key]) * 100 <= 0.5, (policy_file, key)
