"""Per-task loss and metric, chosen by the task's kind and metric name."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .suites.base import Task


def task_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task.kind == "classification":
        return F.cross_entropy(output, target)
    return F.mse_loss(output.reshape(-1), target)


def _accuracy(output, target):
    return (output.argmax(dim=1) == target).float().mean().item()


def _rounded_accuracy(output, target):
    # A regression head on an integer-valued target (the sum of two digits) is right
    # when its prediction rounds to the true value.
    return (output.reshape(-1).round() == target.round()).float().mean().item()


def _r2(output, target):
    pred = output.reshape(-1)
    ss_res = ((target - pred) ** 2).sum()
    ss_tot = ((target - target.mean()) ** 2).sum().clamp_min(1e-12)
    return (1.0 - ss_res / ss_tot).item()


def _mae(output, target):
    return (output.reshape(-1) - target).abs().mean().item()


# name -> (output, target) -> float. `Task.higher_is_better` must match the metric.
METRICS = {
    "accuracy": _accuracy,
    "rounded_accuracy": _rounded_accuracy,
    "r2": _r2,
    "mae": _mae,
}


def task_metric(task: Task, output: torch.Tensor, target: torch.Tensor) -> float:
    if task.kind == "regression" and task.unit != 1.0:
        output, target = output * task.unit, target * task.unit
    return METRICS[task.metric](output, target)
