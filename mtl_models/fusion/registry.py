"""The registry every fusion method joins: name -> (deltas by task, key, *, knobs) -> merged delta.

A method sees one state-dict key at a time: `deltas` maps each task to its task vector for
that key, already scaled by the task's coefficient (float32 or wider), and returns the
merged delta of the same shape. Knob defaults are the keyword-only arguments' defaults.
Its own module; the methods and `merge` import it, it imports none of them.
"""
from __future__ import annotations

from spaces.registry import Registry

METHODS = Registry("fusion method")
register = METHODS.register
