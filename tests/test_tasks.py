"""Task kinds, their losses and metrics, and the oriented score every reader uses."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mtl_models.suites.base import Split, Task, TaskSuite


def test_kind_registry_and_vocabulary_agree():
    from mtl_models.training import tasks
    from spaces.vocabulary import TASK_KINDS, TASK_METRICS

    assert {k: tuple(v.metrics) for k, v in tasks.KINDS.items()} == TASK_KINDS
    assert set(tasks.METRICS) == set(TASK_METRICS)


def test_a_task_takes_its_sense_from_its_metric():
    from spaces.errors import PrunefuseError

    assert Task("err", "regression", 1, metric="mae").higher_is_better is False
    assert Task("d", "depth", 1).metric == "abs_err" and Task("d", "depth", 1).sense == "min"
    assert Task("c", "classification", 3).higher_is_better is True
    with pytest.raises(PrunefuseError, match="contradicts its metric 'mae'"):
        Task("err", "regression", 1, metric="mae", higher_is_better=True)
    with pytest.raises(PrunefuseError, match="expected one of: r2, mae, rounded_accuracy"):
        Task("err", "regression", 1, metric="accuracy")
    with pytest.raises(PrunefuseError, match="kind 'dense'"):
        Task("x", "dense", 1)


def test_metrics_follow_libmtl_definitions():
    from mtl_models.training.tasks import IGNORE_INDEX, METRICS, task_loss

    # Segmentation: 2 classes, one ignored pixel that is wrong and must not count.
    target = torch.tensor([[[0, 0], [1, IGNORE_INDEX]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])  # predicts 0, 1, 1, 0
    # confusion: class 0: tp 1, fn 1; class 1: tp 1, fp 1 -> IoU 1/2 each; pixel accuracy 2/3
    assert METRICS["miou"](logits, target) == pytest.approx(0.5)
    assert METRICS["pixel_accuracy"](logits, target) == pytest.approx(2 / 3)
    # Depth: a pixel with true depth 0 is unknown and left out.
    pred, true = torch.tensor([[[[2.0, 9.0], [3.0, 5.0]]]]), torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    assert METRICS["abs_err"](pred, true) == pytest.approx((1 + 0 + 1) / 3)
    assert METRICS["rel_err"](pred, true) == pytest.approx((1 / 1 + 0 + 1 / 4) / 3)
    assert task_loss(Task("d", "depth", 1), pred, true).item() == pytest.approx(2 / 3)
    # Normals: predictions are normalised; an all-zero true normal is unknown.
    n_true = torch.zeros(1, 3, 1, 2)
    n_true[0, 2, 0, 0] = 1.0
    n_pred = torch.zeros(1, 3, 1, 2)
    n_pred[0, 0, 0, :] = 3.0
    assert METRICS["mean_angle_err"](n_pred, n_true) == pytest.approx(90.0)
    # Multilabel: logits > 0 predict a label.
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    assert METRICS["label_accuracy"](out, y) == pytest.approx((0.5 + 1.0) / 2)
    assert METRICS["macro_f1"](out, y) == pytest.approx((2 / 3 + 1.0) / 2)


def _error_suite() -> TaskSuite:
    """Images with one class, one MAE regression and one depth map to predict."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(n, 3, 8, 8, generator=g)
        depth = 2.0 + x[:, 0].abs()                     # per pixel, learnable from the input
        return Split(x, {"cls": (x[:, 1].mean((1, 2)) > 0).long(), "err": x[:, 2].mean((1, 2)) * 3,
                         "depth": depth})

    tasks = (Task("cls", "classification", 2), Task("err", "regression", 1, metric="mae"), Task("depth", "depth", 1))
    return TaskSuite("errors", {}, tasks, split(256), split(128), split(128), (3, 8, 8))


def test_worse_error_tasks_lower_the_score_and_break_their_floor(tmp_path):
    import pandas as pd

    from mtl_models.artifacts import Artifacts
    from mtl_models.pipeline import MeasureSpec, measure_model
    from mtl_models.training.train import TrainOptions, evaluate, train
    from reports import select
    from search.optuna_search import TaskFloors

    torch.manual_seed(0)
    suite = _error_suite()
    model = suite.build_model(trunk="cnn", channels=[8, 8])
    train(model, suite, TrainOptions(epochs=3, lr=3e-3, batch_size=32))
    dense = {split: evaluate(model, suite, split) for split in ("val", "test")}
    art = Artifacts("k", suite.spec, {"trunk": "cnn"}, model.state_dict(), dense)
    spec = MeasureSpec(latency_batch=4, runs=1, warmup=0)
    base = measure_model(model, suite, art, spec)
    assert base["score"] == pytest.approx(0.0, abs=1e-6)

    # Make the MAE head and the depth head worse: both error metrics grow.
    with torch.no_grad():
        for task in ("err", "depth"):  # a constant prediction far above every label
            model.heads[task].out.weight.zero_()
            model.heads[task].out.bias.fill_(50.0)
    worse = measure_model(model, suite, art, spec)
    assert worse["metric/err"] > base["metric/err"] and worse["metric/depth"] > base["metric/depth"]
    assert worse["score"] < base["score"] - 10          # the default objective goes down
    assert worse["metric/cls"] == pytest.approx(base["metric/cls"])

    # Both floors break, in the search's constraints and in export's feasibility alike.
    floors = TaskFloors(dense["val"], 5.0, senses=suite.senses)
    by_task = dict(zip(dense["val"], floors.values(worse)))
    assert by_task["err"] > 0 and by_task["depth"] > 0 and by_task["cls"] <= 0
    assert all(v <= 0 for v in floors.values(base))
    (tmp_path / "prunefuse.json").write_text(json.dumps({"name": "e", "max_task_drop": 5.0,
                                                         "objectives": [["score", "max"]]}))
    (tmp_path / "dense.json").write_text(json.dumps({"dense_val": dense["val"], "senses": suite.senses}))
    rows = pd.DataFrame([base, worse])
    assert select.feasible(rows, tmp_path).tolist() == [True, False]
    # Without senses (the old rule, higher always better) the worse model looked better.
    assert all((dense["val"][t] - worse[f"metric/{t}"]) * 100 < 0 for t in ("err", "depth"))


def test_old_experiments_read_their_accuracy_as_score(tmp_path):
    from report_fixtures import make_experiment
    from reports import experiment, select

    exp = make_experiment(tmp_path, 12, seed=3)
    for d in exp.glob("trial_*"):  # rewrite as an experiment from before `score`
        f = d / "result.json"
        if f.is_file():
            lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            for r in lines:
                r["accuracy"] = r.pop("score")
                r["test_accuracy"] = r.pop("test_score")
            f.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    cfg = json.loads((exp / "prunefuse.json").read_text())
    cfg["objectives"][0][0] = "accuracy"
    (exp / "prunefuse.json").write_text(json.dumps(cfg))
    assert experiment.objectives(exp)[0] == ("score", "max")
    df = experiment.load_experiment(exp)
    assert df["score"].notna().any() and not math.isnan(float(df["score"].dropna().iloc[0]))
    assert select.by_knee(df, experiment.objectives(exp), exp)["trial_id"]


@pytest.fixture(scope="module")
def tiny_scenes():
    from mtl_models import suites

    return suites.get("scenes", train_images=48, val_images=16, test_images=16, size=16)


def test_scenes_is_seeded_and_labels_every_kind(tiny_scenes):
    from mtl_models import suites
    from mtl_models.training.tasks import IGNORE_INDEX

    s = tiny_scenes
    assert [(t.name, t.kind, t.metric, t.sense) for t in s.tasks] == [
        ("semantic", "segmentation", "miou", "max"), ("depth", "depth", "abs_err", "min"),
        ("normals", "normals", "mean_angle_err", "min")]
    seg, depth, normals = (s.train.y[t] for t in ("semantic", "depth", "normals"))
    assert s.train.x.shape == (48, 3, 16, 16) and seg.shape == depth.shape == (48, 16, 16)
    assert normals.shape == (48, 3, 16, 16)
    sky = seg == IGNORE_INDEX                     # the sky: no class, no depth, no normal
    assert sky.any() and (depth[sky] == 0).all() and (normals.abs().sum(1)[sky] == 0).all()
    assert (depth[~sky] > 0).all() and torch.allclose(normals.norm(dim=1)[~sky], torch.ones(int((~sky).sum())))
    assert set(seg.unique().tolist()) == {IGNORE_INDEX, 0, 1, 2, 3}
    again = suites.get("scenes", train_images=48, val_images=16, test_images=16, size=16)
    assert torch.equal(again.val.x, s.val.x) and torch.equal(again.val.y["depth"], s.val.y["depth"])


@pytest.mark.parametrize("trunk, channels", [("cnn", [8, 16, 16]), ("resnet", [8, 16, 16])])
def test_dense_heads_follow_the_trunk_through_structured_pruning_and_reload(tiny_scenes, trunk, channels, tmp_path):
    from mtl_models.models import checkpoint
    from mtl_models.pruning import coupled_groups, prune
    from mtl_models.training.tasks import task_loss

    s = tiny_scenes
    torch.manual_seed(0)
    model = s.build_model(trunk=trunk, channels=channels)
    x = s.train.x[:8]

    def losses(m):
        out = m(x)
        return {t.name: task_loss(t, out[t.name], s.train.y[t.name][:8]) for t in s.tasks}

    groups = coupled_groups(model, x[:2])
    prune(model, {g: 0.5 for g in groups}, importance="multitask_taylor", example_inputs=x[:2], task_losses=losses)
    out_map = model.trunk(x[:2])
    for task, head in model.heads.items():
        assert head.conv.in_channels == out_map.shape[1] < channels[-1]    # pruned, and in step
    out = model(x[:2])
    assert out["semantic"].shape == (2, 4, 16, 16) and out["depth"].shape == (2, 1, 16, 16)
    assert out["normals"].shape == (2, 3, 16, 16)
    # The pruned dense model reloads from weights alone (checkpoint.resize_to + strict load).
    fresh = s.build_model(trunk=trunk, channels=channels)
    checkpoint.resize_to(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x[:2])["depth"], model(x[:2])["depth"])


def test_dense_tasks_need_a_conv_trunk(tiny_scenes):
    from spaces.errors import PrunefuseError

    with pytest.raises(PrunefuseError, match="has dense tasks"):
        tiny_scenes.build_model(trunk="mlp")


def test_the_report_shows_each_tasks_sense_and_delta_m(tmp_path):
    from report_fixtures import make_experiment
    from reports.html import build_report

    exp = make_experiment(tmp_path, 10, seed=2)
    dense = json.loads((exp / "dense.json").read_text())
    dense["senses"]["sum"], dense["task_metrics"]["sum"] = "min", "mae"
    (exp / "dense.json").write_text(json.dumps(dense))
    page = build_report(exp)
    assert "sum: mae ↓ (lower is better)" in page and "left: accuracy ↑" in page
    assert "Δm% vs dense" in page and "m vs dense: " in page   # the table and the hover text


def test_a_plugin_model_for_dense_tasks_is_checked_against_its_labels(tiny_scenes):
    from torch import nn

    from mtl_models.suites import check_model
    from spaces.errors import PrunefuseError

    model = tiny_scenes.build_model(trunk="cnn", channels=[4, 8])
    check_model(model, tiny_scenes)                       # the built-in dense model fits
    model.heads["depth"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(PrunefuseError, match=r"head 'depth' outputs shape \(2, 1\).*expected \(2, 1, 16, 16\)"):
        check_model(model, tiny_scenes)
