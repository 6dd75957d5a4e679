"""How many units each layer keeps: schedules, per-layer counts (rounding to kernel
blocks) and the global allocations (one ranking over all layers, each capped at MAX_SPARSITY)."""
from __future__ import annotations

import math

import torch

# A layer keeps at least 5% of its units (and never fewer than one): no policy may prune a
# layer to zero width. The bound is the Policy's rule; stated once, there.
from spaces.policy import MAX_SPARSITY

def cubic_schedule(final: float, steps: int) -> list[float]:
    """Target sparsity after each of `steps` steps (index 0 = before pruning = 0.0).

    Zhu & Gupta (2017): s_t = s_f + (s_i − s_f)(1 − t/n)^3 with s_i = 0; s_n = s_f exactly.
    """
    values = [final + (0.0 - final) * (1.0 - t / steps) ** 3 for t in range(steps + 1)]
    values[-1] = final
    return values


def kept_units(width: int, sparsity: float, round_to: int = 1) -> int:
    """Units a layer of `width` keeps at `sparsity`: ⌊width·(1 − s)⌋, but never fewer than one;
    with `round_to` > 1, rounded to a multiple of it (see `round_units`)."""
    return round_units(max(1, min(width, math.floor(width * (1.0 - sparsity) + 1e-6))), width, round_to)


def round_units(kept: int, width: int, round_to: int) -> int:
    """`kept` rounded to the nearest multiple of `round_to`, never below `min_kept(width)`
    (the next multiple up where rounding down would cross it) and never above `width`.

    Why: CPU and GPU kernels work on channels in blocks (oneDNN blocks fp32 channels by 8
    with AVX2 and by 16 with AVX-512; tensor cores by 8), so 45 kept channels run at the
    cost of 48 and 22 at the cost of 32. Rounding the kept width to the block size turns
    removed MACs into removed time. A layer asked to keep everything, or no wider than
    `round_to`, is not rounded."""
    if round_to <= 1 or width <= round_to or kept >= width:
        return kept
    floor = -(-min_kept(width) // round_to) * round_to
    return min(width, max(floor, round_to * round(kept / round_to)))


def min_kept(width: int) -> int:
    """The fewest units MAX_SPARSITY lets a layer keep (global pruning's per-layer cap)."""
    return max(1, min(width, math.floor(width * (1.0 - MAX_SPARSITY) + 1e-6)))


def allocate_global(scores: dict, current: dict, initial: dict, target: float) -> dict[str, int]:
    """Units to keep per layer so that the globally lowest-scoring units go, `target` of all
    units overall, no layer below `min_kept` (a capped greedy: the lowest units that are still
    allowed to go, across layers)."""
    total_kept = math.floor(sum(initial.values()) * (1.0 - target) + 1e-6)
    to_remove = max(0, sum(current.values()) - total_kept)
    values, owners = [], []
    for i, (name, s) in enumerate(scores.items()):
        removable = max(0, current[name] - min_kept(initial[name]))
        values.append(torch.sort(s, stable=True).values[:removable])
        owners.append(torch.full((removable,), i))
    keep = dict(current)
    if to_remove == 0 or not values:
        return keep
    values, owners = torch.cat(values), torch.cat(owners)
    chosen = owners[torch.sort(values, stable=True).indices[:to_remove]]
    names = list(scores)
    for i, n in zip(*torch.unique(chosen, return_counts=True)):
        keep[names[int(i)]] -= int(n)
    return keep


def global_counts(scores: dict, target: float) -> dict[str, int]:
    """Weights to zero per layer: the globally lowest `target` fraction, no layer beyond MAX_SPARSITY."""
    total = sum(s.numel() for s in scores.values())
    k = int(target * total + 1e-6)
    values, owners = [], []
    for i, s in enumerate(scores.values()):
        cap = int(MAX_SPARSITY * s.numel() + 1e-6)
        values.append(s.detach().flatten().cpu().sort(stable=True).values[:cap])
        owners.append(torch.full((cap,), i))
    counts = {n: 0 for n in scores}
    if k == 0:
        return counts
    values, owners = torch.cat(values), torch.cat(owners)
    chosen = owners[values.argsort(stable=True)[:k]]
    names = list(scores)
    for i, n in zip(*torch.unique(chosen, return_counts=True)):
        counts[names[int(i)]] = int(n)
    return counts
