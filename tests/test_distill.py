"""Knowledge distillation in the fine-tune: the losses, a student pulled toward its teacher, the
policy knob, the space, and apply reproducing a distilled trial."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_policy
from spaces.errors import PrunefuseError

FAST = dict(runs=2, warmup=0, latency_batch=16)


def test_the_losses_are_zero_at_the_teacher_and_positive_elsewhere():
    from mtl_models.training.distill import distill_loss

    torch.manual_seed(0)
    logits, other = torch.randn(32, 10), torch.randn(32, 10)
    assert distill_loss("classification", logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss("classification", other, logits, 2.0).item() > 0.0
    maps = torch.randn(4, 5, 6, 6)  # segmentation: per-pixel class logits
    assert distill_loss("segmentation", maps, maps, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    values = torch.randn(32, 1)
    assert distill_loss("regression", values + 0.5, values, 2.0).item() == pytest.approx(0.25, rel=1e-4)


def test_a_student_learns_its_teachers_outputs(tiny_suite, tiny_artifacts):
    from mtl_models.training.distill import combined, teacher_for
    from mtl_models.training.train import Guidance, TrainOptions, train

    build = lambda: tiny_suite.build_model(trunk="mlp", width=64, depth=2)  # noqa: E731
    start = build()
    start.load_state_dict(tiny_artifacts.base)
    teacher = teacher_for("dense", start=start, dense_state=tiny_artifacts.base, build=build)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = tiny_suite.train.x[:512]

    def student(**distill):
        torch.manual_seed(0)
        model = tiny_suite.build_model(trunk="mlp", width=16, depth=1)
        train(model, tiny_suite, TrainOptions(epochs=8, lr=3e-3, seed=0), guide=Guidance(**distill))
        with torch.no_grad():
            return combined(tiny_suite.tasks, model.eval()(x), teacher(x), weight=1.0, temperature=2.0).item()

    frozen = copy.deepcopy(teacher.state_dict())
    taught = student(teacher=teacher, distill={"weight": 5.0, "temperature": 2.0})
    # The same student trained on labels alone ends farther from the teacher's outputs.
    assert taught < 0.8 * student()
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())  # the teacher never learns


def test_the_knob_is_recorded_checked_and_searched(tiny_suite):
    import optuna

    from spaces import Policy, SearchSpace, SpaceSpec

    policy = tiny_policy(tiny_suite, finetune={"epochs": 0.5, "distill": {"weight": 0.5, "teacher": "fused"}})
    import yaml

    again = Policy.from_dict(yaml.safe_load(policy.to_yaml()))
    assert again.finetune.distill.teacher == "fused" and again.finetune.distill.temperature == 2.0
    for bad in ({"weight": -1.0}, {"teacher": "oracle"}, {"temperature": 0.0}):
        with pytest.raises(PrunefuseError, match="distill"):
            tiny_policy(tiny_suite, finetune={"distill": bad})

    def space(distill):
        return SearchSpace(SpaceSpec.model_validate({"finetune": {"distill": distill}}),
                           layers=["trunk.fc1"], tasks=tiny_suite.task_names, suite=tiny_suite.spec,
                           model={"trunk": "mlp"})

    searched = space({"weight": {"low": 0.0, "high": 2.0}, "temperature": [1.0, 4.0], "teacher": ["dense", "fused"]})
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    drawn = searched.suggest(trial).finetune.distill
    assert 0.0 <= drawn.weight <= 2.0 and drawn.temperature in (1.0, 4.0) and drawn.teacher in ("dense", "fused")
    assert {"finetune.distill.weight", "finetune.distill.teacher"} <= set(trial.params)
    with pytest.raises(PrunefuseError, match="finetune.distill.weight"):
        space({"weight": {"low": -1.0, "high": 1.0}})
    with pytest.raises(PrunefuseError, match="finetune.distill.teacher"):
        space({"teacher": ["dense", "oracle"]})
    assert space(None).suggest(optuna.create_study().ask()).finetune.distill is None


@pytest.mark.parametrize("teacher", ["dense", "fused"])
def test_apply_reproduces_a_distilled_cycle(tiny_suite, tiny_artifacts, teacher):
    from mtl_models.pipeline import MeasureSpec, apply_policy

    fusion = {"method": "task_arithmetic", "coefficients": {t: 0.5 for t in tiny_suite.task_names}}
    distilled = tiny_policy(tiny_suite, fusion=fusion,
                            finetune={"epochs": 0.5, "distill": {"weight": 1.0, "teacher": teacher}})
    plain = tiny_policy(tiny_suite, fusion=fusion, finetune={"epochs": 0.5})
    spec = MeasureSpec(**FAST)
    first, m1 = apply_policy(tiny_suite, distilled, tiny_artifacts, measure_spec=spec)
    second, m2 = apply_policy(tiny_suite, distilled, tiny_artifacts, measure_spec=spec)
    third, _ = apply_policy(tiny_suite, plain, tiny_artifacts, measure_spec=spec)
    for k, v in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[k], v)
    assert m1["score"] == m2["score"]
    # Distillation changed the fine-tune (the knob is not ignored).
    assert any(not torch.equal(third.state_dict()[k], v) for k, v in first.state_dict().items())
