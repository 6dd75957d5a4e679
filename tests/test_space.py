import optuna
import pytest

from spaces import Knob, PrunefuseError, SearchSpace, SpaceSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
LAYERS, TASKS = ["trunk.fc1", "trunk.fc2"], ["left", "right", "sum"]
FUSION_KNOBS = {"average": {}, "task_arithmetic": {}, "ties": {"density": Knob(0.05, 1.0)}}
WEIGHT_KNOBS = {"static": {}, "equal": {}, "dwa": {"temperature": Knob(0.5, 5.0)}}


def _space(spec=None, **kw):
    return SearchSpace(SpaceSpec.model_validate(spec or {}), layers=LAYERS, tasks=TASKS,
                       suite={"name": "multidigits"}, model={"trunk": "mlp"}, fusion_knobs=FUSION_KNOBS,
                       weighting_knobs=WEIGHT_KNOBS, merge_groups=["trunk.fc1", "trunk.fc2"], **kw)


def _policies(space, n=30, seed=0):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, space.suggest(trial)))
        study.tell(trial, [0.5, 1.0])
    return out


def test_one_sparsity_per_layer_and_static_weights():
    for trial, p in _policies(_space({"fusion": {"method": None}})):
        assert set(p.pruning.sparsity) == set(LAYERS)
        assert all(0.0 <= s <= 0.9 for s in p.pruning.sparsity.values())
        assert set(p.weighting.weights) == set(TASKS)
        assert p.fusion is None


def test_conditional_knobs_only_when_their_method_is_chosen():
    space = _space({"fusion": {"method": ["none", "average", "ties"]}})
    seen = set()
    for trial, p in _policies(space, n=40):
        method = p.fusion.method if p.fusion else "none"
        seen.add(method)
        has_density = "fusion.ties.density" in trial.params
        assert has_density == (method == "ties")
        if method == "ties":
            assert 0.05 <= p.fusion.params["density"] <= 1.0
    assert seen == {"none", "average", "ties"}


def test_fixed_choice_and_range_entries():
    spec = {"pruning": {"mode": "unstructured", "importance": ["l1"], "steps": {"low": 1, "high": 4},
                        "scope": "global", "sparsity": {"low": 0.1, "high": 0.2}},
            "finetune": {"epochs": [1, 2]}, "fusion": {"method": None}, "weighting": {"method": "dwa"}}
    for trial, p in _policies(_space(spec), n=20):
        assert p.pruning.mode == "unstructured" and p.pruning.importance == "l1"
        assert isinstance(p.pruning.steps, int) and 1 <= p.pruning.steps <= 4
        assert 0.1 <= p.pruning.global_sparsity <= 0.2 and p.pruning.sparsity == {}
        assert p.finetune.epochs in (1, 2)
        assert 0.5 <= p.weighting.params["temperature"] <= 5.0


def test_layerwise_coefficients_cover_every_group():
    for _, p in _policies(_space({"fusion": {"method": "average", "layerwise": True}}), n=3):
        assert set(p.fusion.coefficients) == set(TASKS)
        assert all(set(c) == set(LAYERS) for c in p.fusion.coefficients.values())


def test_same_seed_same_policies():
    a = [p for _, p in _policies(_space(), n=10, seed=5)]
    b = [p for _, p in _policies(_space(), n=10, seed=5)]
    assert a == b


@pytest.mark.parametrize("spec, words", [
    ({"fusion": {"method": ["ties", "tie"]}}, "unknown fusion method 'tie'"),
    ({"weighting": {"method": "uncertain"}}, "unknown weighting method 'uncertain'"),
    ({"pruning": {"sparsity": {"low": 0.0, "high": 0.99}}}, "reaches 0.99"),
])
def test_bad_spaces_fail_before_the_search(spec, words):
    with pytest.raises(PrunefuseError, match=words):
        _space(spec)


def test_space_yaml_rejects_unknown_keys(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("pruning:\n  sparsty: {low: 0, high: 0.5}\n")
    with pytest.raises(PrunefuseError, match="pruning.sparsty: unknown key"):
        SpaceSpec.from_yaml(f)
    f.write_text("pruning: [\n")
    with pytest.raises(PrunefuseError, match="malformed YAML"):
        SpaceSpec.from_yaml(f)


@pytest.mark.parametrize("spec, words", [
    ({"pruning": {"sparsity": [0.1, "a"]}}, "pruning.sparsity takes numbers"),
    ({"pruning": {"sparsity": {"low": 0.5, "high": 0.1}}}, "low 0.5 > high 0.1"),
    ({"pruning": {"sparsity": {"low": -0.2, "high": 0.5}}}, "goes down to -0.2"),
    ({"finetune": {"lr": {"low": 0.0, "high": 0.1, "log": True}}}, "log range, so low must be > 0"),
    ({"pruning": {"steps": {"low": 1.5, "high": 3}}}, "takes whole numbers"),
    ({"pruning": {"mode": ["structured", "sparse"]}}, "'sparse' is not one of"),
    ({"pruning": {"importance": ["l2", "hessian"]}}, "unknown pruning importance 'hessian'"),
    ({"finetune": {"epochs": []}}, "empty list"),
    ({"pruning": {"round_to": [8, 12.5]}}, "pruning.round_to takes whole numbers; got 12.5"),
    ({"pruning": {"round_to": 0}}, "pruning.round_to goes down to 0"),
    # the bounds are the Policy fields' own (one rule, one place): these come from spaces/policy.py
    ({"fusion": {"coefficient": {"low": 0.0, "high": 20.0}}}, "fusion.coefficient reaches 20.0; expected -10.0 <= value"),
    ({"weighting": {"weight": [0.5, -1.0]}}, "weighting.weight goes down to -1.0"),
    ({"finetune": {"batch_size": 0}}, "finetune.batch_size goes down to 0"),
    ({"pruning": {"aggregate": ["max", "median"]}}, "'median' is not one of: mean, min, max, vote"),
])
def test_every_entry_is_checked_before_the_search(spec, words):
    with pytest.raises(PrunefuseError, match=words):
        _space(spec, importances=["l1", "l2", "taylor", "multitask_taylor"])


def test_integer_ranges_draw_whole_numbers():
    spec = {"finetune": {"batch_size": {"low": 64, "high": 512}}, "fusion": {"method": None}}
    for _, p in _policies(_space(spec), n=10):
        assert isinstance(p.finetune.batch_size, int) and 64 <= p.finetune.batch_size <= 512


def test_round_to_is_drawn_for_structured_pruning_only():
    spec = {"pruning": {"mode": ["structured", "unstructured"], "round_to": [1, 8, 16]}, "fusion": {"method": None}}
    seen = set()
    for trial, p in _policies(_space(spec), n=40):
        assert ("pruning.round_to" in trial.params) == (p.pruning.mode == "structured")
        if p.pruning.mode == "unstructured":
            assert p.pruning.round_to == 1
        seen.add((p.pruning.mode, p.pruning.round_to))
    assert {("structured", 8), ("structured", 16), ("unstructured", 1)} <= seen
