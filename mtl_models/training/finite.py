"""A NaN or inf in a merged or pruned model ends its trial, saying what and where.

Tune must never see a NaN metric (it leaves the Optuna trial running forever), and a NaN
found later (say, by `torch.linalg.eigh` failing as "ill-conditioned" in a Taylor score)
says nothing about its cause. So the cycle checks each model it makes before using it: every
parameter and buffer, then each task's output on a calibration batch (finite weights can
still overflow).
"""
from __future__ import annotations

import torch


class NonFinite(FloatingPointError):
    """A model holds or outputs NaN / inf; the trial that made it fails with this reason."""


def _kinds(t: torch.Tensor) -> str | None:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    found = [f"{n} NaN" for n in [nan] if n] + [f"{n} inf" for n in [inf] if n]
    return " and ".join(found) if found else None


@torch.no_grad()
def check_finite(model, what: str, x: torch.Tensor | None = None) -> None:
    """Raise NonFinite naming the first tensor (parameter or buffer) of `model` holding NaN /
    inf, else the first task whose output on `x` does. `what` names the model ("the merged
    model"). The model's training mode is left as it was."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and (found := _kinds(t)):
            raise NonFinite(f"{what} holds {found} of {t.numel()} values in {name}")
        if name.endswith("running_var") and (negative := int((t < 0).sum())):
            raise NonFinite(f"{what} holds {negative} negative BatchNorm variances of {t.numel()} in {name}: "
                            f"its outputs are NaN")
    if x is not None and x.is_floating_point():
        x = x[torch.isfinite(x.flatten(1)).all(dim=1)]  # a NaN input is the data's fault, not the model's
    if x is None or not len(x):
        return
    modes = [(m, m.training) for m in model.modules()]
    try:
        device = next((p.device for p in model.parameters()), x.device)
        outputs = model.eval()(x.to(device))
    finally:
        for m, training in modes:
            m.training = training
    for task, out in outputs.items():
        if found := _kinds(out):
            raise NonFinite(f"{what} outputs {found} for task {task!r} on {len(x)} training samples "
                            f"(every parameter and buffer is finite)")
