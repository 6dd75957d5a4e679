"""Polar factors and top singular triplets from the eigendecomposition of the small Gram matrix.

A full SVD of a tall matrix (the 30522 x 768 word embedding, a 3072 x 768 MLP weight) costs
several times the product A^T A (n x n, n the small side) and an n x n symmetric eigensolve:
  polar(A)          = A W diag(lambda^-1/2) W^T    (A^T A = W diag(lambda) W^T)
  singular values   = lambda^1/2
  top k triplets    = (A W_k / s_k, s_k, W_k^T)    (W_k the top k eigenvectors)
Squaring A squares its condition number, so the Gram is formed and decomposed in float64
(chunk by chunk of rows: no float64 copy of a large A exists), and its result is used only
where the eigenvalues it divides by are at least GRAM_FLOOR times the largest: the eigen
route's error is then about 1e-16 / GRAM_FLOOR = 1e-6 relative, below what a float32 SVD
itself leaves there. Below the floor (a rank-deficient stack, tasks sharing directions, a
task vector of lower rank than asked) the SVD is taken as before: there the polar factor and
the singular vectors of zero singular values are not unique, and the SVD's choice is kept.
A wide matrix is handled as its transpose (LAPACK's SVD of a 768 x 3072 matrix took 3x the time
of its 3072 x 768 transpose here).
"""
from __future__ import annotations

import torch
from torch import Tensor

GRAM_FLOOR = 1e-10
ROWS = 8192  # rows per float64 chunk: 48 MB of float64 for a 768-wide matrix


def _gram64(tall: Tensor) -> Tensor:
    """tall^T tall in float64 (n x n)."""
    n = tall.shape[1]
    g = torch.zeros(n, n, dtype=torch.float64, device=tall.device)
    for start in range(0, tall.shape[0], ROWS):
        part = tall[start:start + ROWS].double()
        g.addmm_(part.T, part)
    return g


def _times64(tall: Tensor, m: Tensor) -> Tensor:
    """tall @ m (m float64) computed in float64 row chunk by row chunk, returned in tall's dtype."""
    out = torch.empty(tall.shape[0], m.shape[1], dtype=tall.dtype, device=tall.device)
    for start in range(0, tall.shape[0], ROWS):
        out[start:start + ROWS] = tall[start:start + ROWS].double() @ m
    return out


def _conditioned(smallest: Tensor, largest: Tensor) -> bool:
    """The eigen route is exact enough: smallest >= GRAM_FLOOR * largest (False on nan or zero)."""
    return bool(largest > 0) and bool(smallest >= GRAM_FLOOR * largest)


def polar_by_svd(a: Tensor) -> Tensor:
    """U V^T of a's SVD: the route for ill-conditioned input (its choice where the factor is not unique)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def polar_and_spectrum(a: Tensor) -> tuple[Tensor, Tensor]:
    """(the orthonormal matrix nearest to `a`, a's singular values in descending order)."""
    tall = a if a.shape[0] >= a.shape[1] else a.T
    w, v = torch.linalg.eigh(_gram64(tall))  # ascending
    if not _conditioned(w[0], w[-1]):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u @ vh, s
    polar = _times64(tall, (v * w.rsqrt()) @ v.T)
    return (polar if tall is a else polar.T), w.flip(0).sqrt().to(a.dtype)


def polar_factor(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest to `a` (U V^T of its SVD): its columns (or rows) whitened."""
    return polar_and_spectrum(a)[0]


def top_triplets(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U[:, :k], S[:k], Vh[:k]) of a's SVD, singular values descending."""
    tall = a if a.shape[0] >= a.shape[1] else a.T
    if k == 0:
        return a.new_zeros(a.shape[0], 0), a.new_zeros(0), a.new_zeros(0, a.shape[1])
    w, v = torch.linalg.eigh(_gram64(tall))  # ascending
    top_w, top_v = w[-k:].flip(0), v[:, -k:].flip(1)
    if not _conditioned(top_w[-1], w[-1]):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    s = top_w.sqrt()
    left = _times64(tall, top_v / s)  # tall's left singular vectors: tall v / s
    right = top_v.T.to(a.dtype)
    if tall is a:
        return left, s.to(a.dtype), right
    return right.T, s.to(a.dtype), left.T
