"""A real plugin suite that fails on purpose, for the fault-tolerance tests.

`prunefuse search --suite tests.plugins.faulty_suite:make_suite` (run from the repository
root) builds a small `synthetic` suite whose model misbehaves for some policies, chosen
deterministically by how far the policy pruned the first trunk layer (`trunk.fc1`):

- `raise_at`: the forward pass raises `RuntimeError("injected fault: ...")`;
- `nan_at`:   the forward pass returns NaN, so the fine-tune's loss becomes nan;
- `oom_at`:   the forward pass raises `torch.OutOfMemoryError` (what CUDA raises).

Each is a list of sparsities of trunk.fc1 (matched within 0.04), so a space file with
`pruning: {sparsity: [0.0, 0.25, 0.5, 0.75]}` decides which trials fail and how. The dense
model (sparsity 0) always works, so the base and experts train normally. A model that was
never trained never fails (an `armed` buffer, set by the first training step and carried in
the base's state dict): the search's pruning check on a fresh model passes, and the faults
are what trials meet at run time. `train_delay`
sleeps that many seconds per training step of a pruned model: slow trials, for the tests
that kill a search while trials run.
"""
from __future__ import annotations

import time

import torch

from mtl_models.models import MTLModel, build_model
from mtl_models.suites.synthetic import make_synthetic


class FaultyModel(MTLModel):
    """The built-in MLP model, failing according to its trunk's width after pruning."""

    full_width: int = 0
    faults: dict = {}
    train_delay: float = 0.0

    def sparsity(self) -> float:
        fc1 = self.trunk.fc1
        return 1.0 - fc1.weight.shape[0] / self.full_width

    def fault(self) -> str | None:
        s = self.sparsity()
        for kind, values in self.faults.items():
            if any(abs(s - v) < 0.04 for v in values):
                return kind
        return None

    def forward(self, x):
        if self.training:
            self.armed.fill_(1.0)
        kind = self.fault() if self.full_width and bool(self.armed) else None
        if kind == "raise":
            raise RuntimeError(f"injected fault: trunk.fc1 pruned to {self.sparsity():.2f}")
        if kind == "oom":
            raise torch.OutOfMemoryError(f"injected fault: out of memory at trunk.fc1 sparsity {self.sparsity():.2f}")
        if self.training and self.train_delay and self.sparsity() > 0:
            time.sleep(self.train_delay)
        out = super().forward(x)
        if kind == "nan":
            out = {task: value * float("nan") for task, value in out.items()}
        return out


class FaultyFactory:
    """model_factory(suite, trunk=..., **spec): a class, so the suite pickles into Ray tasks."""

    def __init__(self, faults: dict, train_delay: float):
        self.faults, self.train_delay = faults, train_delay

    def __call__(self, suite, trunk: str = "mlp", **spec):
        model = build_model(suite, trunk="mlp", **spec)
        model.__class__ = FaultyModel
        model.register_buffer("armed", torch.zeros(()))
        model.full_width = model.trunk.fc1.weight.shape[0]
        model.faults, model.train_delay = self.faults, self.train_delay
        return model


def make_suite(*, seed: int = 0, dim: int = 16, train_samples: int = 1200, val_samples: int = 300,
               test_samples: int = 300, raise_at: list | None = None, nan_at: list | None = None,
               oom_at: list | None = None, train_delay: float = 0.0):
    suite = make_synthetic(seed=seed, dim=dim, train_samples=train_samples, val_samples=val_samples,
                           test_samples=test_samples)
    faults = {"raise": list(raise_at or []), "nan": list(nan_at or []), "oom": list(oom_at or [])}
    suite.options = dict(seed=seed, dim=dim, train_samples=train_samples, val_samples=val_samples,
                         test_samples=test_samples, raise_at=faults["raise"], nan_at=faults["nan"],
                         oom_at=faults["oom"], train_delay=train_delay)
    suite.model_factory = FaultyFactory(faults, train_delay)
    return suite
