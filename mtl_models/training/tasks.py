"""Task kinds: each kind's loss and metrics, chosen by the task's kind and metric name.

The dense kinds follow LibMTL's NYUv2 definitions (`examples/nyu/utils.py`), so numbers are
comparable: segmentation is per-pixel cross-entropy ignoring label -1, scored by mIoU and
pixel accuracy over the whole split's confusion matrix; depth is L1 over pixels whose true
depth is non-zero, scored by absolute and relative error; normals are a cosine loss over
pixels with a non-zero true normal, scored by the mean angle error in degrees. Metric names
and senses live in `spaces.vocabulary.TASK_METRICS`; a test checks both registries agree.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from mtl_models.suites.base import Task

IGNORE_INDEX = -1   # a segmentation label that no loss or metric counts


# -- losses: (output, target) -> scalar tensor ----------------------------------------------

def _ce(output, target):
    return F.cross_entropy(output, target)


def _mse(output, target):
    return F.mse_loss(output.reshape(-1), target)


def _bce(output, target):
    return F.binary_cross_entropy_with_logits(output, target)


def _seg_ce(output, target):
    return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX)


def _depth_valid(target):
    return target != 0


def _depth_l1(output, target):
    valid = _depth_valid(target)
    return (output.squeeze(1) - target).abs()[valid].sum() / valid.sum().clamp_min(1)


def _unit(output):
    return output / output.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)


def _normal_valid(target):
    return target.abs().sum(dim=1) != 0


def _cosine(output, target):
    valid = _normal_valid(target)
    return 1.0 - (_unit(output) * target).sum(dim=1)[valid].sum() / valid.sum().clamp_min(1)


# -- metrics: (output, target) -> float ----------------------------------------------------

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


def _label_accuracy(output, target):
    return ((output > 0).float() == target).float().mean(dim=0).mean().item()


def _macro_f1(output, target):
    # Per label F1 = 2TP / (2TP + FP + FN); a label nobody predicts and nobody has scores 0
    # (scikit-learn's f1_score(average="macro") with its default zero_division).
    pred, true = output > 0, target > 0.5
    tp = (pred & true).sum(0).float()
    wrong = (pred ^ true).sum(0).float()
    return (2 * tp / (2 * tp + wrong).clamp_min(1)).mean().item()


def _confusion(output, target):
    k = output.shape[1]
    pred, true = output.argmax(dim=1).reshape(-1), target.reshape(-1)
    keep = true != IGNORE_INDEX
    return torch.bincount(true[keep] * k + pred[keep], minlength=k * k).reshape(k, k).double()


def _miou(output, target):
    h = _confusion(output, target)
    union = h.sum(0) + h.sum(1) - h.diag()
    present = union > 0            # a class neither predicted nor labelled is left out
    return (h.diag()[present] / union[present]).mean().item()


def _pixel_accuracy(output, target):
    h = _confusion(output, target)
    return (h.diag().sum() / h.sum().clamp_min(1)).item()


def _abs_err(output, target):
    valid = _depth_valid(target)
    return ((output.squeeze(1) - target).abs()[valid].sum() / valid.sum().clamp_min(1)).item()


def _rel_err(output, target):
    valid = _depth_valid(target)
    err = (output.squeeze(1) - target).abs()[valid] / target[valid].abs()
    return (err.sum() / valid.sum().clamp_min(1)).item()


def _mean_angle_err(output, target):
    valid = _normal_valid(target)
    cos = (_unit(output) * target).sum(dim=1)[valid].clamp(-1, 1)
    return torch.rad2deg(torch.acos(cos)).mean().item()


class Kind(NamedTuple):
    loss: Callable
    metrics: dict[str, Callable]     # name -> metric; the first is the kind's default
    scaled: bool = False             # outputs and labels are multiplied by `Task.unit` before metrics


KINDS = {
    "classification": Kind(_ce, {"accuracy": _accuracy}),
    "regression": Kind(_mse, {"r2": _r2, "mae": _mae, "rounded_accuracy": _rounded_accuracy}, scaled=True),
    "multilabel": Kind(_bce, {"label_accuracy": _label_accuracy, "macro_f1": _macro_f1}),
    "segmentation": Kind(_seg_ce, {"miou": _miou, "pixel_accuracy": _pixel_accuracy}),
    "depth": Kind(_depth_l1, {"abs_err": _abs_err, "rel_err": _rel_err}, scaled=True),
    "normals": Kind(_cosine, {"mean_angle_err": _mean_angle_err}),
}

# name -> (output, target) -> float, over every kind.
METRICS = {name: fn for kind in KINDS.values() for name, fn in kind.metrics.items()}


def task_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return KINDS[task.kind].loss(output, target)


def task_metric(task: Task, output: torch.Tensor, target: torch.Tensor) -> float:
    kind = KINDS[task.kind]
    if kind.scaled and task.unit != 1.0:
        output, target = output * task.unit, target * task.unit
    return kind.metrics[task.metric](output, target)
