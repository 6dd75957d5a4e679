"""Pareto-front utilities for the prunefuse search report (pure numpy).

Every function takes ``points`` as an (n, m) array of objective values and
``senses``, one of ``"max"`` / ``"min"`` per column (e.g. accuracy "max",
params "min", latency_ms "min").  Rows holding NaN or +/-inf are treated as
failed trials: they are never on a front, dominate nothing and add no volume.

Internally every objective is turned into a minimisation by negating "max"
columns, so one dominance rule serves all mixes of senses.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["pareto_front", "non_dominated_sort", "hypervolume", "default_reference",
           "knee", "hypervolume_history"]

_SENSES = ("max", "min")
# Elements per broadcast block: bounds temporary memory to a few tens of MB.
_BLOCK = 1 << 22
# Rows used to pre-screen dominance before the quadratic check.
_PROBE = 16


def _signs(senses: Sequence[str], m: int) -> np.ndarray:
    if isinstance(senses, str):
        raise ValueError(f"senses must be a sequence of 'max'/'min'; got the string {senses!r}")
    senses = list(senses)
    bad = [s for s in senses if s not in _SENSES]
    if bad:
        raise ValueError(f"senses must each be 'max' or 'min'; got {bad!r}")
    if len(senses) != m:
        raise ValueError(f"expected {m} senses (one per column); got {len(senses)}")
    return np.where(np.asarray(senses) == "max", -1.0, 1.0)


def _as_min(points, senses) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate; return (q, finite, signs) with q = points * signs (all minimised)."""
    arr = np.asarray(points, dtype=float)
    if arr.ndim == 1 and arr.size == 0 and not isinstance(senses, str):
        arr = arr.reshape(0, len(list(senses)))  # allow `[]` as "no trials yet"
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"expected points of shape (n, m) with m >= 1; got shape {arr.shape}")
    signs = _signs(senses, arr.shape[1])
    q = arr * signs
    return q, np.isfinite(q).all(axis=1), signs


def _ref_as_min(reference, signs: np.ndarray) -> np.ndarray:
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape != signs.shape:
        raise ValueError(f"expected reference of length {signs.size}; got shape {np.shape(reference)}")
    if not np.isfinite(ref).all():
        raise ValueError(f"reference must be finite; got {ref.tolist()}")
    return ref * signs


def _dominated_by(cand: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Per row of ``cand``: is it strictly dominated by some row of ``others``?"""
    out = np.zeros(len(cand), dtype=bool)
    if len(cand) == 0 or len(others) == 0:
        return out
    step = max(1, _BLOCK // (len(others) * cand.shape[1]))
    for s in range(0, len(cand), step):
        c = cand[s:s + step, None, :]
        weak = (others[None] <= c).all(axis=2)
        strict = (others[None] < c).any(axis=2)
        out[s:s + step] = (weak & strict).any(axis=1)
    return out


def _nondominated(q: np.ndarray) -> np.ndarray:
    """Mask of rows of finite ``q`` not dominated by any other row."""
    keep = np.ones(len(q), dtype=bool)
    if len(q) > 4 * _PROBE:
        # Rows with the smallest normalised sum are on the front and dominate
        # most others, so a cheap screen against them leaves few survivors.
        # Dropping rows dominated by any row is safe (dominance is transitive).
        span = np.ptp(q, axis=0)
        score = ((q - q.min(axis=0)) / np.where(span > 0, span, 1.0)).sum(axis=1)
        probe = q[np.argpartition(score, _PROBE)[:_PROBE]]
        keep = ~_dominated_by(q, probe)
    idx = np.flatnonzero(keep)
    keep[idx] = ~_dominated_by(q[idx], q[idx])
    return keep


def pareto_front(points, senses) -> np.ndarray:
    """Boolean mask of non-dominated rows.

    Row a dominates row b when a is no worse in every objective and strictly
    better in at least one.  Duplicates of a front point are all on the front;
    rows with NaN/inf are always False.
    """
    q, finite, _ = _as_min(points, senses)
    mask = np.zeros(len(q), dtype=bool)
    qf = q[finite]
    mask[finite] = _nondominated(qf)
    return mask


def non_dominated_sort(points, senses) -> np.ndarray:
    """Front rank per row: 0 = Pareto front, 1 = front once rank 0 is removed, ...

    Non-finite rows get rank -1.
    """
    q, finite, _ = _as_min(points, senses)
    idx = np.flatnonzero(finite)
    qf = q[idx]
    k = len(qf)
    dom = np.zeros((k, k), dtype=bool)  # dom[i, j]: row j dominates row i
    step = max(1, _BLOCK // max(1, k * q.shape[1]))
    for s in range(0, k, step):
        c = qf[s:s + step, None, :]
        dom[s:s + step] = (qf[None] <= c).all(axis=2) & (qf[None] < c).any(axis=2)
    # Peel fronts by domination counts so the whole sort stays O(k^2).
    count = dom.sum(axis=1)
    sub = np.full(k, -1)
    current, rank = np.flatnonzero(count == 0), 0
    while current.size:
        sub[current] = rank
        count -= dom[:, current].sum(axis=1)
        current = np.flatnonzero((count == 0) & (sub == -1))
        rank += 1
    ranks = np.full(len(q), -1)
    ranks[idx] = sub
    return ranks


def _hv2(q: np.ndarray, r: np.ndarray) -> float:
    order = np.lexsort((q[:, 1], q[:, 0]))
    x, y = q[order, 0], np.minimum.accumulate(q[order, 1])
    prev = np.concatenate(([r[1]], y[:-1]))
    return float(np.sum((r[0] - x) * (prev - y)))


def _hv3(q: np.ndarray, r: np.ndarray) -> float:
    """Sweep up the 3rd axis; the 2-D slice areas for all levels come from one
    masked running-minimum per block of levels instead of a Python loop."""
    q = q[np.argsort(q[:, 2], kind="stable")]
    n = len(q)
    xorder = np.lexsort((q[:, 1], q[:, 0]))
    x, y, level = q[xorder, 0], q[xorder, 1], xorder  # level = position in z order
    areas = np.empty(n)
    step = max(1, _BLOCK // (4 * n))  # float blocks: keep each temporary near 8 MB
    for s in range(0, n, step):
        lv = np.arange(s, min(n, s + step))[:, None]
        ys = np.minimum.accumulate(np.where(level[None] <= lv, y[None], r[1]), axis=1)
        prev = np.concatenate((np.full((len(lv), 1), r[1]), ys[:, :-1]), axis=1)
        areas[s:s + len(lv)] = ((r[0] - x)[None] * (prev - ys)).sum(axis=1)
    heights = np.diff(np.append(q[:, 2], r[2]))
    return float(np.dot(areas, heights))


def _hv(q: np.ndarray, r: np.ndarray) -> float:
    """Exact volume of the union of boxes [q_i, r] (minimisation, all q_i < r)."""
    if len(q) == 0:
        return 0.0
    m = q.shape[1]
    if m == 1:
        return float(r[0] - q[:, 0].min())
    if m == 2:
        return _hv2(q, r)
    if m == 3:
        return _hv3(q, r)
    # HSO: slice along the last axis, each slab an (m-1)-D problem.
    q = q[np.argsort(q[:, -1], kind="stable")]
    heights = np.diff(np.append(q[:, -1], r[-1]))
    vol = 0.0
    for k, h in enumerate(heights):
        if h > 0:
            slab = q[:k + 1, :-1]
            vol += h * _hv(slab[_nondominated(slab)], r[:-1])  # projections often dominate each other
    return vol


def _prune(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Keep finite points that strictly beat r everywhere and are non-dominated."""
    q = q[np.isfinite(q).all(axis=1) & (q < r).all(axis=1)]
    return np.unique(q[_nondominated(q)], axis=0)  # dedupe last: np.unique sorts


def hypervolume(points, senses, reference) -> float:
    """Volume dominated by the finite points and bounded by ``reference``.

    ``reference`` is in the original units: a lower bound for "max" columns and
    an upper bound for "min" ones.  Points not strictly better than it in every
    objective contribute nothing.  Exact: sort+sweep for m=2, a z-sweep over 2-D
    slices for m=3, recursive slicing (HSO) beyond that (meant for small n).
    """
    q, _, signs = _as_min(points, senses)
    r = _ref_as_min(reference, signs)
    return _hv(_prune(q, r), r)


def default_reference(points, senses, margin: float = 0.1) -> np.ndarray:
    """Reference point for :func:`hypervolume`, in original units.

    Per objective: the worst finite value (min for "max", max for "min")
    pushed further into the bad direction by ``margin`` * (max - min).  When an
    objective has zero range the push is ``margin * |value|``, or ``margin``
    if the value is 0, so every finite point strictly beats the reference.
    """
    q, finite, signs = _as_min(points, senses)
    if not np.isfinite(margin) or margin < 0:
        raise ValueError(f"expected a finite margin >= 0; got {margin!r}")
    if not finite.any():
        raise ValueError("expected at least one finite point; got none")
    qf = q[finite]
    worst, span = qf.max(axis=0), np.ptp(qf, axis=0)
    push = np.where(span > 0, span, np.where(worst != 0, np.abs(worst), 1.0))
    return (worst + margin * push) * signs


def knee(points, senses) -> int:
    """Index (into ``points``) of the knee of the Pareto front.

    Method: take the Pareto-front points, rescale each objective min-max over
    those front points to [0, 1] with 1 = best (an objective that is constant
    on the front scores 1), and return the front point with the smallest
    Euclidean distance to the ideal point (1, ..., 1).  Ties go to the lowest
    index.  Invariant to shifting or positively rescaling any objective.
    Raises ValueError when no row is finite.
    """
    q, _, _ = _as_min(points, senses)
    idx = np.flatnonzero(pareto_front(points, senses))
    if idx.size == 0:
        raise ValueError("expected at least one finite point; got none")
    f = q[idx]
    lo, span = f.min(axis=0), np.ptp(f, axis=0)
    score = np.where(span > 0, 1.0 - (f - lo) / np.where(span > 0, span, 1.0), 1.0)
    dist = np.sqrt(((1.0 - score) ** 2).sum(axis=1))
    return int(idx[np.argmin(dist)])  # argmin takes the first, i.e. lowest index


def hypervolume_history(points, senses, reference) -> np.ndarray:
    """``out[k-1]`` = hypervolume of the first k points, for k = 1..n.

    Incremental: a new point only matters if no current front point weakly
    dominates it; then the gain is its exclusive contribution, box(p) minus the
    front clipped to box(p), which is usually a tiny sub-problem.
    """
    q, _, signs = _as_min(points, senses)
    r = _ref_as_min(reference, signs)
    useful = np.isfinite(q).all(axis=1) & (q < r).all(axis=1)
    out = np.zeros(len(q))
    front = np.empty((0, q.shape[1]))
    total = 0.0
    for k in range(len(q)):
        p = q[k]
        if useful[k] and not (front <= p).all(axis=1).any():
            clipped = _prune(np.maximum(front, p), r)
            total += max(0.0, float(np.prod(r - p)) - _hv(clipped, r))
            front = np.vstack((front[~(p <= front).all(axis=1)], p))
        out[k] = total
    return out
