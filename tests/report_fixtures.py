"""A synthetic experiment directory in the on-disk format a real prunefuse search writes.

`make_experiment` writes what `prunefuse search` leaves behind (see /tmp/runs/smoke for a
real one): prunefuse.json, dense.json, finished.json (only once the search is over) and one
trial_<id>/ folder per trial holding params.json (Tune's flat config plus "policy"),
result.json (JSON lines, the last one "final": true when the trial finished) and, for a
failed trial, Tune's error.txt whose last line is the reason. The metrics follow a plausible
trade-off (more sparsity: fewer params, lower latency, lower accuracy) so the front has
several points. It is test data, not a mock of Ray: `reports.experiment` reads it as it
reads a real search.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FUSION_METHODS = ("none", "ties", "task_arithmetic")
IMPORTANCE = ("l2", "multitask_taylor")
OBJECTIVES = (("score", "max"), ("params", "min"), ("latency_ms", "min"))
FAILURES = (
    "spaces.errors.PrunefuseError: sparsity of trunk.fc2 is 0.97; expected 0 <= sparsity <= 0.95",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total)",
    "RuntimeError: mat1 and mat2 shapes cannot be multiplied (256x0 and 64x32) <fused trunk>",
)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _policy(rng, tasks, layers) -> dict:
    method = FUSION_METHODS[rng.integers(len(FUSION_METHODS))]
    fusion = None
    if method != "none":
        params = {"density": float(rng.uniform(0.05, 0.9)), "scale": float(rng.uniform(0.3, 1.5))}
        if method == "task_arithmetic":
            params = {"scale": params["scale"]}
        fusion = {"method": method, "coefficients": {t: float(rng.uniform(0.2, 1.6)) for t in tasks},
                  "params": params, "finetune_epochs": 0.0}
    return {
        "schema": "prunefuse.policy/1",
        "suite": {"name": "multidigits", "seed": 0, "offset": 2, "train_pairs": 20000, "val_pairs": 3000,
                  "test_pairs": 3000},
        "model": {"trunk": "mlp"},
        "weighting": {"method": "static", "weights": {t: float(rng.uniform(0.05, 1.0)) for t in tasks},
                      "params": {}},
        "fusion": fusion,
        "pruning": {"mode": "structured", "importance": IMPORTANCE[rng.integers(len(IMPORTANCE))],
                    "aggregate": "max", "steps": 1, "global_sparsity": None,
                    "sparsity": {layer: float(rng.uniform(0.0, 0.9)) for layer in layers}},
        "finetune": {"epochs": 2.0, "lr": 0.001, "batch_size": 256},
        "seed": 0,
        "provenance": None,
    }


def _tune_config(policy: dict) -> dict:
    """Tune's flat search keys, as the real params.json holds them beside "policy"."""
    cfg = {f"weight.{t}": w for t, w in policy["weighting"]["weights"].items()}
    fusion = policy["fusion"]
    cfg["fusion.method"] = fusion["method"] if fusion else "none"
    if fusion:
        cfg.update({f"coef.{t}": c for t, c in fusion["coefficients"].items()})
        cfg.update({f"fusion.{fusion['method']}.{k}": v for k, v in fusion["params"].items()})
    cfg["pruning.importance"] = policy["pruning"]["importance"]
    cfg.update({f"sparsity.{k}": v for k, v in policy["pruning"]["sparsity"].items()})
    return {**cfg, "policy": policy}


def _metrics(rng, policy: dict, dense: dict, tasks) -> dict:
    sparsity = np.array(list(policy["pruning"]["sparsity"].values()))
    keep = float(np.mean((1.0 - sparsity) ** 1.5))
    params = int(dense["params"] * (0.05 + 0.95 * keep))
    bonus = {"none": 0.0, "ties": 0.012, "task_arithmetic": 0.006}[policy["fusion"]["method"] if policy["fusion"]
                                                                   else "none"]
    drop = 0.25 * float(np.mean(sparsity ** 2.2)) - bonus
    metrics = {}
    for t in tasks:
        metrics[f"metric/{t}"] = float(np.clip(dense["dense_val"][t] - drop + rng.normal(0, 0.012), 0, 1))
        metrics[f"test/{t}"] = float(np.clip(metrics[f"metric/{t}"] + rng.normal(0, 0.008), 0, 1))
    from spaces.scores import mean_score

    score = mean_score({t: metrics[f"metric/{t}"] for t in tasks}, dense["dense_val"], {})
    test_ref = {t: dense[f"test/{t}"] for t in tasks}
    latency = dense["latency_ms"] * (0.1 + 0.9 * params / dense["params"]) * float(rng.lognormal(0, 0.08))
    return {"score": score, "test_score": mean_score({t: metrics[f"test/{t}"] for t in tasks}, test_ref, {}),
            "delta_m": score, "params": params,
            "nonzero_params": params, "bytes": 4 * params, "macs": int(params * 1.005), "latency_ms": latency,
            "latency_batch": 256, "threads": 1, "device": "cpu", **metrics}


def _result_line(trial_id: str, metrics: dict, step: int, steps: int, t: float) -> str:
    return json.dumps({**metrics, "step": step, "steps": steps, "final": step == steps,
                       "node_id": "9229b1670881dcdebd4bd1dbbe5c8f9266fa7912a5b9fc517e98ee1b", "pid": 5552,
                       "timestamp": int(t), "done": False, "training_iteration": step, "trial_id": trial_id,
                       "hostname": "vm", "node_ip": "192.0.2.2"})


def _error_txt(reason: str, t: float) -> str:
    return (f"Failure # 1 (occurred at {t:.0f})\n"
            "ray::ImplicitFunc.train() (pid=5552, ip=192.0.2.2, repr=run_trial)\n"
            '  File "search/trial.py", line 51, in run_trial\n'
            "    apply_policy(suite, policy, artifacts, measure_spec=spec, on_step=report)\n"
            f"{reason}\n")


def make_experiment(root, n_trials: int, *, seed: int = 0, n_failed: int = 0, n_running: int = 0,
                    tasks=("left", "right", "sum"), layers=("trunk.fc1", "trunk.fc2", "trunk.fc3"),
                    finished: bool = True, name: str = "synthetic", objectives=OBJECTIVES,
                    max_task_drop: float | None = None) -> Path:
    """Write an experiment of `n_trials` trials under ROOT/NAME and return its path.

    The last `n_running` trials are still running (every other one has no result yet) and
    `n_failed` trials spread over the rest failed; the others finished. `finished=False`
    leaves out finished.json, as a running or cut-short search does (then unfinished trials
    read as running; with it, as stopped)."""
    rng = np.random.default_rng(seed)
    exp = Path(root) / name
    exp.mkdir(parents=True, exist_ok=False)
    config = {"name": name, "storage": str(root), "suite": {"name": "multidigits"}, "model": {"trunk": "mlp"},
              "space": {"fusion": {"method": list(FUSION_METHODS)}, "pruning": {"importance": list(IMPORTANCE)}},
              "objectives": [list(o) for o in objectives], "trials": n_trials, "time_budget_s": None,
              "sampler": "tpe", "seed": seed, "cpus_per_trial": 1.0, "gpus_per_trial": 0.0,
              "max_concurrent": None, "retries": 0, "train": {}, "measure": {}, "references": False,
              "max_task_drop": max_task_drop, "address": None, "base_checkpoint": None}
    _write_json(exp / "prunefuse.json", config)
    dense_val = {t: float(v) for t, v in zip(tasks, rng.uniform(0.72, 0.95, len(tasks)))}
    dense = {"score": 0.0, "params": 162837, "latency_ms": 0.812,
             "latency_batch": 256, "threads": 1, "device": "cpu"}
    dense.update({"test_score": 0.0, "delta_m": 0.0, "nonzero_params": dense["params"],
                  "bytes": 4 * dense["params"], "macs": 163605})
    dense.update({f"metric/{t}": v for t, v in dense_val.items()})
    dense.update({f"test/{t}": v - 0.008 for t, v in dense_val.items()})
    dense["dense_val"] = dense_val
    dense["senses"] = {t: "max" for t in tasks}
    dense["task_metrics"] = {t: "accuracy" for t in tasks}
    _write_json(exp / "dense.json", dense)

    done = max(0, n_trials - n_running)
    picked = sorted(rng.choice(done, size=min(n_failed, done), replace=False).tolist())
    failed = {i: FAILURES[k % len(FAILURES)] for k, i in enumerate(picked)}
    t0 = 1_795_834_000.0
    ids = set()
    for i in range(n_trials):
        while (trial_id := f"{int(rng.integers(1 << 32)):08x}") in ids:
            pass
        ids.add(trial_id)
        d = exp / f"trial_{trial_id}"
        d.mkdir()
        policy = _policy(rng, tasks, layers)
        _write_json(d / "params.json", _tune_config(policy))
        started = t0 + 3.0 * i
        os.utime(d / "params.json", (started, started))  # trials are ordered by when params.json was written
        metrics = _metrics(rng, policy, dense, tasks)
        running = i >= n_trials - n_running
        if i in failed:
            (d / "error.txt").write_text(_error_txt(failed[i], started))
        elif running and i % 2 == 0:
            continue  # started, nothing reported yet
        steps = 2 if running or i in failed else 1  # a cut-off trial reported its first step only
        step = 1
        lines = [_result_line(trial_id, metrics, s, steps, started + s) for s in range(1, step + 1)]
        (d / "result.json").write_text("\n".join(lines) + "\n")
    if finished:
        _write_json(exp / "finished.json", {"wall_s": 3.0 * n_trials, "finished_at": t0 + 3.0 * n_trials})
    return exp
