"""The merges that sparsify each task vector before combining: TIES, DARE, Model
Breadcrumbs and DELLA (mergekit's family of "generalised task arithmetic" methods).

  ties         TIES-Merging (Yadav et al. 2023): trim each vector to its top-`density`
               entries by magnitude (per tensor), elect a sign per entry from the sum,
               average only the entries agreeing with it (disjoint mean), times `scale`.
  dare_linear  DARE (Yu et al. 2024, "Language Models are Super Mario"): drop each entry
  dare_ties    with probability `drop_rate`, rescale survivors by 1/(1 - drop_rate), then
               combine by task arithmetic or by TIES's election.
  breadcrumbs  Model Breadcrumbs (Davari & Belilovsky 2024): per tensor, drop the largest
               `gamma` fraction of entries (outliers) and keep the next `density` fraction;
               the rest is zero; combined by task arithmetic.
  della        DELLA-Merging (Deep et al. 2024, MagPrune): drop each entry with a probability
               that falls linearly with its magnitude rank, from 1 - density + epsilon/2 (the
               smallest) to 1 - density - epsilon/2 (the largest), clipped to [0, 1); rescale
               survivors by 1/(1 - p); then TIES's election and disjoint mean, times `scale`.

Random masks come from a generator seeded per (seed, task, key): one seed reproduces a
merge, and tasks and keys never share a mask.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

from spaces.errors import PrunefuseError
from spaces.knobs import Knob

from . import select
from .linear import summed
from .merge import KeyInputs
from .registry import register

_TIES_KNOBS = {"density": Knob(0.05, 1.0), "scale": Knob(0.3, 1.5)}
_DARE_KNOBS = {"drop_rate": Knob(0.0, 0.95)}


def _check_fraction(name: str, value: float, *, low_open: bool = True, high_open: bool = False) -> None:
    low_ok = value > 0.0 if low_open else value >= 0.0
    high_ok = value < 1.0 if high_open else value <= 1.0
    if not (low_ok and high_ok):
        raise PrunefuseError(f"{name}={value} is out of range; expected {0} {'<' if low_open else '<='} {name} "
                             f"{'<' if high_open else '<='} 1")


def _top_count(fraction: float, n: int) -> int:
    # round, not ceil: 0.3 * 10 is 3.0000000000000004
    return round(fraction * n)


def trim(delta: Tensor, density: float, *, in_place: bool = False) -> Tensor:
    """Keep the top-`density` fraction of entries by magnitude, exactly k = round(density * n)
    of them (at least one); among entries equal to the k-th largest magnitude the first ones
    are kept until k survive (`select.top_cut`: a sampled band, no sort, no whole-tensor kthvalue).
    in_place: zero `delta`'s own entries (a temporary the caller owns)."""
    _check_fraction("density", density)
    flat = delta.flatten()
    n = flat.numel()
    k = max(1, _top_count(density, n))
    if k >= n:
        return delta
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    flat = flat.contiguous()
    cut = select.top_cut(select.whole(flat), n, k, select.magnitude_bits(select.strided_sample(flat)))
    keep = cut.keep(select.magnitude_bits(flat), 0)
    return delta.mul_(keep.view_as(delta)) if in_place else (delta.flatten() * keep).view_as(delta)


def elect_and_average(deltas: list[Tensor], scale: float) -> Tensor:
    """TIES's second half: a sign per entry from the sum, the mean of the agreeing entries.
    Accumulated task by task: no (tasks, *shape) stack beside the vectors."""
    elected = torch.zeros_like(deltas[0])
    for d in deltas:
        elected += d
    elected.sign_()
    total = torch.zeros_like(elected)
    count = torch.zeros(elected.shape, dtype=torch.uint8 if len(deltas) < 256 else torch.int32, device=elected.device)
    for d in deltas:
        agree = d.sign() == elected  # zeros have sign 0 and so never agree with +-1
        total += d * agree
        count += agree
    return total.mul_(scale).div_(count.clamp_(min=1))  # entries nobody keeps stay 0, not 0/0


def stream_seed(seed: int, task: str, key: str) -> int:
    """A stable 63-bit seed per (seed, task, key); Python's hash() is salted per process."""
    digest = hashlib.blake2b(f"{seed}\0{task}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def int_seed(seed) -> int:
    """An int seed; a whole float (3.0), as hand-written YAML or JSON may give, counts."""
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrunefuseError(f"seed must be an int, got {seed!r}")
    return seed


def uniforms(seed, task: str, key: str, shape) -> Tensor:
    """The uniform draws deciding which entries of (task, key) a random mask keeps."""
    gen = torch.Generator().manual_seed(stream_seed(int_seed(seed), task, key))
    return torch.rand(shape, generator=gen)


def dare(deltas: Mapping[str, Tensor], key: str, drop_rate: float, seed: int) -> list[Tensor]:
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    out = []
    for task, d in deltas.items():
        keep = uniforms(seed, task, key, d.shape) >= drop_rate  # P(keep) = 1 - drop_rate
        out.append(d * keep.to(d.device) / (1.0 - drop_rate))  # rescale keeps E[delta]
    return out


def magnitude_ranks(delta: Tensor) -> Tensor:
    """Each entry's rank by |delta|, 0 for the smallest, as float, in delta's shape."""
    flat = delta.flatten()
    ranks = torch.empty_like(flat)
    ranks[flat.abs().argsort()] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
    return ranks.view_as(delta)


def magprune(delta: Tensor, *, density: float, epsilon: float, draws: Tensor) -> Tensor:
    """DELLA's MagPrune of one task vector: rank-dependent drop, survivors rescaled."""
    n = delta.numel()
    spread = magnitude_ranks(delta) / max(n - 1, 1) - 0.5  # -0.5 (smallest) .. 0.5 (largest)
    p = (1.0 - density - epsilon * spread).clamp(0.0, 0.999)  # 0.999: a survivor is at most 1000x
    keep = draws.to(delta.device) >= p
    return delta * keep / (1.0 - p)


# --- methods ------------------------------------------------------------------

@register("ties", knobs=_TIES_KNOBS)
def ties(deltas: Mapping[str, Tensor], key: str, *, density: float = 0.2, scale: float = 1.0) -> Tensor:
    """On task vectors already scaled (plain dicts); `merge` runs `ties_streamed`."""
    return elect_and_average([trim(d, density) for d in deltas.values()], scale)


def ties_streamed(key: KeyInputs, *, density: float = 0.2, scale: float = 1.0) -> Tensor:
    """TIES as `merge` runs it: chunk by chunk, never a whole task vector. Each tau_t is trimmed
    before lambda_t scales it (as in the TIES paper: the top entries of |lambda tau| are those of
    |tau|, up to ties rounding makes), so a trial's coefficients change no selection."""
    _check_fraction("density", density)
    n = key.base.numel()
    k = max(1, _top_count(density, n))
    cuts = {t: key.top_cut(t, k) for t in key.experts} if k < n else {}
    out = torch.empty(n, dtype=key.base.dtype, device=key.base.device)
    for start, theta0, taus in key.chunks():
        trimmed = []
        for t, tau in taus.items():
            if t in cuts:
                keep = cuts[t].keep(select.magnitude_bits(tau), start)
                trimmed.append(tau.mul_(key.lambdas[t]).mul_(keep))
            else:
                trimmed.append(tau.mul_(key.lambdas[t]))
        out[start:start + theta0.numel()] = elect_and_average(trimmed, scale).add_(theta0)
    return out.view(key.base.shape)


ties.streamed = ties_streamed


@register("dare_linear", knobs=_DARE_KNOBS, needs=("seed",))
def dare_linear(deltas: Mapping[str, Tensor], key: str, *, drop_rate: float = 0.5, seed: int = 0) -> Tensor:
    return torch.stack(dare(deltas, key, drop_rate, seed)).sum(dim=0)


@register("dare_ties", knobs={**_DARE_KNOBS, **_TIES_KNOBS}, needs=("seed",))
def dare_ties(deltas: Mapping[str, Tensor], key: str, *, drop_rate: float = 0.5, density: float = 0.2,
              scale: float = 1.0, seed: int = 0) -> Tensor:
    return elect_and_average([trim(d, density, in_place=True) for d in dare(deltas, key, drop_rate, seed)], scale)


def crumbs(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs' mask of one task vector: without its top-`gamma` outliers, the next `density`."""
    _check_fraction("density", density)
    _check_fraction("gamma", gamma, low_open=False, high_open=True)
    flat = delta.flatten()
    n = flat.numel()
    top = min(_top_count(gamma, n), n - 1)  # at least one entry survives
    k = min(max(1, _top_count(density, n)), n - top)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(top + k).indices[top:]] = True  # topk is sorted: the first `top` are the outliers
    return (flat * keep).view_as(delta)


@register("breadcrumbs", knobs={"density": Knob(0.05, 1.0), "gamma": Knob(0.0, 0.2)})
def breadcrumbs(deltas: Mapping[str, Tensor], key: str, *, density: float = 0.9, gamma: float = 0.01) -> Tensor:
    return summed({t: crumbs(d, density, gamma) for t, d in deltas.items()})


@register("della", knobs={"density": Knob(0.1, 1.0), "epsilon": Knob(0.0, 0.4), "scale": Knob(0.3, 1.5)},
          needs=("seed",))
def della(deltas: Mapping[str, Tensor], key: str, *, density: float = 0.5, epsilon: float = 0.1,
          scale: float = 1.0, seed: int = 0) -> Tensor:
    _check_fraction("density", density)
    _check_fraction("epsilon", epsilon, low_open=False)
    pruned = [magprune(d, density=density, epsilon=epsilon, draws=uniforms(seed, t, key, d.shape))
              for t, d in deltas.items()]
    return elect_and_average(pruned, scale)
