"""Contract tests for mtl_models.fusion on tiny real state dicts."""
from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from mtl_models.fusion import BATCHNORM_STATISTICS, KNOBS, METHODS, layer_group, layer_groups, merge
from spaces.errors import PrunefuseError
from spaces.knobs import Knob

# Params under which every method must reduce to plain task arithmetic on one expert.
IDENTITY = {
    "average": {},
    "task_arithmetic": {},
    "ties": {"density": 1.0, "scale": 1.0},
    "dare_linear": {"drop_rate": 0.0},
    "dare_ties": {"drop_rate": 0.0, "density": 1.0, "scale": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0},
    "della": {"density": 1.0, "epsilon": 0.0, "scale": 1.0},
    "tsv": {},  # one task keeps its whole rank: its own SVD, already orthonormal
    "adamerging": {},  # with its coefficients given (steps 0), task arithmetic
}
# Methods that flatten the merged spectrum, so even one expert comes back changed.
FLAT_SPECTRUM = ["iso_c", "iso_cts"]
ALL = sorted([*IDENTITY, *FLAT_SPECTRUM])
DARE = ["dare_linear", "dare_ties"]


def tiny_base(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    net(torch.randn(5, 4))  # one training step moves BN buffers and num_batches_tracked
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def expert(base, seed: int, sign=None) -> dict[str, torch.Tensor]:
    """base + a nonzero delta (magnitude 0.5..1.5) on every float entry; ints bumped."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v + 7  # must NOT reach the merge
            continue
        mag = 0.5 + torch.rand(v.shape, generator=g)
        s = sign[k] if sign is not None else torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)
        out[k] = v + s * mag
    return out


@pytest.fixture
def base():
    return tiny_base()


@pytest.fixture
def experts(base):
    return {"seg": expert(base, 1), "depth": expert(base, 2), "normal": expert(base, 3)}


def floats(state):
    """The learned float entries: what a merge combines (BatchNorm statistics come from the base)."""
    return [k for k, v in state.items() if v.is_floating_point() and k.rpartition(".")[2] not in BATCHNORM_STATISTICS]


def mean_of(experts, base):
    return {k: torch.stack([e[k] for e in experts.values()]).mean(0) for k in floats(base)}


def ones(experts, lam=1.0):
    return {t: lam for t in experts}


# --- registry ----------------------------------------------------------------

def test_registry_names_and_knobs():
    assert set(METHODS) == set(ALL)
    assert set(KNOBS) == set(METHODS)
    assert KNOBS["average"] == {} and KNOBS["task_arithmetic"] == {}
    assert set(KNOBS["ties"]) == {"density", "scale"}
    assert set(KNOBS["dare_linear"]) == {"drop_rate"}
    assert set(KNOBS["dare_ties"]) == {"drop_rate", "density", "scale"}


@pytest.mark.parametrize("method", ALL)
def test_knob_defaults_match_function_defaults(method):
    params = inspect.signature(METHODS[method]).parameters
    for name, knob in KNOBS[method].items():
        assert isinstance(knob, Knob)
        assert knob.low <= knob.default <= knob.high
        assert params[name].default == knob.default, name


# --- semantics ---------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(IDENTITY))
def test_one_expert_at_one_gives_it_back(method, base, experts):
    one = {"seg": experts["seg"]}
    out = merge(base, one, method, {"seg": 1.0}, **IDENTITY[method])
    for k in floats(base):
        assert_close(out[k], one["seg"][k])


def test_task_arithmetic_at_one_over_n_is_mean(base, experts):
    out = merge(base, experts, "task_arithmetic", ones(experts, 1 / len(experts)))
    for k, v in mean_of(experts, base).items():
        assert_close(out[k], v)


def test_average_at_one_is_mean_and_scales_deltas(base, experts):
    out = merge(base, experts, "average", ones(experts))
    for k, v in mean_of(experts, base).items():
        assert_close(out[k], v)
    half = merge(base, experts, "average", ones(experts, 0.5))
    for k, v in mean_of(experts, base).items():
        assert_close(half[k], base[k] + 0.5 * (v - base[k]))


def test_task_arithmetic_sums_scaled_deltas(base, experts):
    lam = {"seg": 0.3, "depth": -0.2, "normal": 1.1}
    out = merge(base, experts, "task_arithmetic", lam)
    for k in floats(base):
        assert_close(out[k], base[k] + sum(lam[t] * (e[k] - base[k]) for t, e in experts.items()))


def test_ties_density_one_agreeing_signs_is_mean(base):
    g = torch.Generator().manual_seed(9)
    sign = {k: torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0) for k, v in base.items()
            if v.is_floating_point()}
    experts = {t: expert(base, s, sign) for t, s in [("a", 11), ("b", 12), ("c", 13)]}
    out = merge(base, experts, "ties", ones(experts), density=1.0, scale=1.0)
    for k, v in mean_of(experts, base).items():
        assert_close(out[k], v)


def test_ties_hand_computed():
    base = {"lin.weight": torch.ones(4)}
    d = {"a": [3.0, -1.0, 0.5, 2.0], "b": [1.0, 2.5, -4.0, -2.0], "c": [-2.0, 1.0, 1.5, 0.1]}
    experts = {t: {"lin.weight": 1 + torch.tensor(v)} for t, v in d.items()}
    # trim to top 2: a->[3,0,0,2] b->[0,2.5,-4,0] c->[-2,0,1.5,0]; signs [+,+,-,+];
    # disjoint mean [3,2.5,-4,2]; scale 0.5
    out = merge(base, experts, "ties", ones(experts), density=0.5, scale=0.5)
    assert_close(out["lin.weight"], 1 + torch.tensor([1.5, 1.25, -2.0, 1.0]))
    # lambda applies before the sign election: c*3 trims to [-6,0,4.5,0] and flips entries 0 and 2
    out = merge(base, experts, "ties", {"a": 1.0, "b": 1.0, "c": 3.0}, density=0.5, scale=1.0)
    assert_close(out["lin.weight"], 1 + torch.tensor([-6.0, 2.5, 4.5, 2.0]))


@pytest.mark.parametrize("n,density,kept", [(10, 0.3, 3), (3, 0.05, 1), (7, 0.5, 4), (6, 1.0, 6)])
def test_ties_trim_keeps_density_fraction_at_least_one(n, density, kept):
    delta = torch.arange(1.0, n + 1) * torch.tensor([1.0, -1.0]).repeat(n)[:n]  # distinct magnitudes
    out = merge({"b.bias": torch.zeros(n)}, {"t": {"b.bias": delta}}, "ties", {"t": 1.0}, density=density)
    assert int((out["b.bias"] != 0).sum()) == kept
    assert_close(out["b.bias"][-kept:], delta[-kept:])  # the largest magnitudes survive


@pytest.mark.parametrize("dare,plain,params", [
    ("dare_linear", "task_arithmetic", {}),
    ("dare_ties", "ties", {"density": 0.4, "scale": 0.8}),
])
def test_dare_at_zero_drop_is_base_method(dare, plain, params, base, experts):
    lam = {"seg": 0.7, "depth": 0.4, "normal": -0.3}
    got = merge(base, experts, dare, lam, drop_rate=0.0, seed=5, **params)
    want = merge(base, experts, plain, lam, **params)
    for k in base:
        assert_close(got[k], want[k])


def test_dare_draw_is_zero_or_rescaled_delta(base, experts):
    p = 0.7
    out = merge(base, {"seg": experts["seg"]}, "dare_linear", {"seg": 1.0}, drop_rate=p, seed=3)
    dropped = total = 0
    for k in floats(base):
        delta, got = experts["seg"][k] - base[k], out[k] - base[k]
        kept = got != 0
        assert_close(got[kept], delta[kept] / (1 - p))
        dropped, total = dropped + int((~kept).sum()), total + got.numel()
    assert 0.45 < dropped / total < 0.9  # ~70% of the 35 float entries dropped


@pytest.mark.parametrize("method", DARE)
def test_dare_keeps_expectation(method, base, experts):
    params = {"density": 1.0, "scale": 1.0} if method == "dare_ties" else {}
    one = {"seg": experts["seg"]}
    runs = [merge(base, one, method, {"seg": 1.0}, drop_rate=0.5, seed=s, **params) for s in range(1500)]
    for k in floats(base):
        mean = torch.stack([r[k] for r in runs]).mean(0)
        # per-entry std of the mean is |delta|/sqrt(1500) < 0.04; allow ~5 sigma
        assert_close(mean, experts["seg"][k], atol=0.2, rtol=0)


@pytest.mark.parametrize("method", DARE)
def test_dare_seed_reproducible_and_different(method, base, experts):
    a = merge(base, experts, method, ones(experts), drop_rate=0.5, seed=1)
    b = merge(base, experts, method, ones(experts), drop_rate=0.5, seed=1)
    c = merge(base, experts, method, ones(experts), drop_rate=0.5, seed=2)
    for k in base:
        assert_close(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in floats(base))


def test_dare_masks_differ_across_tasks_and_keys():
    base = {"x.weight": torch.zeros(64), "y.weight": torch.zeros(64)}
    same = {"x.weight": torch.ones(64), "y.weight": torch.ones(64)}
    experts = {"a": same, "b": same}
    only_a = merge(base, experts, "dare_linear", {"a": 1.0, "b": 0.0}, drop_rate=0.5, seed=0)
    only_b = merge(base, experts, "dare_linear", {"a": 0.0, "b": 1.0}, drop_rate=0.5, seed=0)
    assert not torch.equal(only_a["x.weight"], only_b["x.weight"])
    assert not torch.equal(only_a["x.weight"], only_a["y.weight"])


@pytest.mark.parametrize("method", ALL)
def test_keys_shapes_dtypes_kept_ints_from_base(method, base, experts):
    out = merge(base, experts, method, ones(experts, 0.5))
    assert list(out) == list(base)
    for k, v in base.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
    assert torch.equal(out["1.num_batches_tracked"], base["1.num_batches_tracked"])
    out["0.weight"].add_(1)
    out["1.num_batches_tracked"].add_(1)  # result must not alias base
    assert torch.equal(base["1.num_batches_tracked"], tiny_base()["1.num_batches_tracked"])
    assert torch.equal(base["0.weight"], tiny_base()["0.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_dtypes_kept(dtype, base, experts):
    cast = lambda s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}  # noqa: E731
    b, ex = cast(base), {t: cast(e) for t, e in experts.items()}
    out = merge(b, ex, "task_arithmetic", ones(ex, 1 / 3))
    for k in floats(base):
        assert out[k].dtype == dtype
        want = (b[k].float() + sum((e[k].float() - b[k].float()) / 3 for e in ex.values())).to(dtype)
        assert_close(out[k], want)


# --- layer-wise coefficients ---------------------------------------------------

def test_layer_group_of_keys(base):
    assert layer_group("trunk.0.weight") == "trunk.0"
    assert layer_group("scale") == "scale"
    assert layer_groups(base) == ["0", "1", "2"]


@pytest.mark.parametrize("method", ALL)
def test_layerwise_same_lambda_equals_scalar(method, base, experts):
    scalar = {"seg": 0.6, "depth": 0.3, "normal": 0.9}
    layered = {t: {g: lam for g in layer_groups(base)} for t, lam in scalar.items()}
    a, b = merge(base, experts, method, scalar), merge(base, experts, method, layered)
    for k in base:
        assert_close(a[k], b[k])


@pytest.mark.parametrize("method", ALL)
def test_layerwise_acts_per_group(method, base, experts):
    per_group = {"0": 1.0, "1": 0.0, "2": 0.4}
    out = merge(base, experts, method, {t: dict(per_group) for t in experts})
    for g, lam in per_group.items():
        ref = merge(base, experts, method, ones(experts, lam))
        for k in floats(base):
            if layer_group(k) == g:
                assert_close(out[k], ref[k])
    assert_close(out["1.weight"], base["1.weight"])  # lambda 0 leaves the group at base
    assert not torch.equal(out["0.weight"], base["0.weight"])


def test_layerwise_missing_or_unknown_group_raises(base, experts):
    coef = ones(experts)
    coef["depth"] = {"0": 1.0, "2": 1.0}
    with pytest.raises(PrunefuseError, match=r"'depth'.*'1'"):
        merge(base, experts, "task_arithmetic", coef)
    coef["depth"] = {"0": 1.0, "1": 1.0, "2": 1.0, "trunk.9": 1.0}
    with pytest.raises(PrunefuseError, match=r"trunk\.9"):
        merge(base, experts, "task_arithmetic", coef)


# --- errors ------------------------------------------------------------------

def test_missing_key_names_key_and_task(base, experts):
    del experts["depth"]["2.bias"]
    with pytest.raises(PrunefuseError, match=r"'2\.bias'.*'depth'"):
        merge(base, experts, "average", ones(experts))


def test_extra_key_names_key_and_task(base, experts):
    experts["normal"]["head.weight"] = torch.zeros(2)
    with pytest.raises(PrunefuseError, match=r"'head\.weight'.*'normal'"):
        merge(base, experts, "average", ones(experts))


def test_shape_mismatch_names_key_and_task(base, experts):
    experts["seg"]["0.weight"] = torch.zeros(3, 5)
    with pytest.raises(PrunefuseError, match=r"'0\.weight'.*'seg'.*\(3, 5\)"):
        merge(base, experts, "ties", ones(experts))


def test_unknown_method_lists_valid_names(base, experts):
    with pytest.raises(PrunefuseError, match="tie") as err:
        merge(base, experts, "tie", ones(experts))
    for name in METHODS:
        assert name in str(err.value)


@pytest.mark.parametrize("method,bad", [("ties", "drop_rate"), ("average", "density"), ("dare_linear", "dens")])
def test_unknown_param_names_it_and_valid_ones(method, bad, base, experts):
    with pytest.raises(PrunefuseError, match=bad) as err:
        merge(base, experts, method, ones(experts), **{bad: 0.5})
    for name in KNOBS[method]:
        assert name in str(err.value)


def test_coefficient_task_mismatch_raises(base, experts):
    coef = ones(experts)
    del coef["seg"]
    with pytest.raises(PrunefuseError, match="'seg'"):
        merge(base, experts, "average", coef)
    with pytest.raises(PrunefuseError, match="'sky'"):
        merge(base, experts, "average", {**ones(experts), "sky": 1.0})


def test_nan_in_expert_raises_naming_key_and_task(base, experts):
    experts["normal"]["2.weight"][0, 0] = float("nan")
    with pytest.raises(PrunefuseError, match=r"'2\.weight'.*'normal'.*nan"):
        merge(base, experts, "task_arithmetic", ones(experts))


def test_no_experts_raises(base):
    with pytest.raises(PrunefuseError, match="no experts"):
        merge(base, {}, "average", {})


@pytest.mark.parametrize("method,params,name", [
    ("ties", {"density": 0.0}, "density"), ("ties", {"density": 1.5}, "density"),
    ("dare_linear", {"drop_rate": 1.0}, "drop_rate"), ("dare_ties", {"drop_rate": -0.1}, "drop_rate"),
])
def test_out_of_range_params_raise(method, params, name, base, experts):
    with pytest.raises(PrunefuseError, match=name):
        merge(base, experts, method, ones(experts), **params)


# --- properties ----------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(p=st.floats(0.0, 0.95), lam=st.floats(-2.0, 2.0), seed=st.integers(0, 2**31))
def test_dare_linear_entries_are_dropped_or_rescaled(p, lam, seed):
    base = {"w.weight": torch.zeros(50)}
    delta = torch.linspace(0.5, 1.5, 50)
    out = merge(base, {"t": {"w.weight": delta}}, "dare_linear", {"t": lam}, drop_rate=p, seed=seed)["w.weight"]
    kept = out != 0
    assert_close(out[kept], lam * delta[kept] / (1 - p))
    if p == 0 and bool((lam * delta != 0).all()):  # lam * delta, not lam: a tiny lam underflows in float32
        assert kept.all()


# --- experts that preserve the other tasks (artifacts.train_expert) ---

def test_preserving_experts_keep_the_other_tasks_predictions(tiny_suite, tiny_artifacts):
    """With expert_preserve, an expert moves the other tasks' outputs far less than a plain
    fine-tune does, and leaves their heads exactly as the base had them."""
    from mtl_models import artifacts
    from mtl_models.training.train import predict

    base, task = tiny_artifacts.base, tiny_suite.task_names[0]
    others = tiny_suite.task_names[1:]
    spec = {"epochs": 4, "expert_epochs": 2, "lr": 3e-3}
    model = tiny_suite.build_model(**tiny_artifacts.model)
    model.load_state_dict(base)
    before = predict(model, tiny_suite.val.x)

    def drift(preserve):
        state = artifacts.train_expert(tiny_suite, tiny_artifacts.model,
                                       artifacts.TrainSpec(**spec, expert_preserve=preserve), base, task)
        model.load_state_dict(state)
        after = predict(model, tiny_suite.val.x)
        heads_kept = all(torch.equal(state[k], base[k]) for k in base if k.startswith(tuple(f"heads.{t}." for t in others)))
        return sum(float(((after[t] - before[t]) ** 2).mean() / before[t].var()) for t in others), heads_kept

    plain, _ = drift(0.0)
    preserved, heads_kept = drift(3.0)
    assert heads_kept
    assert preserved < 0.5 * plain, (preserved, plain)


def test_expert_preserve_is_part_of_the_cache_key():
    from mtl_models.artifacts import TrainSpec, cache_key

    keys = {cache_key({"name": "s"}, {"trunk": "mlp"}, TrainSpec(expert_preserve=p), "trained") for p in (0, 1.0, 2)}
    assert len(keys) == 3
    assert cache_key({"name": "s"}, {"trunk": "mlp"}, TrainSpec(expert_preserve=1), "trained") in keys  # 1 == 1.0


# --- the cross-merge cache (fusion.cache): TSV-M's whitened bases --------------------

def _uncached(method, base, experts, lam):
    """The merge computed by the method on plain dicts: no TaskDeltas, no cache."""
    out = {}
    for k in floats(base):
        out[k] = base[k] + METHODS[method]({t: lam[t] * (e[k] - base[k]) for t, e in experts.items()}, k)
    return out


def test_tsv_reuses_singular_vectors_across_merges_and_sees_changed_experts(base, experts):
    from mtl_models.fusion import cache

    cache.clear()
    first = {"seg": 0.5, "depth": 0.8, "normal": 1.0}
    merge(base, experts, "tsv", first)
    entries = len(cache._ENTRIES)
    assert entries == 2  # one set of bases per matrix
    other = {"seg": -0.7, "depth": 0.2, "normal": 1.3}  # another trial, a negative coefficient too
    got = merge(base, experts, "tsv", other)
    assert len(cache._ENTRIES) == entries  # every basis came from the cache
    for k, v in _uncached("tsv", base, experts, other).items():
        assert_close(got[k], v, atol=1e-5, rtol=1e-5)
    changed = {**experts, "seg": {k: v * 1.5 if v.is_floating_point() else v for k, v in experts["seg"].items()}}
    got = merge(base, changed, "tsv", other)
    assert len(cache._ENTRIES) == entries + 2  # the changed expert's matrices were decomposed again
    for k, v in _uncached("tsv", base, changed, other).items():
        assert_close(got[k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_merge_leaves_base_and_experts_as_they_were(method, base, experts):
    """TIES trims merge's own temporaries in place: never the caller's tensors."""
    before = {t: {k: v.clone() for k, v in e.items()} for t, e in {"base": base, **experts}.items()}
    merge(base, experts, method, ones(experts))
    for t, e in {"base": base, **experts}.items():
        assert all(torch.equal(e[k], before[t][k]) for k in e), t
