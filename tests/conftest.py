"""Tiny real fixtures: a small multidigits suite, a trained base with experts, one Ray per module."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_SUITE = dict(train_pairs=1500, val_pairs=400, test_pairs=400)
TINY_TRAIN = dict(epochs=4, expert_epochs=1)


@pytest.fixture(scope="session")
def tiny_suite():
    from mtl_models import suites

    return suites.get("multidigits", **TINY_SUITE)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_suite, tmp_path_factory):
    import torch

    from mtl_models import artifacts

    torch.set_num_threads(1)
    return artifacts.prepare(tiny_suite, {"trunk": "mlp", "width": 64, "depth": 2},
                             artifacts.TrainSpec(**TINY_TRAIN), cache_dir=tmp_path_factory.mktemp("cache"),
                             experts=True, log=lambda *a: None)


def tiny_policy(the_suite, **changes):
    from spaces import Policy

    data = {"schema": "prunefuse.policy/1", "suite": the_suite.spec,
            "model": {"trunk": "mlp", "width": 64, "depth": 2}, "base": TINY_TRAIN,
            "pruning": {"sparsity": {"trunk.fc1": 0.5, "trunk.fc2": 0.25}},
            "finetune": {"epochs": 0.5}}
    data.update(changes)
    return Policy.from_dict(data)


def run_cli(*args, cwd=None, timeout=600, env=None):
    """The real `prunefuse` console script in a subprocess: (exit code, stdout, stderr)."""
    exe = Path(sys.executable).parent / "prunefuse"
    proc = subprocess.run([str(exe), *map(str, args)], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where torch sees CUDA and are skipped elsewhere."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none here)")
    for item in gpu_tests:
        item.add_marker(skip)
