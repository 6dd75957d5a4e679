"""One way to register a method that users choose by name.

Fusion methods, task-weighting methods and pruning criteria (and whatever comes next) are
kept in a `Registry`: name -> the callable, plus what the search and the checks need to know
about it, declared once beside the method's code:

    MERGES = Registry("fusion method")

    @MERGES.register("ties", knobs={"density": Knob(0.05, 1.0)})
    def ties(deltas, key, *, density=0.2, scale=1.0): ...

- knobs: the searchable ranges of the method's keyword arguments. Their defaults are read
  from the signature (one statement of each default, in the code that uses it).
- needs: what data the method needs from its caller ("grads": calibration losses to
  differentiate; "seed": a seed, which follows the policy's unless the knob is given).
- the valid keyword arguments (`params`) are the callable's keyword-only parameters, so an
  unknown key in a policy fails before any training, listing the valid ones.

Torch-free: `spaces` composes knobs into the search space without importing the methods.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .errors import PrunefuseError, unknown_name
from .knobs import Knob


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    knobs: Mapping[str, Knob]
    needs: frozenset
    params: tuple[str, ...]        # keyword-only parameters: the keys a spec may give


def keyword_defaults(fn: Callable) -> dict[str, object]:
    """Keyword-only parameter -> its default (inspect.Parameter.empty where there is none);
    for a class, those of its constructor."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


class Registry(dict):
    """name -> callable (a plain dict to read), with each method's `Method` record in `.methods`."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.methods: dict[str, Method] = {}

    def register(self, name: str, *, knobs: Mapping[str, Knob] | None = None, needs: Iterable[str] = ()):
        def insert(fn: Callable) -> Callable:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            defaults = keyword_defaults(fn)
            filled = {}
            for key, knob in (knobs or {}).items():
                if key not in defaults:
                    raise TypeError(f"{self.what} {name!r}: knob {key!r} is not a keyword-only argument of "
                                    f"{getattr(fn, '__qualname__', fn)}")
                default = defaults[key]
                filled[key] = knob if default is inspect.Parameter.empty else dataclasses.replace(knob, default=default)
            self[name] = fn
            self.methods[name] = Method(name, fn, filled, frozenset(needs), tuple(defaults))
            return fn
        return insert

    def method(self, name) -> Method:
        """The record of `name`, or one error line listing the valid names."""
        if not isinstance(name, str) or name not in self.methods:
            raise unknown_name(self.what, name, self.methods)
        return self.methods[name]

    @property
    def knobs(self) -> dict[str, dict[str, Knob]]:
        """method -> {knob: Knob}: what the search space draws for each method."""
        return {n: dict(m.knobs) for n, m in self.methods.items()}

    def needing(self, what: str) -> set[str]:
        """The names of the methods that need `what`."""
        return {n for n, m in self.methods.items() if what in m.needs}

    def check_params(self, name: str, params: Mapping) -> None:
        """Each key of `params` is a keyword argument of the method."""
        valid = self.method(name).params
        for key in params:
            if key not in valid:
                raise PrunefuseError(f"unknown parameter {key!r} for {self.what} {name!r}; "
                                     f"expected one of: {', '.join(valid) or '(none)'}")
