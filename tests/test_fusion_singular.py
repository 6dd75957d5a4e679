"""The singular-vector merges' fast routes (fusion/spectral.py, the TSV-M bases in fusion/cache.py).

Polar factors and top singular triplets come from the float64 Gram's eigendecomposition where
it is well conditioned, else from the SVD as before; TSV-M keeps the whitened bases of the
unscaled task vectors across merges, so a cache hit must merge bit-identically to a cold merge
and a coefficient's sign must be applied to the bases, not read from a stale entry.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mtl_models.fusion import cache, merge, spectral
from mtl_models.fusion.singular import iso_c, tsv

SHAPES = [(40, 12), (12, 40), (24, 24)]  # tall, wide, square


@pytest.fixture
def svd_calls(monkeypatch):
    """How often torch.linalg.svd runs (the real one) while a test runs: the fallback's sign."""
    calls, real = [], torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def _rank_deficient(shape, rank, seed=0):
    """A matrix of the given rank: what a stack of tasks sharing directions looks like."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_polar_factor_equals_the_svd_one_without_an_svd(shape, svd_calls):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = spectral.polar_factor(a)
    assert svd_calls == []  # the eigen route
    assert_close(got, spectral.polar_by_svd(a), atol=1e-5, rtol=1e-5)
    polar, s = spectral.polar_and_spectrum(a)
    assert_close(s, torch.linalg.svdvals(a), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_rank_deficient_polar_factor_falls_back_to_the_svd(shape, svd_calls):
    a = _rank_deficient(shape, 5)
    got = spectral.polar_factor(a)
    assert svd_calls == [shape]  # the fallback, on the matrix as given
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    assert torch.equal(got, u @ vh)  # the SVD's own choice where the factor is not unique
    # a stack of tasks sharing a direction: two equal columns
    b = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    b[:, 7] = b[:, 0]
    assert torch.equal(spectral.polar_factor(b), spectral.polar_by_svd(b))


@pytest.mark.parametrize("shape", SHAPES)
def test_top_triplets_equal_the_svd_ones(shape, svd_calls):
    a = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    k = min(shape) // 3
    u, s, vh = spectral.top_triplets(a, k)
    assert svd_calls == []
    ur, sr, vhr = torch.linalg.svd(a, full_matrices=False)
    assert_close(s, sr[:k], atol=1e-5, rtol=1e-5)
    assert_close(u @ u.T, ur[:, :k] @ ur[:, :k].T, atol=1e-5, rtol=1e-5)  # the same subspaces
    assert_close(vh.T @ vh, vhr[:k].T @ vhr[:k], atol=1e-5, rtol=1e-5)
    assert_close((u * s) @ vh, (ur[:, :k] * sr[:k]) @ vhr[:k], atol=1e-5, rtol=1e-5)  # paired as triplets
    # more triplets than the matrix has rank: the SVD's, sliced
    low = _rank_deficient(shape, 2)
    got = spectral.top_triplets(low, 3)
    want = torch.linalg.svd(low, full_matrices=False)
    assert all(torch.equal(g, w) for g, w in zip(got, (want[0][:, :3], want[1][:3], want[2][:3])))


def test_iso_c_of_a_rank_deficient_sum_is_the_svd_one(svd_calls):
    shared = _rank_deficient((20, 16), 3)
    deltas = {"a": shared, "b": 0.5 * shared}
    got = iso_c(deltas, "w")
    assert len(svd_calls) == 1
    u, s, vh = torch.linalg.svd(1.5 * shared, full_matrices=False)
    assert_close(got, (u * s.mean()) @ vh, atol=1e-6, rtol=1e-6)


def _experts(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(30, 18, generator=g), "v": torch.randn(10, 26, generator=g),
            "b": torch.randn(5, generator=g)}
    experts = {t: {k: x + 0.3 * torch.randn(x.shape, generator=g) for k, x in base.items()} for t in "xyz"}
    return base, experts


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_tsv_cache_hit_merges_bit_identically_to_a_cold_merge():
    """apply merges cold in a new process; the search's trial merged warm after other trials."""
    base, experts = _experts()
    lam = {"x": 0.4, "y": 0.9, "z": 0.6}
    cache.clear()
    cold = merge(base, experts, "tsv", lam)
    assert _same(merge(base, experts, "tsv", lam), cold)
    cache.clear()
    merge(base, experts, "tsv", {"x": 1.2, "y": 0.1, "z": 0.3})  # an earlier trial filled the cache
    entries = len(cache._ENTRIES)
    warm = merge(base, experts, "tsv", lam)
    assert len(cache._ENTRIES) == entries  # served from the cache
    assert _same(warm, cold)


def test_tsv_sign_flip_is_not_served_a_stale_entry():
    base, experts = _experts(1)
    positive = {"x": 0.5, "y": 0.8, "z": 0.7}
    flipped = {**positive, "y": -0.8}
    cache.clear()
    first = merge(base, experts, "tsv", positive)
    entries = len(cache._ENTRIES)
    got = merge(base, experts, "tsv", flipped)
    assert len(cache._ENTRIES) == entries  # the same entry, signs applied to it
    for k in ("w", "v"):  # the plain-dict merge decomposes lambda * tau itself
        want = base[k] + tsv({t: flipped[t] * (e[k] - base[k]) for t, e in experts.items()}, k)
        assert_close(got[k], want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[k], first[k], atol=1e-3)
    cache.clear()
    assert _same(merge(base, experts, "tsv", flipped), got)


def test_tsv_coefficients_in_another_order_than_the_experts():
    """TaskDeltas iterate in the coefficients' order: bases, fingerprints and lambdas must agree."""
    base, experts = _experts(2)
    lam = {"x": 0.2, "y": -0.6, "z": 1.1}
    cache.clear()
    want = merge(base, experts, "tsv", lam)
    got = merge(base, experts, "tsv", dict(reversed(lam.items())))
    for k in want:
        assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_singular_merges_decompose_single_threaded_at_any_thread_count(method, monkeypatch):
    """LAPACK calls split across threads wait at a barrier per step (TSV-M: 824 CPU s at 2 threads on
    the shared cores, 110 s at 1): merge runs them single-threaded, keys side by side, and the
    result is the same bit for bit as at one thread."""
    base, experts = _experts(3)
    lam = {"x": 0.7, "y": 0.3, "z": -0.4}
    threads, seen, real = torch.get_num_threads(), [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    try:
        torch.set_num_threads(1)
        cache.clear()
        one = merge(base, experts, method, lam)
        torch.set_num_threads(2)
        cache.clear()
        two = merge(base, experts, method, lam)
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}
    assert _same(one, two)
