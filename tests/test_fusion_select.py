"""Exactness of the chunked top-k selection (fusion/select.py) and of TIES merged chunk by chunk:
the same entries as the whole-tensor kthvalue trim it replaced, ties included, bit for bit."""
from __future__ import annotations

import pytest
import torch

from mtl_models.fusion import merge, select, sparse
from spaces.errors import PrunefuseError


def kthvalue_trim_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The mask of the trim as it was before chunking (commit 2789cd3): kthvalue over the whole
    tensor, entries above the k-th largest magnitude, then the first ties until k survive."""
    flat = delta.flatten()
    n = flat.numel()
    k = max(1, round(density * n))
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    magnitude = flat.abs()
    threshold = magnitude.kthvalue(n - k + 1).values
    keep = magnitude > threshold
    short = k - int(keep.sum())
    if short > 0:
        keep[(magnitude == threshold).nonzero().flatten()[:short]] = True
    return keep


def reference_ties(base, experts, lambdas, density, scale):
    """TIES from the whole-tensor trim of each tau_t, then lambda_t, a stacked election and mean."""
    out = {}
    for key, b in base.items():
        trimmed = torch.stack([(e[key] - b) * kthvalue_trim_mask(e[key] - b, density).view(b.shape) * lambdas[t]
                               for t, e in experts.items()])
        elected = trimmed.sum(0).sign()
        agree = trimmed.sign() == elected
        out[key] = b + scale * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


def tied(shape, seed: int, levels: int = 7) -> torch.Tensor:
    """Random values on a few levels: many exact ties in magnitude, both signs, some zeros."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, shape, generator=g) * 0.25).float()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks and samples far smaller than the tensors: many chunks, the sampled band in use."""
    monkeypatch.setattr(select, "CHUNK", 97)
    monkeypatch.setattr(select, "SAMPLE", 64)


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("values", ["ties", "normal"])
def test_trim_keeps_what_kthvalue_trim_keeps(small_chunks, density, values):
    for seed in range(4):
        x = tied((50, 41), seed) if values == "ties" else torch.randn(50, 41, generator=torch.Generator().manual_seed(seed))
        got = sparse.trim(x, density) != 0
        want = kthvalue_trim_mask(x, density).view_as(x) & (x != 0)
        assert torch.equal(got, want), (seed, density)
        assert int(got.sum()) == int(want.sum())


def test_ties_across_chunks_are_kept_first_come(small_chunks):
    """All 2050 entries tie: the first k in flat order survive, across chunk borders."""
    x = torch.ones(2050)
    assert torch.equal(sparse.trim(x, 0.3) != 0, torch.arange(2050) < 615)


def test_histogram_band_when_the_sample_misleads(small_chunks, monkeypatch):
    """Small values only where the strided sample looks (every 50th entry): the sampled band
    misses the k-th largest, the exact histogram names it, and the result is unchanged."""
    x = torch.rand(64 * 50) + 1.0
    x[::50] = torch.rand(64) * 1e-3
    calls = []
    histogram = select._histogram_band
    monkeypatch.setattr(select, "_histogram_band", lambda *a: calls.append(1) or histogram(*a))
    got = sparse.trim(x, 0.5) != 0
    assert calls, "the sampled band held the k-th largest; the case does not reach the fallback"
    assert torch.equal(got, kthvalue_trim_mask(x, 0.5))


def experts_of(base, seeds):
    return {f"t{s}": {k: v + tied(v.shape, s) for k, v in base.items()} for s in seeds}


@pytest.mark.parametrize("lambdas", [{"t1": 1.0, "t2": 1.0, "t3": 1.0}, {"t1": 0.5, "t2": -2.0, "t3": 0.25}])
@pytest.mark.parametrize("density", [0.1, 0.45, 1.0])
def test_streamed_ties_equals_whole_tensor_ties(small_chunks, lambdas, density):
    """Bit for bit: the coefficients are powers of two, so scaling makes no new ties."""
    base = {"emb.weight": tied((40, 33), 0), "lin.bias": tied((33,), 9)}
    experts = experts_of(base, (1, 2, 3))
    got = merge(base, experts, "ties", lambdas, density=density, scale=0.75)
    want = reference_ties(base, experts, lambdas, density, 0.75)
    for k in base:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("where,bad", [("t2", float("nan")), ("t3", float("inf")), ("base", float("-inf"))])
def test_streamed_ties_names_key_and_model_of_nan_or_inf(small_chunks, where, bad):
    base = {"emb.weight": tied((40, 33), 0), "lin.bias": tied((33,), 9)}
    experts = experts_of(base, (1, 2, 3))
    (base if where == "base" else experts[where])["emb.weight"][17, 5] = bad
    who = "base" if where == "base" else f"task '{where}'"
    for density in (0.05, 1.0):  # trimmed away or not, a bad entry never passes unnamed
        with pytest.raises(PrunefuseError, match=rf"'emb\.weight' of {who} contains nan or inf"):
            merge(base, experts, "ties", {t: 1.0 for t in experts}, density=density)


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_streamed_linear_merges_equal_stacked_ones(small_chunks, method):
    """Chunk by chunk, bit for bit what the stacked sum (mean) over task vectors gives."""
    g = torch.Generator().manual_seed(0)
    base = {"emb.weight": torch.randn(40, 33, generator=g), "lin.bias": torch.randn(33, generator=g)}
    experts = {f"t{s}": {k: v + torch.randn(v.shape, generator=g) * 10 ** torch.randn(v.shape, generator=g)
                         for k, v in base.items()} for s in range(3)}
    lambdas = {"t0": 0.3, "t1": -0.7, "t2": 1.1}
    got = merge(base, experts, method, lambdas)
    for k, b in base.items():
        stacked = torch.stack([(e[k] - b) * lambdas[t] for t, e in experts.items()])
        want = (stacked.mean(0) if method == "average" else stacked.sum(0)) + b
        assert torch.equal(got[k], want), k
