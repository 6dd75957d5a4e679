"""The `synthetic` suite is the MMoE paper's generator (Ma et al., KDD 2018), option by option."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_models import suites
from spaces.errors import PrunefuseError

SMALL = dict(dim=20, train_samples=3000, val_samples=50, test_samples=50)


def make(**options):
    return suites.get("synthetic", **{**SMALL, **options})


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


def test_tasks_metadata_and_shapes():
    s = make(tasks=3)
    assert s.task_names == ["task1", "task2", "task3"]
    assert all(t.kind == "regression" and t.metric == "r2" and t.higher_is_better for t in s.tasks)
    assert s.input_shape == (20,) and s.train.x.shape == (3000, 20) and s.val.x.shape == (50, 20)
    assert all(s.train.y[t].shape == (3000,) and s.train.y[t].dtype == torch.float32 for t in s.task_names)


def test_deterministic_by_seed():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for split in ("train", "val", "test"):
        torch.testing.assert_close(a.split(split).x, b.split(split).x, rtol=0, atol=0)
        for t in a.task_names:
            torch.testing.assert_close(a.split(split).y[t], b.split(split).y[t], rtol=0, atol=0)
    assert not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.train.y["task1"], c.train.y["task1"])


def test_options_rebuild_the_same_suite():
    s = make(seed=2, correlation=0.3, label_scale=[1.0, 5.0])
    again = suites.get("synthetic", **s.options)
    torch.testing.assert_close(again.test.y["task2"], s.test.y["task2"], rtol=0, atol=0)


@pytest.mark.parametrize("p", [-0.6, 0.0, 0.5, 1.0])
def test_linear_part_matches_the_papers_construction(p):
    """Without sines and noise y_t = w_tᵀx exactly, so least squares recovers w_1, w_2:
    |w_1| = |w_2| = c (u_1, u_2 orthonormal) and w_1·w_2 = c²·p."""
    c = 1.7
    s = make(correlation=p, c=c, sines=0, noise=0.0)
    x = s.train.x.double()
    w = [torch.linalg.lstsq(x, s.train.y[t].double().unsqueeze(1)).solution.squeeze(1) for t in s.task_names]
    assert float(w[0].norm()) == pytest.approx(c, rel=1e-4)
    assert float(w[1].norm()) == pytest.approx(c, rel=1e-4)
    assert float(w[0] @ w[1]) == pytest.approx(c * c * p, abs=1e-4)


def test_more_tasks_share_u1_with_cosine_p_and_p_squared():
    p, c = -0.5, 1.0
    s = make(tasks=4, correlation=p, c=c, sines=0, noise=0.0)
    x = s.train.x.double()
    w = torch.stack([torch.linalg.lstsq(x, s.train.y[t].double().unsqueeze(1)).solution.squeeze(1)
                     for t in s.task_names])
    gram = w @ w.T
    expected = torch.full((4, 4), p * p, dtype=torch.float64)
    expected[0, :] = expected[:, 0] = p
    expected.fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected, atol=1e-4, rtol=0)


def test_label_correlation_grows_with_p():
    """noise=0: the labels are the noise-free label functions; their correlation rises with p."""
    corr = {}
    for p in (0.0, 0.5, 0.9, 1.0):
        s = make(correlation=p, noise=0.0, train_samples=6000)
        corr[p] = pearson(s.train.y["task1"], s.train.y["task2"])
    assert corr[1.0] == pytest.approx(1.0, abs=1e-6)  # w_1 = w_2: the same function
    assert abs(corr[0.0]) < 0.1                        # independent projections of x
    assert corr[0.0] < corr[0.5] < corr[0.9] < corr[1.0]
    assert corr[1.0] - corr[0.0] > 0.8


def test_label_scale_multiplies_labels_only():
    plain, scaled = make(seed=5), make(seed=5, label_scale=[1.0, 10.0])
    for split in ("train", "val", "test"):
        a, b = plain.split(split), scaled.split(split)
        torch.testing.assert_close(b.x, a.x, rtol=0, atol=0)
        torch.testing.assert_close(b.y["task1"], a.y["task1"], rtol=0, atol=0)
        torch.testing.assert_close(b.y["task2"], 10.0 * a.y["task2"], rtol=1e-6, atol=1e-6)
    assert scaled.options["label_scale"] == [1.0, 10.0]
    assert plain.options["label_scale"] == [1.0, 1.0]


@pytest.mark.parametrize("options, words", [
    (dict(correlation=1.5), "correlation"),
    (dict(correlation=-1.01), "correlation"),
    (dict(correlation=math.nan), "correlation"),
    (dict(correlation="high"), "correlation"),
    (dict(tasks=0), "tasks"),
    (dict(tasks=21), "tasks"),
    (dict(tasks=2.5), "tasks"),
    (dict(tasks=True), "tasks"),
    (dict(dim=0), "dim"),
    (dict(label_scale=[1.0]), "label_scale"),
    (dict(label_scale=10), "label_scale"),
    (dict(label_scale=[1.0, 0.0]), "label_scale[1]"),
    (dict(label_scale=[-1.0, 1.0]), "label_scale[0]"),
    (dict(label_scale=[1.0, math.inf]), "label_scale[1]"),
    (dict(label_scale=[1.0, "x"]), "label_scale[1]"),
    (dict(noise=-0.1), "noise"),
    (dict(c=0.0), "c="),
    (dict(sines=-1), "sines"),
    (dict(seed=-1), "seed"),
    (dict(train_samples=1), "train_samples"),
    (dict(unknown_option=1), "no option 'unknown_option'"),
])
def test_bad_options_raise_prunefuse_error(options, words):
    with pytest.raises(PrunefuseError, match=None) as info:
        make(**options)
    message = str(info.value)
    assert words in message and "\n" not in message
