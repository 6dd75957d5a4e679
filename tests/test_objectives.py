"""The default objectives follow the space: size is `nonzero_params` where a trial may prune
unstructured (masks keep every parameter stored, so `params` would never move)."""
from __future__ import annotations

import pytest

from search.config import SearchConfig


@pytest.mark.parametrize("mode, size", [("structured", "params"), ("unstructured", "nonzero_params"),
                                        (["structured", "unstructured"], "nonzero_params")])
def test_the_size_objective_follows_the_pruning_mode(mode, size):
    cfg = SearchConfig(name="x", space={"pruning": {"mode": mode}})
    assert cfg.objectives == [("score", "max"), (size, "min"), ("latency_ms", "min")]


def test_objectives_asked_for_and_saved_are_kept(tmp_path):
    asked = [("score", "max"), ("params", "min")]
    cfg = SearchConfig(name="x", storage=str(tmp_path), space={"pruning": {"mode": "unstructured"}}, objectives=asked)
    assert cfg.objectives == asked and cfg.replace(trials=3).objectives == asked
    (tmp_path / "x").mkdir()
    cfg.save()
    assert SearchConfig.load(str(tmp_path / "x")).objectives == asked  # a resumed search keeps its own


def test_the_console_script_leaves_the_default_to_the_config():
    from search.cli import _parser

    assert _parser().parse_args(["search"]).objectives is None
