"""Each data-free merge equals an independent implementation on the same state dicts.

TSV-M, Iso-C and Iso-CTS against FusionBench's own functions (PyPI `fusion-bench` 0.2.33,
installed --no-deps by scripts/setup.sh): its package `__init__` needs Hydra and Lightning,
so the two function modules are loaded from their files, with the two helpers they import
from `fusion_bench.utils` (a type alias and a timing context) given as plain stand-ins.
FusionBench merges non-matrix tensors by their mean where prunefuse uses task arithmetic
(its coefficients do the scaling): those keys are compared with the sum.
Breadcrumbs and DELLA (no FusionBench version) against references written here from the
papers by another route: numpy sorting and quantile ranks instead of torch's topk / argsort.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mtl_models.fusion import merge
from mtl_models.fusion.sparse import uniforms

TASKS = ("a", "b", "c", "d")


def state_dicts(seed: int = 0):
    """A base and four experts: matrices of several shapes (tall, wide, square), a bias, a conv."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.weight": (24, 16), "enc.bias": (24,), "mid.weight": (12, 30), "out.weight": (20, 20),
              "conv.weight": (4, 3, 3, 3)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in TASKS}
    return base, experts


def task_vectors(base, experts, lam):
    return [{k: lam[t] * (e[k] - base[k]) for k in base} for t, e in experts.items()]


@pytest.fixture(scope="module")
def fusion_bench():
    """FusionBench's TSV-M and isotropic-merging function modules, or a skip where it is absent."""
    spec = importlib.util.find_spec("fusion_bench")  # finds the folder without running its __init__
    if spec is None:
        pytest.skip("fusion-bench is not installed (scripts/setup.sh installs it --no-deps)")
    root = Path(spec.origin).parent
    saved = {n: sys.modules.get(n) for n in ("fusion_bench", "fusion_bench.utils", "fusion_bench.utils.type")}
    package, utils, typing_ = (types.ModuleType(n) for n in saved)
    package.__path__, utils.__path__ = [], []
    utils.timeit_context = lambda *a, **k: contextlib.nullcontext()
    typing_.StateDictType = dict
    sys.modules.update({"fusion_bench": package, "fusion_bench.utils": utils, "fusion_bench.utils.type": typing_})
    try:
        modules = {}
        for name, rel in (("tsvm", "method/task_singular_vector/utils/TSVM_utils.py"),
                          ("iso", "method/isotropic_merging/iso_utils.py")):
            s = importlib.util.spec_from_file_location(f"_fusion_bench_{name}", root / rel)
            modules[name] = importlib.util.module_from_spec(s)
            with contextlib.redirect_stdout(None):
                s.loader.exec_module(modules[name])
        yield modules
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def compare(ours, base, reference, experts, lam):
    """Matrices equal FusionBench's; every other key is the task-arithmetic sum."""
    for k in base:
        if base[k].dim() == 2:
            assert_close(ours[k], base[k] + reference[k], atol=1e-4, rtol=1e-4)
        else:
            assert_close(ours[k], base[k] + sum(lam[t] * (e[k] - base[k]) for t, e in experts.items()))


LAMBDAS = {"a": 0.9, "b": 0.6, "c": 1.0, "d": 0.45}


def test_tsv_equals_fusion_bench(fusion_bench):
    base, experts = state_dicts()
    with contextlib.redirect_stdout(None):
        ref = fusion_bench["tsvm"].compute_and_sum_svd_mem_reduction(task_vectors(base, experts, LAMBDAS),
                                                                     accelerator="cpu")
    compare(merge(base, experts, "tsv", LAMBDAS), base, ref, experts, LAMBDAS)


def test_iso_c_equals_fusion_bench(fusion_bench):
    base, experts = state_dicts(1)
    with contextlib.redirect_stdout(None):
        ref = fusion_bench["iso"].iso_c(task_vectors(base, experts, LAMBDAS), accelerator="cpu")
    compare(merge(base, experts, "iso_c", LAMBDAS), base, ref, experts, LAMBDAS)


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_equals_fusion_bench(fusion_bench, fraction):
    base, experts = state_dicts(2)
    with contextlib.redirect_stdout(None):
        ref = fusion_bench["iso"].iso_cts(task_vectors(base, experts, LAMBDAS), common_space_fraction=fraction,
                                          accelerator="cpu")
    compare(merge(base, experts, "iso_cts", LAMBDAS, common_space_fraction=fraction), base, ref, experts, LAMBDAS)


# --- Breadcrumbs and DELLA, against references written from the papers ------------

def breadcrumbs_reference(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Sort magnitudes descending; zero the first round(gamma*n) and everything after the next round(density*n)."""
    flat = delta.ravel()
    n = flat.size
    order = np.argsort(-np.abs(flat), kind="stable")
    top = round(gamma * n)
    out = np.zeros_like(flat)
    chosen = order[top:top + max(1, round(density * n))]
    out[chosen] = flat[chosen]
    return out.reshape(delta.shape)


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.2, 0.0)])
def test_breadcrumbs_equals_reference(density, gamma):
    base, experts = state_dicts(3)
    ours = merge(base, experts, "breadcrumbs", LAMBDAS, density=density, gamma=gamma)
    for k in base:
        want = base[k].numpy() + sum(breadcrumbs_reference(LAMBDAS[t] * (e[k] - base[k]).numpy(), density, gamma)
                                     for t, e in experts.items())
        assert_close(ours[k], torch.from_numpy(want), atol=1e-5, rtol=1e-5)


def della_reference(deltas: list[np.ndarray], draws: list[np.ndarray], density, epsilon, scale) -> np.ndarray:
    """MagPrune: p_i = 1 - density + epsilon * (1/2 - q_i), q_i the magnitude quantile in [0, 1];
    keep where the draw >= p_i, rescale by 1/(1 - p_i); then elect signs by the sum and take the
    mean of the survivors agreeing with it (TIES), times scale."""
    kept = []
    for d, u in zip(deltas, draws):
        flat = np.abs(d.ravel())
        quantile = np.searchsorted(np.sort(flat), flat) / max(flat.size - 1, 1)  # distinct values: rank/(n-1)
        p = np.clip(1 - density + epsilon * (0.5 - quantile), 0.0, 0.999).reshape(d.shape)
        kept.append(np.where(u >= p, d / (1 - p), 0.0))
    kept = np.stack(kept)
    sign = np.sign(kept.sum(0))
    agree = (np.sign(kept) == sign) & (kept != 0)
    return scale * (kept * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("density,epsilon,scale", [(0.5, 0.1, 1.0), (0.3, 0.3, 0.8), (0.9, 0.4, 1.2)])
def test_della_equals_reference(density, epsilon, scale):
    base, experts = state_dicts(4)
    ours = merge(base, experts, "della", LAMBDAS, density=density, epsilon=epsilon, scale=scale, seed=7)
    for k in base:
        deltas = [(LAMBDAS[t] * (e[k] - base[k])).double().numpy() for t, e in experts.items()]
        draws = [uniforms(7, t, k, base[k].shape).double().numpy() for t in experts]
        want = base[k].double().numpy() + della_reference(deltas, draws, density, epsilon, scale)
        assert_close(ours[k].double(), torch.from_numpy(want), atol=1e-4, rtol=1e-4)
