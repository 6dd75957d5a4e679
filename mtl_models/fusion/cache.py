"""Per-tensor merge work that no trial's knobs change, kept across merges of the same experts.

A search merges the same experts once per trial with other coefficients and knobs. TSV-M's
whitened bases do not depend on either: the SVD of lambda * tau is tau's, with |lambda| times
its singular values and the sign of lambda on one side, and the polar factor of the stacked
Vh rows with some rows negated is the unsigned one with the same rows negated; so the bases
of the unscaled task vectors serve every trial (`singular.tsv_bases`), and TSV-M takes them
from here after the first merge. Iso-C and Iso-CTS keep nothing here: they decompose the
lambda-weighted sum, which every trial changes. TIES keeps nothing here either: what its trim
needs beyond the trial's density is a strided sample, cheaper to draw again than to
fingerprint (a float64 sum of each of base and experts would cost half a BERT-base TIES merge).

Entries are found by the content of the base and expert tensors (shape, dtype, the float64 sum
and a strided sample of 4096 entries, hashed), not by object identity: a search hands every
trial new tensor objects holding the same experts. At most BUDGET_BYTES are kept, the least
recently used entries go first.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

BUDGET_BYTES = 1 << 30
SAMPLE = 4096
_ENTRIES: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()
_LOCK = threading.Lock()  # merge runs keys side by side (merge._keys_in_parallel)


def fingerprint(t: Tensor) -> str:
    flat = t.detach().flatten()
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step][:SAMPLE].to("cpu", torch.float64).numpy().tobytes()
    total = float(flat.sum(dtype=torch.float64))
    return hashlib.blake2b(f"{tuple(t.shape)}{t.dtype}{total!r}".encode() + sample, digest_size=16).hexdigest()


def _size(entry) -> int:
    return sum(x.numel() * x.element_size() for x in entry)


def remembered(what: tuple, key: str, tensors: Sequence[Tensor], compute: Callable[[], tuple[Tensor, ...]]):
    """compute() (a tuple of tensors), kept under (what, key, the tensors' contents in order):
    every caller gets the very tensors the first computed (so a hit merges bit-identically)."""
    name = (what, key, *(fingerprint(t) for t in tensors))
    with _LOCK:
        if name in _ENTRIES:
            _ENTRIES.move_to_end(name)
            return _ENTRIES[name]
    entry = tuple(t.contiguous() for t in compute())  # outside the lock: other keys compute meanwhile
    with _LOCK:
        _ENTRIES[name] = entry
        while sum(_size(e) for e in _ENTRIES.values()) > BUDGET_BYTES and len(_ENTRIES) > 1:
            _ENTRIES.popitem(last=False)
    return entry


def clear() -> None:
    with _LOCK:
        _ENTRIES.clear()
