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


# --- 2. export names the trials it could not read ---

def test_export_names_the_trials_it_could_not_read(tmp_path):
    from report_fixtures import make_experiment

    exp = make_experiment(tmp_path / "runs", 8)
    code, out, _ = run_cli("export", exp, "--knee", "-o", tmp_path / "before.yaml", cwd=tmp_path)
    assert code == 0 and "could not read" not in out
    knee = out.split("exported trial ")[1].split()[0]
    other = next(d for d in sorted(exp.glob("trial_*")) if d.name != f"trial_{knee}")
    result = (exp / f"trial_{knee}" / "result.json").read_bytes()
    (exp / f"trial_{knee}" / "result.json").write_bytes(result[: len(result) // 2])   # truncated
    (other / "params.json").write_bytes(b"\x00\x01\x02 binary")
    for how in (["--knee"], ["--max-params", "1e9"]):
        code, out, err = run_cli("export", exp, *how, "-o", tmp_path / "after.yaml", cwd=tmp_path)
        assert code == 0, err[-2000:]
        [line] = [ln for ln in out.splitlines() if "could not read" in ln]
        assert "2 trial(s)" in line and knee in line and other.name.removeprefix("trial_") in line
        assert "result.json" in line and "params.json" in line and "computed without them" in line
        assert f"exported trial {knee} " not in out
