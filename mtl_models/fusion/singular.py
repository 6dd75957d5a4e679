"""The merges that work in each weight matrix's singular vectors, data-free.

Applied to every 2-D tensor (a Linear's weight, an embedding); every other tensor (biases,
norms, conv kernels) is merged by task arithmetic. The coefficients scale each task vector
before it is decomposed.

  tsv      Task Singular Vectors, TSV-M (Gargiulo et al. 2025, "Task Singular Vectors:
           Reducing Task Interference in Model Merging"): keep each task's top r/T singular
           triplets (r = min(rows, cols), T tasks), stack them, replace the stacked left and
           right singular vectors by their nearest orthonormal bases (polar factor), and
           rebuild: interference between the tasks' subspaces is whitened away.
  iso_c    Isotropic merging in the common subspace, Iso-C (Marczak et al. 2025, "No Task Left
           Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"): the sum of
           the task vectors with its singular values all set to their mean (a flat spectrum).
  iso_cts  Iso-CTS: the top `common_space_fraction` of the sum's singular directions, plus
           each task's own top directions of what the common ones leave out (an equal share
           of the rest), orthonormalised together, with a flat spectrum.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from spaces.errors import PrunefuseError
from spaces.knobs import Knob

from .linear import summed
from .registry import register
from .spectral import polar_and_spectrum, polar_factor, top_triplets


def is_matrix(delta: Tensor) -> bool:
    return delta.dim() == 2


@register("tsv")
def tsv(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    first = next(iter(deltas.values()))
    if not is_matrix(first):
        return summed(deltas)
    rank = max(1, min(first.shape) // len(deltas))  # each task's share of the rank (at least 1)
    if hasattr(deltas, "remembered"):  # merge's TaskDeltas: the bases of the unscaled task vectors,
        # kept across merges (fusion.cache); lambda_t only scales task t's singular values
        del first
        for task in deltas:  # lambda * tau is not read here: its memory goes before the decompositions
            deltas[task] = deltas[task].new_empty(0)
        u, s, vh = deltas.remembered(("tsv", rank), lambda: tsv_bases(deltas.task_vectors(), rank))
        lambdas = torch.tensor([deltas.lambdas[t] for t in deltas], dtype=s.dtype, device=s.device)
        return rebuilt(u, s * lambdas.repeat_interleave(rank), vh)
    return rebuilt(*tsv_bases(deltas.values(), rank))


def rebuilt(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """u diag(s) vh, s applied to the smaller of u and vh (the embedding's u is 40x its vh)."""
    if u.numel() <= vh.numel():
        return (u * s) @ vh
    return u @ (s[:, None] * vh)


def tsv_bases(vectors: Iterable[Tensor], rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M's whitened bases: (polar(U stack), S stack, polar(Vh stack)) of each vector's top
    `rank` triplets, in the vectors' order; the merge is u diag(s) vh.

    Scaling vector t by lambda scales its singular values by |lambda| and flips its Vh rows
    where lambda < 0; polar(D Vh) = D polar(Vh) for D diagonal +-1, so the bases of the unscaled
    vectors serve every trial: u diag(lambda s) vh. Vectors are consumed one at a time (a
    generator keeps one whole task vector alive)."""
    us, ss, vhs = [], [], []
    for vector in vectors:
        u, s, vh = top_triplets(vector, rank)
        us.append(u), ss.append(s), vhs.append(vh)
        del vector, u, s, vh
    u = torch.cat(us, dim=1)
    del us  # one copy of the stack while its polar factor is computed
    return polar_factor(u), torch.cat(ss), polar_factor(torch.cat(vhs, dim=0))


@register("iso_c")
def iso_c(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    total = summed(deltas)
    if not is_matrix(total):
        return total
    polar, s = polar_and_spectrum(total)  # u diag(mean s) vh = mean(s) * polar
    return polar.mul_(s.mean())


def _split_rank(rank: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task), summing to `rank` (the per-task share is equal)."""
    per_task = round((rank - int(rank * common_fraction)) / tasks)
    if per_task * tasks > rank:  # a small matrix: rounding up would leave the common part negative
        per_task = rank // tasks
    return rank - per_task * tasks, per_task


@register("iso_cts", knobs={"common_space_fraction": Knob(0.5, 0.95)})
def iso_cts(deltas: Mapping[str, Tensor], key: str, *, common_space_fraction: float = 0.8) -> Tensor:
    if not 0.0 <= common_space_fraction <= 1.0:
        raise PrunefuseError(f"common_space_fraction={common_space_fraction} is out of range; "
                             f"expected 0 <= common_space_fraction <= 1")
    total = summed(deltas)
    if not is_matrix(total):
        return total
    common, per_task = _split_rank(min(total.shape), len(deltas), common_space_fraction)
    u_c, s_c, vh_c = top_triplets(total, common)
    del total
    us, ss, vhs = [], [], []
    for d in deltas.values():
        own = d - u_c @ (u_c.T @ d)  # what the common directions leave of this task's vector
        ut, st, vht = top_triplets(own, per_task)
        us.append(ut), ss.append(st), vhs.append(vht)
    u_all = polar_factor(torch.cat([*us, u_c], dim=1))
    vh_all = polar_factor(torch.cat([*vhs, vh_c], dim=0))
    return (u_all * torch.cat([*ss, s_c]).mean()) @ vh_all


for _method in (tsv, iso_c, iso_cts):  # LAPACK calls split across threads wait at barriers: see merge
    _method.keys_in_parallel = True
