"""Reading a weights file: `torch.load(weights_only=True)` and nothing but its answer.

torch's weights-only unpickler warns (a two-line `UserWarning`) whenever a file was pickled
with a protocol newer than its own default, before it loads or refuses the file. `torch.save`
never writes such files, so the warning only ever precedes a refusal (a raw pickle, a
poisoned cache entry) that the caller turns into one clear line: it is noise, and dropped.
"""
from __future__ import annotations

import warnings

import torch


def load_weights(path, *, map_location="cpu"):
    """torch.load(path, weights_only=True) without the pickle-protocol warning; errors pass through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)
