"""Knowledge distillation in the fine-tune: the compressed model also learns its teacher's outputs.

Hinton et al. 2015. Heads that emit class logits (classification; segmentation, per pixel)
learn KL(teacher ‖ student) of the softmaxes at temperature T, × T² so its gradients keep
their scale as T changes; the other heads (regression, multilabel logits, depth, normals)
learn the mean squared error to the teacher's outputs (suites scale regression targets to
about unit size, `Task.unit`, so this is on the task loss's own scale; dividing by the
teacher's variance instead would blow up wherever the teacher is nearly constant). The distillation term is the mean
over tasks, mixed into the task loss by `weight`. The teacher is the dense base (`dense`) or
the model the cycle started from, fused when the policy fuses, before any pruning (`fused`);
it runs once per batch, in eval mode, with no grad (`mtl_models.training.train`).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

LOGIT_KINDS = ("classification", "segmentation")


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """One head's distillation loss; `teacher` carries no grad."""
    if kind in LOGIT_KINDS:
        t = float(temperature)
        log_p = F.log_softmax(teacher / t, dim=1)
        log_q = F.log_softmax(student / t, dim=1)
        # KL summed over classes, averaged over samples (and pixels).
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * t * t
    return F.mse_loss(student, teacher)


def combined(tasks, out: dict, teacher_out: dict, *, weight: float, temperature: float) -> torch.Tensor:
    """weight × the mean over `tasks` (Task objects) of each head's distillation loss."""
    terms = [distill_loss(t.kind, out[t.name], teacher_out[t.name].float(), temperature) for t in tasks]
    return weight * torch.stack(terms).mean()


def teacher_for(which: str, *, start, dense_state: dict, build):
    """A frozen eval-mode copy of the teacher: the dense base (`build()` + `dense_state`) or
    `start`, the model the cycle starts from (fused when the policy fuses)."""
    if which == "dense":
        teacher = build()
        teacher.load_state_dict(dense_state)
        teacher.to(next(start.parameters()).device)
    elif which == "fused":
        teacher = copy.deepcopy(start)
    else:
        from spaces.errors import PrunefuseError

        raise PrunefuseError(f"distillation teacher {which!r} is not one of: dense, fused")
    return teacher.eval().requires_grad_(False)
