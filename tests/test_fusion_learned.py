"""AdaMerging's learned coefficients, and every new merge named in a space file and
reproduced by the policy its trial records (what `prunefuse apply` runs)."""
from __future__ import annotations

import dataclasses
import json

import optuna
import pytest
import torch
import yaml

from conftest import TINY_TRAIN
from mtl_models import fusion
from mtl_models.pipeline import MeasureSpec, apply_policy, learn_fusion, start_model
from spaces import SearchSpace, SpaceSpec
from spaces.policy import Policy, with_learned_fusion
from spaces.vocabulary import LEARNED_FUSION

optuna.logging.set_verbosity(optuna.logging.WARNING)
FAST = MeasureSpec(latency_batch=32, runs=3, warmup=1)
MODEL = {"trunk": "mlp", "width": 64, "depth": 2}
NEW_METHODS = ["adamerging", "tsv", "iso_c", "iso_cts", "breadcrumbs", "della"]


def drawn_policy(suite, tmp_path, method: str, *, layerwise: bool = False, seed: int = 0) -> Policy:
    """A policy drawn from a space file that names `method`, the way a search draws one."""
    path = tmp_path / f"space_{method}.yaml"
    path.write_text(yaml.safe_dump({
        "fusion": {"method": [method], "layerwise": layerwise, "coefficient": {"low": 0.2, "high": 0.6}},
        "pruning": {"sparsity": {"low": 0.1, "high": 0.3}}, "finetune": {"epochs": [0.2]}}))
    groups = fusion.layer_groups({k: v for k, v in suite.build_model(**MODEL).state_dict().items()
                                  if k.startswith("trunk.")})
    space = SearchSpace(SpaceSpec.from_yaml(path), layers=["trunk.fc1", "trunk.fc2"], tasks=suite.task_names,
                        suite=suite.spec, model=MODEL, fusion_knobs=fusion.KNOBS, merge_groups=groups,
                        base=TINY_TRAIN, seed=seed)
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    policy = space.suggest(study.ask())
    assert policy.fusion.method == method
    return policy


def exported(policy: Policy, metrics: dict) -> Policy:
    """The policy export writes for the trial: the drawn one, with the fusion it learned."""
    data = with_learned_fusion(policy.to_dict(), json.loads(json.dumps(metrics)).get(LEARNED_FUSION))
    return Policy.from_dict(yaml.safe_load(yaml.safe_dump(data)))  # through YAML, as export writes it


@pytest.mark.parametrize("method", NEW_METHODS)
def test_space_named_method_is_reproduced_by_its_recorded_policy(method, tiny_suite, tiny_artifacts, tmp_path):
    policy = drawn_policy(tiny_suite, tmp_path, method, layerwise=method == "adamerging")
    trial_model, trial = apply_policy(tiny_suite, policy, tiny_artifacts, measure_spec=FAST)
    recorded = exported(policy, trial)
    if method == "adamerging":
        assert recorded.fusion.params["steps"] == 0 and recorded.fusion.coefficients != policy.fusion.coefficients
        assert learn_fusion(tiny_suite, recorded, tiny_artifacts, device="cpu") is recorded  # no learning again
    else:
        assert LEARNED_FUSION not in trial and recorded == policy
    applied_model, applied = apply_policy(tiny_suite, recorded, tiny_artifacts, measure_spec=FAST)
    quality = [k for k in trial if k == "score" or k.startswith(("metric/", "test/"))]
    assert {k: applied[k] for k in quality} == {k: trial[k] for k in quality}
    a, b = trial_model.state_dict(), applied_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def policy_with(suite, **fusion_section) -> Policy:
    from conftest import tiny_policy

    return tiny_policy(suite, fusion={"method": "adamerging", **fusion_section})


def unsupervised_loss(model, suite, artifacts) -> dict[str, float]:
    """AdaMerging's objective on the first training inputs, per head: a classification head's
    entropy, any other head's squared distance to its own expert's output."""
    x = suite.train.x[:512]
    with torch.no_grad():
        out = model.eval()(x)
    total = {}
    for t in suite.tasks:
        if t.kind == "classification":
            probs = out[t.name].softmax(dim=1)
            total[t.name] = float(-(probs * probs.log()).sum(dim=1).mean())
            continue
        own = {u: float(u == t.name) for u in suite.task_names}
        expert = start_model(suite, policy_with(suite, coefficients=own, params={"steps": 0}), artifacts,
                             device="cpu", statistics="base")
        with torch.no_grad():
            total[t.name] = float((out[t.name] - expert.eval()(x)[t.name]).pow(2).mean())
    return total


@pytest.mark.parametrize("layerwise", [False, True])
def test_learning_lowers_the_entropy_from_the_starting_coefficient(layerwise, tiny_suite, tiny_artifacts):
    groups = fusion.layer_groups({k: v for k, v in tiny_artifacts.base.items() if k.startswith("trunk.")})
    start = {t: ({g: 0.3 for g in groups} if layerwise else 0.3) for t in tiny_suite.task_names}
    policy = policy_with(tiny_suite, coefficients=start, params={"steps": 60, "lr": 0.05, "init": 0.3})
    learned = learn_fusion(tiny_suite, policy, tiny_artifacts, device="cpu")
    coefficients = learned.fusion.coefficients
    assert all(isinstance(c, dict) == layerwise for c in coefficients.values())
    values = [v for c in coefficients.values() for v in (c.values() if layerwise else [c])]
    assert all(0.0 <= v <= 1.0 for v in values) and any(abs(v - 0.3) > 1e-3 for v in values)
    before = unsupervised_loss(start_model(tiny_suite, policy.replace(fusion={**policy.fusion.model_dump(),
                                                                            "params": {"steps": 0}}),
                                           tiny_artifacts, device="cpu", statistics="base"), tiny_suite, tiny_artifacts)
    after = unsupervised_loss(start_model(tiny_suite, learned, tiny_artifacts, device="cpu", statistics="base"),
                              tiny_suite, tiny_artifacts)
    assert sum(after.values()) < sum(before.values())
    assert after["left"] + after["right"] < before["left"] + before["right"]  # the entropy term, on its own


def test_labels_are_never_read(tiny_suite, tiny_artifacts):
    """Scrambled training labels (NaN targets, shuffled classes) learn the same coefficients."""
    policy = policy_with(tiny_suite, coefficients={t: 0.3 for t in tiny_suite.task_names},
                         params={"steps": 20, "lr": 0.05})
    scrambled_y = {t: (torch.full_like(y, float("nan")) if y.is_floating_point() else y.flip(0))
                   for t, y in tiny_suite.train.y.items()}
    scrambled = dataclasses.replace(tiny_suite, train=dataclasses.replace(tiny_suite.train, y=scrambled_y))
    a = learn_fusion(tiny_suite, policy, tiny_artifacts, device="cpu").fusion.coefficients
    b = learn_fusion(scrambled, policy, tiny_artifacts, device="cpu").fusion.coefficients
    assert a == b


def test_report_puts_the_learned_fusion_in_the_trial_policy(tmp_path):
    from reports.experiment import load_trial

    proposed = {"schema": "prunefuse.policy/1", "fusion": {"method": "adamerging", "coefficients": {"a": 0.3},
                                                           "params": {"steps": 50}}}
    learned = {"method": "adamerging", "coefficients": {"a": 0.71}, "params": {"steps": 0}, "finetune_epochs": 0.0}
    trial = tmp_path / "trial_x"
    trial.mkdir()
    (trial / "params.json").write_text(json.dumps({"policy": proposed}))
    (trial / "result.json").write_text(json.dumps({"score": 0.1, "final": True,
                                                   LEARNED_FUSION: json.dumps(learned)}) + "\n")
    row = load_trial(trial, search_over=True)
    assert row["policy"]["fusion"] == learned and row["policy/fusion/coefficients/a"] == 0.71
    (trial / "result.json").write_text(json.dumps({"score": 0.1, "final": True}) + "\n")
    assert load_trial(trial, search_over=True)["policy"] == proposed
