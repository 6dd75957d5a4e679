"""How a method declares a searchable knob beside its own code.

Methods in `mtl_models` (a fusion method's density, GradNorm's alpha) declare their
knobs as `Knob`s; `spaces.SearchSpace` turns them into Optuna suggestions. Keeping the
declaration torch-free lets `spaces` compose them without importing the methods.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    low: float
    high: float
    log: bool = False
    integer: bool = False
    default: float | None = None

    def suggest(self, trial, name: str):
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def check(self, name: str, value) -> None:
        from .errors import PrunefuseError

        if not (self.low <= value <= self.high):
            raise PrunefuseError(f"{name}={value} is out of range; expected {self.low} <= {name} <= {self.high}")
