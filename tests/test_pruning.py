"""Pruning on tiny real models: every mode × criterion × schedule × scope, and the promises
the search relies on (really smaller, heads intact, never zero width, honest storage)."""
import copy

import pytest
import torch
from pydantic import ValidationError

from mtl_models.measuring import measure
from mtl_models.pruning import (AGGREGATES, IMPORTANCES, MAX_SPARSITY, MultiTaskTaylor, cubic_schedule,
                                kept_units, min_kept, prunable_layers, prune, without_masks)
from mtl_models.training.tasks import task_loss
from spaces import PrunefuseError
from spaces.policy import Pruning

CRITERIA = sorted(IMPORTANCES)
TRUNKS = {"mlp": dict(trunk="mlp", width=64, depth=2), "cnn": dict(trunk="cnn", channels=[8, 16], fc=32)}


@pytest.fixture(scope="module")
def suite(tiny_suite):
    torch.set_num_threads(1)
    return tiny_suite


def fresh(suite, trunk="mlp", seed=0, **spec):
    torch.manual_seed(seed)
    return suite.build_model(**{**TRUNKS[trunk], **spec}).eval()


def losses_of(suite, n=128):
    x, y = suite.train.x[:n], {k: v[:n] for k, v in suite.train.y.items()}

    def task_losses(model):
        out = model(x)
        return {t.name: task_loss(t, out[t.name], y[t.name]) for t in suite.tasks}
    return task_losses


def distill_losses(suite, model, n=128):
    """Calibration losses at their minimum by construction: each head's squared distance to
    what the untouched model predicted (no first-order term, only the curvature term)."""
    x = suite.train.x[:n]
    with torch.no_grad():
        target = {t: o.clone() for t, o in model(x).items()}

    def task_losses(m):
        out = m(x)
        return {t: ((out[t] - target[t]) ** 2).sum(1).mean() for t in target}
    return task_losses


def widths(model):
    modules = dict(model.named_modules())
    return {n: getattr(modules[n], "out_features", getattr(modules[n], "out_channels", None))
            for n in prunable_layers(model)}


def run(suite, model, sparsity, **kw):
    """prune() with the Pruning section made of `sparsity` and the keywords that are its fields."""
    kw.setdefault("task_losses", losses_of(suite))
    spec = Pruning(sparsity=sparsity, **{k: v for k, v in kw.items() if k in Pruning.model_fields})
    rest = {k: v for k, v in kw.items() if k not in Pruning.model_fields}
    return prune(model, spec, example_inputs=suite.example_inputs(2), **rest)


# --- structured ---

@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("importance", CRITERIA)
@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_structured_really_shrinks(suite, trunk, importance, steps, scope):
    model = fresh(suite, trunk)
    x = suite.example_inputs(5)
    with torch.no_grad():
        before_out = {t: o.shape for t, o in model(x).items()}
    params, macs = measure.stored_params(model), measure.count_macs(model, x)
    heads = {t: (h.weight.shape[0], h.bias.shape) for t, h in model.heads.items()}
    w0 = widths(model)
    layers = prunable_layers(model)
    calls = []
    kw = dict(global_sparsity=0.5) if scope == "global" else {}
    out = run(suite, model, {n: 0.5 for n in layers}, mode="structured", importance=importance, steps=steps,
              after_step=lambda step, m: calls.append((step, m)), **kw)
    assert out is model
    assert [c[0] for c in calls] == list(range(1, steps + 1)) and all(c[1] is model for c in calls)
    assert measure.stored_params(model) < 0.6 * params
    # Half the units of every layer leave about a quarter of the MACs; a global ranking may
    # keep more of the cheap early channels, so only "fewer" is promised there.
    assert measure.count_macs(model, x) < (0.6 if scope == "layerwise" else 0.9) * macs
    with torch.no_grad():
        assert {t: o.shape for t, o in model(x).items()} == before_out
    assert {t: (h.weight.shape[0], h.bias.shape) for t, h in model.heads.items()} == heads
    w1 = widths(model)
    if scope == "layerwise":
        assert w1 == {n: kept_units(w0[n], 0.5) for n in layers}
    else:
        assert sum(w1.values()) == sum(w0.values()) // 2
        assert all(w1[n] >= min_kept(w0[n]) for n in layers)
    if trunk == "cnn":  # BatchNorm follows its conv, in eval and in training
        for i in (1, 2):
            conv, bn = getattr(model.trunk, f"conv{i}"), getattr(model.trunk, f"bn{i}")
            assert bn.num_features == conv.out_channels == bn.running_mean.numel() == bn.weight.numel()
        model.train()(x)
        model.eval()


def test_iterative_structured_follows_the_cubic_ramp(suite):
    model = fresh(suite)
    seen = []
    run(suite, model, {"trunk.fc1": 0.75, "trunk.fc2": 0.5}, importance="l2", steps=4,
        after_step=lambda step, m: seen.append(widths(m)))
    ramp = cubic_schedule(0.75, 4)
    assert [w["trunk.fc1"] for w in seen] == [kept_units(64, s) for s in ramp[1:]]
    assert seen[-1]["trunk.fc2"] == 32


# --- unstructured ---

@pytest.mark.parametrize("scope", ["layerwise", "global"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("importance", CRITERIA)
@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_unstructured_masks_keep_shapes_and_macs(suite, trunk, importance, steps, scope):
    model = fresh(suite, trunk)
    x = suite.example_inputs(5)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    params, macs, size = measure.stored_params(model), measure.count_macs(model, x), measure.storage_bytes(model)
    nonzero = measure.nonzero_params(model)  # BatchNorm biases start at zero
    layers = prunable_layers(model)
    numel = {n: dict(model.named_modules())[n].weight.numel() for n in layers}
    calls = []
    sparsity = {n: 0.8 for n in layers}
    kw = dict(global_sparsity=0.8) if scope == "global" else {}
    run(suite, model, sparsity, mode="unstructured", importance=importance, steps=steps,
        after_step=lambda step, m: calls.append(step), **kw)
    assert calls == list(range(1, steps + 1))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # masks folded in
    modules = dict(model.named_modules())
    zeros = {n: int((modules[n].weight == 0).sum()) for n in layers}
    if scope == "layerwise":
        assert zeros == {n: int(0.8 * numel[n]) for n in layers}
    else:
        assert sum(zeros.values()) == int(0.8 * sum(numel.values()))
        assert all(zeros[n] <= int(MAX_SPARSITY * numel[n]) for n in layers)
    assert measure.stored_params(model) == params
    assert measure.nonzero_params(model) == nonzero - sum(zeros.values())
    assert measure.count_macs(model, x) == macs  # dense kernels: no MAC is saved
    assert measure.storage_bytes(model) < 0.7 * size


def test_unstructured_zeros_stay_zero_through_the_fine_tune(suite):
    model = fresh(suite)

    def fine_tune(step, m):
        assert measure.nonzero_params(m) < measure.stored_params(m)  # masks are live here
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            sum(losses_of(suite)(m).values()).backward()
            opt.step()
        assert int((m.trunk.fc1.weight == 0).sum()) >= int(cubic_schedule(0.6, 2)[step] * m.trunk.fc1.weight.numel())

    run(suite, model, {"trunk.fc1": 0.6}, mode="unstructured", importance="l1", steps=2, after_step=fine_tune)
    assert int((model.trunk.fc1.weight == 0).sum()) == int(0.6 * model.trunk.fc1.weight.numel())


def test_masked_model_is_measured_as_stored(suite):
    """Live masks: counted as the zeros they imply, and `without_masks` gives a copy."""
    model = fresh(suite)
    seen = {}

    def look(step, m):
        params = [id(p) for p in m.parameters()]
        stored = without_masks(m)
        assert stored is not m and hasattr(m.trunk.fc1, "weight_mask") and not hasattr(stored.trunk.fc1, "weight_mask")
        seen.update(live=(measure.nonzero_params(m), measure.storage_bytes(m), measure.stored_params(m)),
                    folded=(measure.nonzero_params(stored), measure.storage_bytes(stored), measure.stored_params(stored)),
                    macs=measure.count_macs(m, suite.example_inputs(1)))
        assert [id(p) for p in m.parameters()] == params  # an optimizer holding them keeps working
        assert hasattr(m.trunk.fc1, "weight_mask")

    run(suite, model, {"trunk.fc1": 0.9}, mode="unstructured", importance="l2", after_step=look)
    assert seen["live"] == seen["folded"]
    assert seen["macs"] == measure.count_macs(fresh(suite), suite.example_inputs(1))


def test_storage_bytes_is_dense_or_csr_whichever_is_smaller(suite):
    model = fresh(suite)
    dense = sum(t.numel() * 4 for t in model.state_dict().values())
    assert measure.storage_bytes(model) == dense
    with torch.no_grad():
        model.trunk.fc1.weight.zero_()
        model.trunk.fc1.weight[0, :3] = 1.0
    rows = model.trunk.fc1.weight.shape[0]
    assert measure.storage_bytes(model) == dense - model.trunk.fc1.weight.numel() * 4 + 3 * 8 + 4 * (rows + 1)


# --- the schedule ---

@pytest.mark.parametrize("final, steps", [(0.8, 1), (0.8, 5), (0.3, 3), (0.0, 4), (MAX_SPARSITY, 10)])
def test_cubic_schedule(final, steps):
    s = cubic_schedule(final, steps)
    assert len(s) == steps + 1 and s[0] == 0.0 and s[-1] == final
    assert all(a <= b for a, b in zip(s, s[1:]))
    for t in range(steps + 1):  # Zhu & Gupta: s_t = s_f + (s_i − s_f)(1 − t/n)^3, s_i = 0
        assert s[t] == pytest.approx(final - final * (1 - t / steps) ** 3)
    if steps > 1 and final > 0:  # fast early, slow late
        assert s[1] - s[0] > s[-1] - s[-2]


# --- never zero width ---

@pytest.mark.parametrize("mode", ["structured", "unstructured"])
@pytest.mark.parametrize("importance", ["l2", "multitask_taylor"])
def test_a_four_unit_layer_keeps_a_unit(suite, mode, importance):
    model = fresh(suite, width=4)
    run(suite, model, {"trunk.fc1": MAX_SPARSITY, "trunk.fc2": MAX_SPARSITY}, mode=mode, importance=importance, steps=2)
    if mode == "structured":
        assert widths(model) == {"trunk.fc1": 1, "trunk.fc2": 1}
    for name in ("fc1", "fc2"):
        w = getattr(model.trunk, name).weight
        assert (w != 0).any(dim=1).sum() >= 1
    with torch.no_grad():
        assert model(suite.example_inputs(3))["left"].shape == (3, 10)


@pytest.mark.parametrize("importance", ["l2", "taylor", "multitask_taylor"])
def test_global_pruning_caps_every_layer(suite, importance):
    """A layer whose units all score lowest still keeps (1 − MAX_SPARSITY) of them."""
    model = fresh(suite, width=64, depth=3)
    with torch.no_grad():  # fc2's units 1..63 look worthless to every criterion
        model.trunk.fc2.weight[1:].mul_(1e-4)
        model.trunk.fc2.bias[1:].mul_(1e-4)
        model.trunk.fc3.weight[:, 1:].mul_(1e-4)
    w0 = widths(model)
    run(suite, model, {}, importance=importance, global_sparsity=0.6, task_losses=distill_losses(suite, model))
    w1 = widths(model)
    assert w1["trunk.fc2"] == min_kept(64) == 3
    assert sum(w1.values()) == kept_units(sum(w0.values()), 0.6)  # ⌊192·0.4⌋ = 76
    assert all(w1[n] >= min_kept(w0[n]) for n in w0)


# --- channel rounding (round_to) ---

@pytest.mark.parametrize("width, sparsity, round_to, kept", [
    (64, 0.3, 8, 48),    # ⌊44.8⌋ = 44 → the nearest multiple of 8 is 48 (44/8 = 5.5 rounds to 6)
    (64, 0.4, 8, 40),    # 38 → 40
    (64, 0.0, 8, 64),    # asked to keep everything: nothing goes
    (100, 0.0, 16, 100),  # ... even where 100 is no multiple of 16
    (100, 0.1, 16, 96),
    (512, 0.95, 16, 32),  # min_kept(512) = 25: rounding down to 16 would cross it, so up to 32
    (12, 0.5, 16, 6),    # no wider than round_to: not rounded
    (64, 0.3, 1, 44),
])
def test_kept_units_round_to_a_multiple(width, sparsity, round_to, kept):
    assert kept_units(width, sparsity, round_to) == kept


@pytest.mark.parametrize("trunk, scope", [("mlp", "layerwise"), ("cnn", "layerwise"), ("mlp", "global")])
def test_structured_round_to_keeps_multiples(suite, trunk, scope):
    spec = {"width": 64, "depth": 3} if trunk == "mlp" else {"channels": [32, 32], "fc": 32}
    model = fresh(suite, trunk, **spec)
    layers = prunable_layers(model)
    kw = {"global_sparsity": 0.5} if scope == "global" else {}
    sparsity = {} if scope == "global" else {n: s for n, s in zip(layers, (0.3, 0.45, 0.6))}
    run(suite, model, sparsity, round_to=8, **kw)
    w = widths(model)
    assert all(v % 8 == 0 and v > 0 for v in w.values()), w
    assert sum(w.values()) < (64 * 3 if trunk == "mlp" else 96)  # really pruned
    out = model(suite.example_inputs(4))
    assert set(out) == set(suite.task_names)


# --- bad requests ---

@pytest.mark.parametrize("kw, words", [
    ({"sparsity": {"trunk.fc1": 1.2}}, r"sparsity of trunk.fc1 is 1.2; expected 0 <= sparsity <= 0.95"),
    ({"sparsity": {"trunk.fc1": -0.1}}, r"sparsity of trunk.fc1 is -0.1"),
    ({"global_sparsity": 0.99}, r"global_sparsity\n.*less than or equal to 0.95"),
    ({"mode": "semi"}, r"mode\n.*'structured' or 'unstructured'"),
    ({"importance": "multitask_taylor", "aggregate": "median"}, r"aggregate\n.*'mean', 'min', 'max' or 'vote'"),
    ({"steps": 0}, r"steps\n.*greater than or equal to 1"),
    ({"round_to": 0}, r"round_to\n.*greater than or equal to 1"),
    ({"mode": "unstructured", "round_to": 8}, r"round_to=8 rounds kept channels.*'structured'"),
])
def test_a_spec_breaking_a_rule_is_refused_where_it_is_made(kw, words):
    # The Policy's Pruning section checks its own values and rules; prune() takes it as checked.
    with pytest.raises(ValidationError, match=words):
        Pruning(**kw)


@pytest.mark.parametrize("sparsity, kw, words", [
    ({"trunk.fc9": 0.5}, {}, r"prunes layer 'trunk.fc9'.*coupled groups \(one sparsity each\): trunk.fc1, trunk.fc2"),
    ({"trunk.fc1": 0.5}, {"importance": "hessian"},
     r"unknown importance 'hessian'; expected one of: l1, l2, multitask_taylor, taylor"),
])
def test_bad_requests_name_the_valid_options(suite, sparsity, kw, words):
    model = fresh(suite)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunefuseError, match=words):
        run(suite, model, sparsity, **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_gradient_criteria_need_calibration_losses(suite):
    with pytest.raises(PrunefuseError, match="needs task_losses"):
        prune(fresh(suite), Pruning(sparsity={"trunk.fc1": 0.5}, importance="multitask_taylor"),
              example_inputs=suite.example_inputs(2))


# --- the multi-task criterion ---

def one_task_unit(suite):
    """A model whose last trunk layer's unit 0 feeds only task `left`, and strongly; and
    calibration losses at their minimum (so only how much each task needs a unit counts)."""
    model = fresh(suite, width=16, seed=3)
    with torch.no_grad():
        model.trunk.fc2.weight[0] = 3.0 * torch.randn(16)
        model.trunk.fc2.bias[0] = 0.777  # a tag to find the unit after pruning
        for task in ("right", "sum"):
            model.heads[task].weight[:, 0] = 0.0
        model.heads["left"].weight[:, 0] *= 20.0
    return model, distill_losses(suite, model)


def survives(model):
    return bool(torch.isclose(model.trunk.fc2.bias, torch.tensor(0.777)).any())


def test_max_keeps_a_unit_only_one_task_needs(suite):
    model, losses = one_task_unit(suite)
    run(suite, model, {"trunk.fc2": 0.5}, importance="multitask_taylor", aggregate="max", task_losses=losses)
    assert model.trunk.fc2.out_features == 8 and survives(model)


def test_min_drops_a_unit_the_other_tasks_do_not_need(suite):
    import torch_pruning as tp

    from mtl_models.pruning.structured import _full_group

    model, losses = one_task_unit(suite)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=suite.example_inputs(2))
    group = {"trunk.fc2": _full_group(graph, model.trunk.fc2, 16)}
    raw = {t: v["trunk.fc2"] for t, v in MultiTaskTaylor("max").per_task(model, group, losses).items()}
    assert raw["right"][0] == 0 and raw["sum"][0] == 0 and raw["left"][0] == raw["left"].max() > 0
    top = MultiTaskTaylor("max").scores(model, group, losses)["trunk.fc2"]
    low = MultiTaskTaylor("min").scores(model, group, losses)["trunk.fc2"]
    assert top.argmax() == 0 and low[0] == 0 == low.min()
    run(suite, model, {"trunk.fc2": 0.5}, importance="multitask_taylor", aggregate="min", task_losses=losses)
    assert model.trunk.fc2.out_features == 8 and not survives(model)


def test_taylor_estimates_the_loss_change_of_removing_a_unit(suite):
    """The second-order estimate against the real loss change, unit by unit."""
    import torch_pruning as tp

    from mtl_models.pruning.structured import _full_group

    model = fresh(suite, width=16)
    losses = distill_losses(suite, model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=suite.example_inputs(2))
    group = {"trunk.fc1": _full_group(graph, model.trunk.fc1, 16)}
    est = {t: v["trunk.fc1"] for t, v in MultiTaskTaylor("max").per_task(model, group, losses).items()}
    real = {t: torch.zeros(16) for t in est}
    for unit in range(16):
        def drop(module, inputs, output, unit=unit):
            out = output.clone()
            out[:, unit] = out[:, unit].mean()  # mean replacement: what the estimate assumes
            return out
        handle = model.trunk.relu1.register_forward_hook(drop)
        with torch.no_grad():
            for t, v in losses(model).items():
                real[t][unit] = v
        handle.remove()
    for t in est:
        assert torch.corrcoef(torch.stack([est[t], real[t]]))[0, 1] > 0.95
        assert est[t].sum() == pytest.approx(real[t].sum().item(), rel=0.25)


@pytest.mark.parametrize("aggregate", sorted(AGGREGATES))
def test_aggregates_rank_units(aggregate):
    s = torch.tensor([[3.0, 0.0, 1.0, 2.0], [0.0, 0.1, 1.0, 2.0]])
    out = AGGREGATES[aggregate](s)
    assert out.shape == (4,)
    expected = {"max": [3.0, 0.1, 1.0, 2.0], "min": [0.0, 0.0, 1.0, 2.0], "mean": [1.5, 0.05, 1.0, 2.0]}
    if aggregate in expected:
        assert out.tolist() == pytest.approx(expected[aggregate])
    else:  # vote: unit 3 is above both tasks' medians; a tie-break never outweighs a vote
        assert out.argmax() == 3 and out[1] < 0.5 and 2.0 <= out[3] <= 2.5 and out[0] < 2.0


@pytest.mark.parametrize("mode, importance", [("structured", "multitask_taylor"), ("structured", "l1"),
                                              ("unstructured", "taylor"), ("structured", "taylor")])
def test_same_seed_same_result(suite, mode, importance):
    a, b = fresh(suite, "cnn", seed=5), fresh(suite, "cnn", seed=5)
    for m in (a, b):
        run(suite, m, {n: 0.6 for n in prunable_layers(m)}, mode=mode, importance=importance, steps=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_heads_outputs_are_never_listed(suite):
    model = fresh(suite, "cnn")
    assert prunable_layers(model) == ["trunk.conv1", "trunk.conv2", "trunk.fc"]
    with pytest.raises(PrunefuseError, match="heads.left"):
        run(suite, model, {"heads.left": 0.5})
