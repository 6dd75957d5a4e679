"""What can be decided: the Policy (the exported artifact) and the SearchSpace. No torch, no ray."""
from .errors import PrunefuseError
from .knobs import Knob
from .policy import Policy
from .space import SearchSpace, SpaceSpec

__all__ = ["Policy", "SearchSpace", "SpaceSpec", "Knob", "PrunefuseError"]
