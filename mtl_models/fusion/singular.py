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

from collections.abc import Mapping

import torch
from torch import Tensor

from spaces.errors import PrunefuseError
from spaces.knobs import Knob

from .linear import summed
from .registry import register


def is_matrix(delta: Tensor) -> bool:
    return delta.dim() == 2


def polar_factor(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to `a` (U V^T of its SVD): its columns (or rows) whitened."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def rebuild(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """u diag(s) vh with u's columns and vh's rows made orthonormal first."""
    return (polar_factor(u) * s) @ polar_factor(vh)


@register("tsv")
def tsv(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    first = next(iter(deltas.values()))
    if not is_matrix(first):
        return summed(deltas)
    rank = max(1, min(first.shape) // len(deltas))  # each task's share of the rank (at least 1)
    parts = [top_triplets(deltas, t, rank) for t in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)       # (rows, T*rank)
    s = torch.cat([p[1] for p in parts])              # (T*rank,)
    vh = torch.cat([p[2] for p in parts], dim=0)      # (T*rank, cols)
    return rebuild(u, s, vh)


def top_triplets(deltas: Mapping[str, Tensor], task: str, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top `rank` singular triplets of deltas[task]: from the cross-merge cache where `merge`
    handed its TaskDeltas (fusion.cache), else computed."""
    if hasattr(deltas, "singular"):
        return deltas.singular(task, rank)
    u, s, vh = torch.linalg.svd(deltas[task], full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def flat_spectrum(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """u diag(mean(s)) vh: every direction kept at the same strength."""
    return (u * s.mean()) @ vh


@register("iso_c")
def iso_c(deltas: Mapping[str, Tensor], key: str) -> Tensor:
    total = summed(deltas)
    if not is_matrix(total):
        return total
    return flat_spectrum(*torch.linalg.svd(total, full_matrices=False))


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
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    for d in deltas.values():
        own = d - u_c @ (u_c.T @ d)  # what the common directions leave of this task's vector
        ut, st, vht = torch.linalg.svd(own, full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vhs.append(vht[:per_task])
    u_all = polar_factor(torch.cat([*us, u_c], dim=1))
    vh_all = polar_factor(torch.cat([*vhs, vh_c], dim=0))
    return flat_spectrum(u_all, torch.cat([*ss, s_c]), vh_all)
