"""Per-tensor merge work that no trial's knobs change, kept across merges of the same experts.

A search merges the same experts once per trial with other coefficients and knobs. A task
vector's singular vectors do not depend on either (the SVD of lambda * tau is tau's, with
|lambda| times its singular values and the sign of lambda on one side), so TSV-M takes them
from here after the first merge. TIES keeps nothing here: what its trim needs beyond the
trial's density is a strided sample, cheaper to draw again than to fingerprint (a float64 sum
of each of base and experts would cost half a BERT-base TIES merge).

Entries are found by the content of the base and expert tensors (shape, dtype, the float64 sum
and a strided sample of 4096 entries, hashed), not by object identity: a search hands every
trial new tensor objects holding the same experts. At most BUDGET_BYTES are kept, the least
recently used entries go first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor

BUDGET_BYTES = 1 << 30
SAMPLE = 4096
_ENTRIES: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]] = OrderedDict()


def fingerprint(t: Tensor) -> str:
    flat = t.detach().flatten()
    step = max(1, flat.numel() // SAMPLE)
    sample = flat[::step][:SAMPLE].to("cpu", torch.float64).numpy().tobytes()
    total = float(flat.sum(dtype=torch.float64))
    return hashlib.blake2b(f"{tuple(t.shape)}{t.dtype}{total!r}".encode() + sample, digest_size=16).hexdigest()


def _size(entry) -> int:
    return sum(x.numel() * x.element_size() for x in entry)


def top_singular(key: str, base: Tensor, expert: Tensor, rank: int, dtype: torch.dtype):
    """(U[:, :rank], S[:rank], Vh[:rank]) of expert - base (a 2-D task vector), in `dtype`."""
    name = (key, fingerprint(base), fingerprint(expert), rank, dtype)
    if name in _ENTRIES:
        _ENTRIES.move_to_end(name)
        return _ENTRIES[name]
    tau = expert.to(device=base.device, dtype=dtype) - base.to(dtype)
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    entry = (u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous())
    _ENTRIES[name] = entry
    while sum(_size(e) for e in _ENTRIES.values()) > BUDGET_BYTES and len(_ENTRIES) > 1:
        _ENTRIES.popitem(last=False)
    return entry


def clear() -> None:
    _ENTRIES.clear()
