"""The linear merges: weight averaging and task arithmetic (Ilharco et al. 2023, "Editing
Models with Task Arithmetic"); the rule the other methods use for tensors they do not treat."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .registry import register


def summed(deltas: Mapping[str, Tensor]) -> Tensor:
    """sum_t lambda_t tau_t (the coefficients are already in `deltas`)."""
    return torch.stack(list(deltas.values())).sum(dim=0)


@register("average")
def average(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    return torch.stack(list(deltas.values())).mean(dim=0)


@register("task_arithmetic")
def task_arithmetic(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    return summed(deltas)
