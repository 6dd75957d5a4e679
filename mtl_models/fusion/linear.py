"""The linear merges: weight averaging and task arithmetic (Ilharco et al. 2023, "Editing
Models with Task Arithmetic"); the rule the other methods use for tensors they do not treat."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .merge import KeyInputs
from .registry import register


def summed(deltas: Mapping[str, Tensor]) -> Tensor:
    """sum_t lambda_t tau_t (the coefficients are already in `deltas`)."""
    return torch.stack(list(deltas.values())).sum(dim=0)


def summed_streamed(key: KeyInputs, divisor: int = 1) -> Tensor:
    """theta_0 + sum_t lambda_t tau_t / divisor, chunk by chunk: the same additions in the same
    order as `summed` (a stacked sum over tasks adds them one by one), bit for bit."""
    out = torch.empty(key.base.numel(), dtype=key.base.dtype, device=key.base.device)
    for start, theta0, taus in key.chunks():
        total = None
        for t, tau in taus.items():
            scaled = tau.mul_(key.lambdas[t])
            total = scaled if total is None else total.add_(scaled)
        if divisor != 1:
            total = total / divisor
        out[start:start + theta0.numel()] = total.add_(theta0)
    return out.view(key.base.shape)


@register("average")
def average(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    return torch.stack(list(deltas.values())).mean(dim=0)


@register("task_arithmetic")
def task_arithmetic(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    return summed(deltas)


average.streamed = lambda key: summed_streamed(key, divisor=len(key.experts))
task_arithmetic.streamed = summed_streamed
