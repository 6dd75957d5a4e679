"""Reliability, round two (issue #25): noise-free refusals, damaged trials named by export,
a full disk during the run, trial folders after a killed driver, apply's tolerance."""
from __future__ import annotations

import json
import pickle

import pytest

from conftest import run_cli

SYNTH = ["--suite", "synthetic", "--suite-option", "train_samples=200", "--suite-option", "val_samples=50",
         "--suite-option", "test_samples=50", "--model-option", "width=16", "--model-option", "depth=1"]


def one_line(code, err, *words) -> str:
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunefuse: error:"), err[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# --- 5. no noise before a one-line error ---

def _raw_pickle(path, protocol=5):
    """What `pickle.dump` (or a hostile file) writes: a protocol torch's weights-only unpickler warns about."""
    with open(path, "wb") as f:
        pickle.dump({"trunk.fc1.weight": [[0.0]]}, f, protocol=protocol)


def test_a_raw_pickle_checkpoint_is_one_line_and_nothing_else(tmp_path):
    _raw_pickle(tmp_path / "raw.pt")
    code, _, err = run_cli("search", *SYNTH, "--storage", tmp_path / "runs", "--base-checkpoint", tmp_path / "raw.pt",
                           cwd=tmp_path)
    one_line(code, err, "raw.pt")
    assert "UserWarning" not in err and not (tmp_path / "runs").exists()


def test_a_poisoned_cache_entry_is_one_line_and_nothing_else(tmp_path):
    from mtl_models import artifacts, suites
    from spaces import Policy

    suite = suites.get("synthetic", dim=8, train_samples=200, val_samples=50, test_samples=50)
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": suite.spec,
                               "model": {"trunk": "mlp", "width": 16, "depth": 1},
                               "base": {"epochs": 1, "expert_epochs": 0}, "finetune": {"epochs": 0}})
    policy.to_yaml(tmp_path / "p.yaml")
    spec = artifacts.TrainSpec(**{k: v for k, v in policy.base.model_dump().items() if k != "checkpoint"})
    entry = tmp_path / "cache" / artifacts.cache_key(suite.spec, policy.model, spec, "trained")
    entry.mkdir(parents=True)
    _raw_pickle(entry / "base.pt", protocol=4)
    (entry / "meta.json").write_text(json.dumps({"dense_metrics": {}}))
    code, _, err = run_cli("apply", tmp_path / "p.yaml", "-o", tmp_path / "model", "--cache", tmp_path / "cache",
                           cwd=tmp_path)
    one_line(code, err, "cached artifact", "base.pt", "delete its folder")
    assert "UserWarning" not in err and not (tmp_path / "model").exists()
