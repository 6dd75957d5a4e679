"""Latency is timed alone: timing sections on one machine take turns (a real flock across
real processes, and two real trials of one embedded Ray search)."""
from __future__ import annotations

import json
import multiprocessing
import time

import pytest
import yaml

from conftest import run_cli


def _hold(lock_dir, seconds, queue):
    import os

    os.environ["PRUNEFUSE_LOCK_DIR"] = lock_dir
    from mtl_models.measuring.timing_lock import timed_alone

    with timed_alone() as slot:
        time.sleep(seconds)
    queue.put(slot.facts())


def _overlap(a: dict, b: dict) -> bool:
    return a["timed_from"] < b["timed_to"] and b["timed_from"] < a["timed_to"]


def test_two_processes_take_turns_and_the_second_one_waits(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(tmp_path), 0.5, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    facts = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert not _overlap(*facts), facts
    first, second = sorted(facts, key=lambda f: f["timed_from"])
    # Both asked at about the same time (spawned together): the later one waited for the first.
    assert second["lock_wait_s"] >= 0.2 or second["timed_from"] - first["timed_to"] > 0.5, facts


@pytest.mark.slow
def test_two_trials_on_one_node_never_time_at_once(tmp_path):
    space = {"pruning": {"importance": "l2", "steps": 2, "sparsity": 0.5}, "fusion": {"method": "none"},
             "finetune": {"epochs": 0.2}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    # Long timing sections (many runs at a big batch), two trials at once on 2 CPUs: without the
    # lock their timing sections overlap.
    code, out, err = run_cli("search", "--storage", tmp_path / "runs", "--name", "t", "--trials", "2",
                             "--space", tmp_path / "space.yaml", "--suite-option", "train_pairs=600",
                             "--suite-option", "val_pairs=200", "--suite-option", "test_pairs=200",
                             "--train-option", "epochs=1", "--measure-option", "runs=150",
                             "--measure-option", "latency_batch=512", "--no-report",
                             env={"PRUNEFUSE_LOCK_DIR": str(tmp_path)})
    assert code == 0, err
    sections = []
    for f in (tmp_path / "runs" / "t").glob("trial_*/result.json"):
        sections += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    assert len(sections) == 4 and len({s["pid"] for s in sections}) == 2  # 2 steps each, 2 processes
    assert all(s["timed_to"] - s["timed_from"] > 0.05 for s in sections)
    # On the CPU: no CUDA memory, and the device decided from Ray's resources (no GPU given).
    assert all(s["cuda_peak_mb"] == 0.0 and s["device"] == "cpu" and s["device_name"] == "cpu" for s in sections)
    for i, a in enumerate(sections):
        for b in sections[i + 1:]:
            assert not _overlap(a, b), (a["timed_from"], a["timed_to"], b["timed_from"], b["timed_to"])
    dense = json.loads((tmp_path / "runs" / "t" / "dense.json").read_text())
    assert dense["timed_to"] > dense["timed_from"] and "lock_wait_s" in dense  # the base is timed the same way
