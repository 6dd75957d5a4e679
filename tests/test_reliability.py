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
    user_files = ("checkpoint", "checkpoint_sha256", "experts")  # what apply reads, not how the base trains
    spec = artifacts.TrainSpec(**{k: v for k, v in policy.base.model_dump().items() if k not in user_files})
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


# --- 1. apply's tolerance is in each metric's own sense and scale ---

def test_mismatch_judges_each_metric_in_points_of_its_own_score():
    """A normals error in degrees 0.04° off (0.27 % of the dense base's 16°) is the same model;
    the same 0.04 on an accuracy of 0.9 (4.8 %) is not; lower-is-better counts like higher."""
    from mtl_models.apply import mismatch

    scales = {"metric/normals": (16.0, "min"), "metric/semantic": (0.26, "max"), "test/normals": (16.2, "min"),
              "metric/digit": (0.9, "max")}
    trial = {"params": 10, "metric/normals": 16.0875, "metric/semantic": 0.2576, "test/normals": 16.30}
    rebuilt = {"params": 10, "metric/normals": 16.1309, "metric/semantic": 0.2575, "test/normals": 16.27}
    assert mismatch(rebuilt, trial, scales=scales) is None
    far = {**rebuilt, "metric/normals": 16.2}                      # 0.70 % of 16°: beyond 0.5 points
    assert "metric/normals 16.2000 rebuilt" in mismatch(far, trial, scales=scales)
    assert "0.70 points" in mismatch(far, trial, scales=scales)
    accuracy = {"params": 10, "metric/digit": 0.9000}
    problem = mismatch({"params": 10, "metric/digit": 0.9434}, accuracy, scales=scales)
    assert problem is not None and "4.82 points" in problem
    # no reference known: the trial's own value is the scale (0.04 of 16 is 0.27 %)
    assert mismatch({"metric/normals": 16.1309}, {"metric/normals": 16.0875}) is None


# --- 7. a kept trial's result.json agrees with its final.json after a resume ---

def test_resume_completes_the_result_logs_a_killed_driver_left(tmp_path):
    from reports.experiment import load_trial
    from search.experiment import complete_result_logs

    step = {"step": 1, "score": -3.0, "final": False}
    final = {"step": 2, "score": -1.0, "params": 10, "final": True, "config": {"policy": {"x": 1}}}
    logs = {"empty": b"", "torn": (json.dumps(step) + "\n" + json.dumps(final)[:20]).encode(),
            "done": (json.dumps(step) + "\n" + json.dumps(final) + "\n").encode(),
            "damaged": b"{not json\n" + json.dumps(step).encode() + b"\n", "absent": None}
    for name, content in logs.items():
        d = tmp_path / f"trial_{name}"
        d.mkdir()
        (d / "final.json").write_text(json.dumps(final))
        if content is not None:
            (d / "result.json").write_bytes(content)
    running = tmp_path / "trial_running"
    running.mkdir()
    (running / "result.json").write_text(json.dumps(step) + "\n")          # no final.json: not a kept trial
    untouched = {n: (tmp_path / f"trial_{n}" / "result.json").read_bytes() for n in ("done", "damaged", "running")}
    said = []
    assert complete_result_logs(tmp_path, log=said.append) == 3 and "3 kept trial(s)" in said[0]
    for name in ("empty", "torn", "absent"):
        rows = [json.loads(ln) for ln in (tmp_path / f"trial_{name}" / "result.json").read_text().splitlines()]
        assert rows[-1] == final and rows[:-1] == ([step] if name == "torn" else [])
        assert load_trial(tmp_path / f"trial_{name}", search_over=True)["status"] == "finished"
    assert {n: (tmp_path / f"trial_{n}" / "result.json").read_bytes() for n in untouched} == untouched
    assert complete_result_logs(tmp_path, log=said.append) == 0          # a second resume changes nothing


# --- 6. a disk that fills during the run, after the 16 MiB check ---

@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: room for the 16 MiB check, and a disk a test can fill."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no small filesystem to fill here (mount -t tmpfs: {done.stderr.strip() or done.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk, leave: int = 0) -> None:
    """Write into `disk` until only `leave` bytes are free (0: until it refuses, ENOSPC)."""
    import errno

    with open(disk / "filler", "wb", buffering=0) as f:
        if leave:
            f.write(b"\0" * (_left(disk) - leave))
            return
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    assert _left(disk) == 0


def _left(disk) -> int:
    import os

    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def _apply_filling_the_disk(tmp_path, disk, policy_file, output, cache, *, leave: int = 0):
    """`prunefuse apply`, frozen once its checks passed (it says what it does with the dense
    base), the disk filled, then let go: (exit code, stdout, stderr)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "prunefuse"
    proc = subprocess.Popen([str(exe), "apply", str(policy_file), "-o", str(output), "--cache", str(cache)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = []
    for line in proc.stdout:
        out.append(line)
        if "dense base" in line:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                _fill(disk, leave)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(out) + rest, err


def _synthetic_policy(tmp_path, width: int = 64):
    from mtl_models import suites
    from spaces import Policy

    suite = suites.get("synthetic", dim=8, train_samples=300, val_samples=50, test_samples=50)
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": suite.spec,
                               "model": {"trunk": "mlp", "width": width, "depth": 2},
                               "base": {"epochs": 3, "expert_epochs": 0},
                               "pruning": {"sparsity": {"trunk.fc1": 0.5}}, "finetune": {"epochs": 0.5}})
    policy.to_yaml(tmp_path / "p.yaml")
    return tmp_path / "p.yaml"


def test_a_disk_filling_while_the_base_is_cached_leaves_no_half_file(tmp_path, small_disk):
    policy = _synthetic_policy(tmp_path)
    code, out, err = _apply_filling_the_disk(tmp_path, small_disk, policy, tmp_path / "model", small_disk / "cache")
    assert "training the dense base model" in out
    line = one_line(code, err, "no space left on the device", "base.pt")
    assert "UserWarning" not in err and "Traceback" not in err, line
    cached = [p.name for p in (small_disk / "cache").rglob("*") if p.is_file()]
    assert cached == [], cached                  # no base.pt, no temporary half of one
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_disk_filling_while_a_model_is_saved_keeps_the_earlier_model(tmp_path, small_disk):
    """17 MiB left after the checks (the save's own check passes) and a model of 2 × 19 MB
    (model.pt, model.onnx): the disk fills in the middle of the save."""
    import hashlib

    policy, output = _synthetic_policy(tmp_path, width=3072), small_disk / "model"
    code, _, err = run_cli("apply", policy, "-o", output, "--cache", tmp_path / "cache", cwd=tmp_path)
    assert code == 0, err[-2000:]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in output.iterdir()}
    assert sum(p.stat().st_size for p in output.iterdir()) > (17 << 20) + (4 << 20)   # cannot fit in 17 MiB
    code, out, err = _apply_filling_the_disk(tmp_path, small_disk, policy, output, tmp_path / "cache",
                                             leave=17 << 20)
    assert "reusing the dense base" in out
    one_line(code, err, "no space left on the device")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in output.iterdir()} == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model"]   # no staging folder left


# --- 1. apply without --cache finds the search's artifacts: a scenes policy matches its trial ---

SCENES = ["--suite", "scenes", "--suite-option", "train_images=64", "--suite-option", "val_images=32",
          "--suite-option", "test_images=32", "--trunk", "cnn", "--model-option", "channels=[4,8]",
          "--train-option", "epochs=2", "--train-option", "batch_size=32", "--trials", "2",
          "--measure-option", "latency_batch=32", "--measure-option", "runs=3"]


@pytest.mark.slow
def test_a_scenes_policy_applied_without_cache_matches_its_trial(tmp_path):
    """Segmentation, depth (abs_err) and normals (degrees): exported from one folder, applied
    from another with no --cache, the policy finds its search's base and rebuilds every digit;
    with the base retrained (an empty cache) it still matches, each metric judged in points
    of its own score."""
    (tmp_path / "space.yaml").write_text("fusion: {method: none}\npruning: {importance: l2, sparsity: "
                                         "{low: 0.0, high: 0.9}}\nfinetune: {epochs: 1, batch_size: 32}\n")
    code, _, err = run_cli("search", *SCENES, "--space", "space.yaml", "--storage", "store", "--name", "sc",
                           "--no-report", cwd=tmp_path, timeout=1200)
    assert code == 0, err[-3000:]
    code, _, err = run_cli("export", "store/sc", "--knee", "-o", "knee.yaml", cwd=tmp_path)   # relative paths
    assert code == 0, err[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = run_cli("apply", tmp_path / "knee.yaml", "-o", "model", cwd=elsewhere, timeout=900)
    assert code == 0, err[-3000:]
    assert f"using the artifact cache of the search {tmp_path / 'store' / 'sc'}" in out and "reusing the dense base" in out
    assert "matches its trial" in out
    measured = yaml_policy(tmp_path / "knee.yaml")["provenance"]["metrics"]
    applied = json.loads((elsewhere / "model" / "metrics.json").read_text())
    assert applied["matches_trial"] is True
    for task in ("semantic", "depth", "normals"):
        assert applied[f"metric/{task}"] == pytest.approx(measured[f"metric/{task}"], abs=1e-6), task
    code, out, err = run_cli("apply", tmp_path / "knee.yaml", "-o", "retrained", "--cache", "empty", cwd=elsewhere,
                             timeout=900)
    assert code == 0, err[-3000:]
    assert "training the dense base model" in out and "matches its trial" in out


def yaml_policy(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_apply_finds_the_cache_of_the_experiment_a_policy_names(tmp_path):
    from report_fixtures import make_experiment
    from search.shared_artifacts import search_cache_of
    from spaces import Policy

    exp = make_experiment(tmp_path / "store", 2)
    (tmp_path / "store" / "_artifacts").mkdir()
    data = {"schema": "prunefuse.policy/1", "suite": {"name": "synthetic"}, "model": {"trunk": "mlp"}}
    named = Policy.from_dict({**data, "provenance": {"experiment": str(exp), "trial": "x", "metrics": {}}})
    found = (str(tmp_path / "store" / "_artifacts"), str(exp))
    assert search_cache_of(named, str(tmp_path / "elsewhere" / "p.yaml")) == found
    assert search_cache_of(Policy.from_dict(data), str(exp / "policy.yaml")) == found   # a knee's policy.yaml
    for where in ("\0odd", str(tmp_path / "nowhere"), "s3://bucket/runs/x", str(tmp_path)):
        odd = Policy.from_dict({**data, "provenance": {"experiment": where, "trial": "x", "metrics": {}}})
        assert search_cache_of(odd, str(tmp_path / "p.yaml")) is None, where
