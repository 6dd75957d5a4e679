"""Single-task references: artifacts carry their metrics, and Δm is measured against them.

Δm% = (1/T) Σ_t (−1)^{l_t} (M_t − M_t^ref) / M_t^ref × 100, l_t = 1 where lower is better
(Maninis et al. 2019). The tiny suite mixes a higher-is-better task (R²) with a
lower-is-better one (MAE) so that both signs of the formula are exercised.
"""
from __future__ import annotations

import json

import pytest
import torch

from mtl_models import artifacts, suites
from mtl_models.measuring import measure
from mtl_models.pipeline import MeasureSpec, apply_policy
from mtl_models.suites import Task, TaskSuite
from spaces import Policy

MODEL = {"trunk": "mlp", "width": 16, "depth": 1}
SPEC = artifacts.TrainSpec(epochs=4, lr=3e-3, batch_size=64, expert_epochs=0.0, seed=0)
FAST_MEASURE = MeasureSpec(latency_batch=8, runs=2, warmup=1)


@pytest.fixture(scope="module")
def mixed_suite():
    """Two linear tasks (no sines): task `fit` scored by R² (higher is better), `err` by MAE (lower)."""
    data = suites.get("synthetic", dim=8, correlation=0.3, sines=0, train_samples=600, val_samples=150,
                      test_samples=150, seed=1)
    tasks = (Task("fit", "regression", 1, metric="r2"),
             Task("err", "regression", 1, metric="mae", higher_is_better=False))
    rename = lambda split: type(split)(split.x, {"fit": split.y["task1"], "err": split.y["task2"]})  # noqa: E731
    return TaskSuite("tests.mixed", {"seed": 1}, tasks, rename(data.train), rename(data.val), rename(data.test),
                     input_shape=data.input_shape)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refs")


@pytest.fixture(scope="module")
def art(mixed_suite, cache):
    torch.set_num_threads(1)
    return artifacts.prepare(mixed_suite, MODEL, SPEC, cache_dir=cache, references=True, log=lambda *a: None)


def policy(suite, **changes):
    return Policy.from_dict({"schema": "prunefuse.policy/1", "suite": suite.spec,
                             "model": MODEL, "pruning": {"sparsity": {}}, "finetune": {"epochs": 0.0}, **changes})


def by_hand(metrics: dict, reference: dict, higher: dict) -> float:
    terms = [(-1) ** (0 if higher[t] else 1) * (metrics[t] - reference[t]) / reference[t] * 100 for t in reference]
    return sum(terms) / len(terms)


def test_artifacts_carry_per_task_single_task_metrics(art, mixed_suite):
    assert set(art.references) == {"val", "test"}
    for split in ("val", "test"):
        assert set(art.references[split]) == {"fit", "err"}
        assert all(isinstance(v, float) and v == v for v in art.references[split].values())
    # They are the metrics of single-task models (same trunk, same training), task by task.
    for task in ("fit", "err"):
        again = artifacts.train_reference(mixed_suite, MODEL, SPEC, task)
        assert again == pytest.approx({s: art.references[s][task] for s in ("val", "test")}, rel=1e-6)


def test_references_are_cached(art, mixed_suite, cache):
    files = list(cache.glob("*/references.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == art.references
    again = artifacts.prepare(mixed_suite, MODEL, SPEC, cache_dir=cache, references=True,
                              log=lambda *a: pytest.fail("nothing should be retrained") if "training" in a[0] else None)
    assert again.references == art.references


def test_apply_policy_delta_m_is_the_formula_against_references(art, mixed_suite):
    ref = art.references["val"]
    assert ref["fit"] > 0 and ref["err"] > 0, "the tiny references must be positive for the formula's division"
    _, metrics = apply_policy(mixed_suite, policy(mixed_suite, weighting={"method": "static",
                                                                         "weights": {"fit": 0.3, "err": 0.7}}),
                              art, measure_spec=FAST_MEASURE)
    reported = {t: metrics[f"metric/{t}"] for t in ("fit", "err")}
    higher = {"fit": True, "err": False}
    assert metrics["delta_m"] == pytest.approx(by_hand(reported, ref, higher), rel=1e-9, abs=1e-9)
    # Measured against the references, not the dense base (whose Δm differs here).
    against_dense = by_hand(reported, art.dense_metrics["val"], higher)
    assert abs(metrics["delta_m"] - against_dense) > 1e-6


def test_without_references_delta_m_is_against_the_dense_base(mixed_suite, cache):
    plain = artifacts.prepare(mixed_suite, MODEL, SPEC, cache_dir=cache, log=lambda *a: None)
    assert plain.references == {}
    _, metrics = apply_policy(mixed_suite, policy(mixed_suite), plain, measure_spec=FAST_MEASURE)
    # No fusion, no pruning, no fine-tune: the model is the dense base, so Δm = 0.
    assert metrics["delta_m"] == pytest.approx(0.0, abs=1e-9)


def test_delta_m_of_references_against_themselves_is_zero(art):
    higher = {"fit": True, "err": False}
    for split in ("val", "test"):
        assert measure.delta_m(art.references[split], art.references[split], higher) == 0.0


def test_delta_m_signs():
    # +100% on a higher-is-better task; the lower-is-better task halved its error: +50%.
    assert measure.delta_m({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 2.0}, {"a": True, "b": False}) == pytest.approx(75.0)
    # Worse on both: negative.
    assert measure.delta_m({"a": 0.5, "b": 3.0}, {"a": 1.0, "b": 2.0}, {"a": True, "b": False}) == pytest.approx(-50.0)
