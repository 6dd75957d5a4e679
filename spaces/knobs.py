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


def coerce_number(owner: str, name: str, value, cast, *, low=None, high=None, low_open: bool = False):
    """`cast(value)` within bounds, or a PrunefuseError naming `owner.name`, what came and what fits."""
    from .errors import PrunefuseError

    bounds = " ".join(filter(None, [f"{'>' if low_open else '>='} {low}" if low is not None else "",
                                    f"<= {high}" if high is not None else ""]))
    try:
        if isinstance(value, bool) or (cast is int and float(value) != int(float(value))):
            raise ValueError
        out = cast(value) if cast is float else int(float(value))
        if out != out or abs(out) == float("inf"):
            raise ValueError  # NaN / inf: no epoch count, rate or size means that
    except (TypeError, ValueError, OverflowError):
        raise PrunefuseError(f"{owner} {name}={value!r}: expected {'a whole number' if cast is int else 'a number'}"
                             f"{' ' + bounds if bounds else ''}") from None
    if (low is not None and (out <= low if low_open else out < low)) or (high is not None and out > high):
        raise PrunefuseError(f"{owner} {name}={value!r} is out of range; expected {bounds}")
    return out
