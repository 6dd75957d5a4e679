"""Property tests for reports.pareto against brute-force references."""
import itertools

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from reports.pareto import (default_reference, hypervolume, hypervolume_history, knee,
                            non_dominated_sort, pareto_front)

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def problems(draw, m_min=1, m_max=4, n_max=20, lo=0, hi=4):
    """Small integer point sets (lots of ties) with random senses."""
    m = draw(st.integers(m_min, m_max))
    n = draw(st.integers(0, n_max))
    pts = draw(st.lists(st.lists(st.integers(lo, hi), min_size=m, max_size=m),
                        min_size=n, max_size=n))
    senses = draw(st.lists(st.sampled_from(["max", "min"]), min_size=m, max_size=m))
    return np.asarray(pts, dtype=float).reshape(n, m), senses


def dominates(a, b, senses):
    better = [x > y if s == "max" else x < y for x, y, s in zip(a, b, senses)]
    worse = [x < y if s == "max" else x > y for x, y, s in zip(a, b, senses)]
    return any(better) and not any(worse)


def brute_front(pts, senses):
    finite = [bool(np.isfinite(p).all()) for p in pts]
    return np.array([finite[i] and not any(finite[j] and dominates(pts[j], pts[i], senses)
                                           for j in range(len(pts)))
                     for i in range(len(pts))], dtype=bool)


def brute_hv(pts, senses, ref):
    """Count unit cells of the integer grid dominated by some point (integer inputs)."""
    pts = [p for p in pts if np.isfinite(p).all()]
    axes = [range(-1, 6)] * len(senses)  # covers refs and points used below
    count = 0
    for cell in itertools.product(*axes):
        inside = all(c >= r if s == "max" else c + 1 <= r for c, r, s in zip(cell, ref, senses))
        if inside and any(all(p_ >= c + 1 if s == "max" else p_ <= c
                              for p_, c, s in zip(p, cell, senses)) for p in pts):
            count += 1
    return float(count)


def int_reference(draw, senses):
    return [draw(st.integers(-1, 0)) if s == "max" else draw(st.integers(4, 5)) for s in senses]


@SETTINGS
@given(problems())
def test_front_matches_brute_force(prob):
    pts, senses = prob
    assert np.array_equal(pareto_front(pts, senses), brute_front(pts, senses))


@SETTINGS
@given(problems(m_max=3), st.data())
def test_flipping_a_max_column_keeps_mask(prob, data):
    pts, senses = prob
    assume(len(pts) and "max" in senses)
    j = data.draw(st.sampled_from([i for i, s in enumerate(senses) if s == "max"]))
    flipped, fs = pts.copy(), list(senses)
    flipped[:, j], fs[j] = -flipped[:, j], "min"
    assert np.array_equal(pareto_front(pts, senses), pareto_front(flipped, fs))


@SETTINGS
@given(problems(n_max=25))
def test_sort_peels_fronts(prob):
    pts, senses = prob
    ranks = non_dominated_sort(pts, senses)
    assert np.array_equal(ranks == 0, pareto_front(pts, senses))
    rest = ranks > 0
    if rest.any():
        assert np.array_equal(pareto_front(pts[rest], senses), ranks[rest] == 1)
        assert np.array_equal(non_dominated_sort(pts[rest], senses), ranks[rest] - 1)


@SETTINGS
@given(problems(m_min=2, m_max=3, n_max=8), st.data())
def test_hypervolume_matches_grid_count(prob, data):
    pts, senses = prob
    ref = int_reference(data.draw, senses)
    assert hypervolume(pts, senses, ref) == pytest.approx(brute_hv(pts, senses, ref))


@settings(max_examples=40, deadline=None)
@given(problems(m_min=4, m_max=4, n_max=6, lo=0, hi=3), st.data())
def test_hypervolume_4d_matches_grid_count(prob, data):
    pts, senses = prob
    ref = int_reference(data.draw, senses)
    assert hypervolume(pts, senses, ref) == pytest.approx(brute_hv(pts, senses, ref))


@SETTINGS
@given(problems(m_max=4, n_max=10), st.data())
def test_hypervolume_monotone_and_dominated_adds_nothing(prob, data):
    pts, senses = prob
    ref = int_reference(data.draw, senses)
    base = hypervolume(pts, senses, ref)
    m = len(senses)
    new = np.array(data.draw(st.lists(st.integers(0, 4), min_size=m, max_size=m)), float)
    assert hypervolume(np.vstack([pts, new]), senses, ref) >= base - 1e-9
    if len(pts):
        # Worsen a random existing point in every objective: it is dominated.
        worse = pts[data.draw(st.integers(0, len(pts) - 1))] + np.where(
            np.array(senses) == "max", -1.0, 1.0)
        assert hypervolume(np.vstack([pts, worse]), senses, ref) == pytest.approx(base)


@SETTINGS
@given(problems(m_max=4, n_max=15))
def test_knee_is_on_front(prob):
    pts, senses = prob
    assume(len(pts))
    assert pareto_front(pts, senses)[knee(pts, senses)]


def test_knee_symmetric_convex_front_picks_middle():
    t = np.linspace(0, np.pi / 2, 7)
    pts = np.column_stack([np.cos(t), np.sin(t)])  # quarter circle, maximise both
    assert knee(pts, ["max", "max"]) == 3
    assert knee(1 - pts, ["min", "min"]) == 3


@SETTINGS
@given(problems(m_min=2, m_max=3, n_max=15), st.data())
def test_knee_invariant_to_affine_rescaling(prob, data):
    pts, senses = prob
    assume(len(pts))
    j = data.draw(st.integers(0, len(senses) - 1))
    scale = data.draw(st.sampled_from([0.25, 0.5, 2.0, 8.0, -0.5, -4.0]))  # exact in binary
    shift = data.draw(st.integers(-100, 100))
    moved, ms = pts.copy(), list(senses)
    moved[:, j] = scale * moved[:, j] + shift
    if scale < 0:  # a negative scale reverses the objective's direction
        ms[j] = "min" if ms[j] == "max" else "max"
    assert knee(moved, ms) == knee(pts, senses)


def test_knee_single_point_and_no_finite_points():
    pts = np.array([[np.nan, 1.0], [2.0, 3.0], [np.inf, 0.0]])
    assert knee(pts, ["max", "min"]) == 1
    with pytest.raises(ValueError):
        knee([[np.nan, 1.0]], ["max", "min"])
    with pytest.raises(ValueError):
        knee(np.empty((0, 2)), ["max", "min"])


@SETTINGS
@given(problems(m_max=3, n_max=10), st.data())
def test_nonfinite_rows_excluded(prob, data):
    pts, senses = prob
    m = len(senses)
    bad = np.full((2, m), 0.0)
    bad[0, data.draw(st.integers(0, m - 1))] = np.nan
    bad[1, data.draw(st.integers(0, m - 1))] = data.draw(st.sampled_from([np.inf, -np.inf]))
    allp = np.vstack([pts, bad])
    mask = pareto_front(allp, senses)
    assert not mask[-2:].any() and np.array_equal(mask[:-2], pareto_front(pts, senses))
    assert (non_dominated_sort(allp, senses)[-2:] == -1).all()
    ref = int_reference(data.draw, senses)
    assert hypervolume(allp, senses, ref) == hypervolume(pts, senses, ref)
    assert np.allclose(hypervolume_history(allp, senses, ref)[-1], hypervolume(pts, senses, ref))


@pytest.mark.parametrize("points, senses, ref", [
    ([[1, 2]], ["max", "up"], [0, 0]),          # unknown sense
    ([[1, 2]], ["max"], [0, 0]),                # too few senses
    ([[1, 2]], "max", [0, 0]),                  # a string is not a sequence of senses
    ([1, 2], ["max", "min"], [0, 0]),           # 1-D points
    ([[[1, 2]]], ["max", "min"], [0, 0]),       # 3-D points
    ([[1, 2]], ["max", "min"], [0, 0, 0]),      # reference length
])
def test_bad_input_raises(points, senses, ref):
    for fn in (hypervolume, hypervolume_history):
        with pytest.raises(ValueError, match="got"):
            fn(points, senses, ref)
    if len(ref) == 2:
        for fn in (pareto_front, non_dominated_sort, knee, default_reference):
            with pytest.raises(ValueError, match="got"):
                fn(points, senses)


def test_empty_input():
    assert pareto_front(np.empty((0, 3)), ["max", "min", "min"]).shape == (0,)
    assert pareto_front([], ["max"]).shape == (0,)
    assert non_dominated_sort(np.empty((0, 2)), ["max", "min"]).shape == (0,)
    assert hypervolume(np.empty((0, 2)), ["max", "min"], [0, 1]) == 0.0
    assert hypervolume_history(np.empty((0, 2)), ["max", "min"], [0, 1]).shape == (0,)


@SETTINGS
@given(problems(m_max=4, n_max=12), st.data())
def test_history_matches_prefix_volumes(prob, data):
    pts, senses = prob
    ref = int_reference(data.draw, senses)
    hist = hypervolume_history(pts, senses, ref)
    assert hist.shape == (len(pts),)
    assert (np.diff(hist) >= 0).all()
    expected = [hypervolume(pts[:k + 1], senses, ref) for k in range(len(pts))]
    assert np.allclose(hist, expected)


@SETTINGS
@given(problems(m_max=3, n_max=10))
def test_default_reference_is_beaten_by_every_point(prob):
    pts, senses = prob
    assume(len(pts))
    ref = default_reference(pts, senses)
    sign = np.where(np.array(senses) == "max", 1.0, -1.0)
    assert ((pts - ref) * sign > 0).all()
    assert hypervolume(pts, senses, ref) > 0


def test_default_reference_values():
    pts = [[0.9, 100.0, 5.0], [0.5, 300.0, 5.0]]
    ref = default_reference(pts, ["max", "min", "min"], margin=0.1)
    assert np.allclose(ref, [0.46, 320.0, 5.5])
    assert np.allclose(default_reference([[0.0]], ["min"]), [0.1])


def _speed_points(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    v = np.abs(rng.normal(size=(n, 3)))
    sphere = v / np.linalg.norm(v, axis=1, keepdims=True)  # every point on the front
    return rng.random((n, 3)), sphere


@pytest.mark.parametrize("which", [0, 1], ids=["uniform", "all-on-front"])
def test_large_front_history_matches_direct_hypervolume(which):
    # Speed on n=1000 is measured in benchmarks/report.py, not asserted here.
    pts = _speed_points()[which]
    senses = ["min", "min", "min"]
    ref = default_reference(pts, senses)
    hist = hypervolume_history(pts, senses, ref)
    assert hist[-1] == pytest.approx(hypervolume(pts, senses, ref))
    mask = pareto_front(pts, senses)
    if which == 1:
        assert mask.all()  # points on a sphere's positive octant: none dominates another
    else:
        # brute force: a row is dominated if some row is <= everywhere and < somewhere
        le = (pts[None, :, :] <= pts[:, None, :]).all(axis=2)
        lt = (pts[None, :, :] < pts[:, None, :]).any(axis=2)
        assert (mask == ~(le & lt).any(axis=1)).all()
