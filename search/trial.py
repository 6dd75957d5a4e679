"""One trial: rebuild the suite, run the cycle on the proposed policy, report to Tune.

This is where a trial reports. Every report carries every objective with a finite value
(a missing metric would crash the whole search); a trial that cannot produce them raises,
and Tune records it as failed with the reason.
"""
from __future__ import annotations

import functools
import json
import math
import os

from spaces.policy import Policy


@functools.lru_cache(maxsize=4)
def _suite(spec_json: str):
    # Suites are deterministic in their options: build once per worker process, reuse across
    # trials (actors are reused).
    from mtl_models import suites

    spec = json.loads(spec_json)
    return suites.get(spec.pop("name"), **spec)


def run_trial(config: dict, *, artifacts, measure: dict, cpus: float) -> None:
    """The Tune trainable. `config["policy"]` is the policy Optuna proposed for this trial."""
    import ray
    import torch
    from ray import tune

    from mtl_models.pipeline import MeasureSpec, apply_policy

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    policy = Policy.from_dict(config["policy"], source="trial config")
    suite = _suite(json.dumps(policy.suite, sort_keys=True))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    spec = MeasureSpec(**{**measure, "device": device, "threads": measure.get("threads", threads)})
    node_id = ray.get_runtime_context().get_node_id()
    _write_policy(policy)

    def report(step: int, steps: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(f"metric {name} is {value} after pruning step {step}")
        tune.report({**metrics, "step": step, "steps": steps, "final": step == steps,
                     "node_id": node_id, "pid": os.getpid()})

    apply_policy(suite, policy, artifacts, measure_spec=spec, on_step=report)


def _write_policy(policy: Policy) -> None:
    """policy.yaml beside the trial's results, so a trial folder explains itself."""
    from ray import tune

    try:
        trial_dir = tune.get_context().get_trial_dir()
    except Exception:  # outside Tune (direct calls in tests)
        return
    if trial_dir and "://" not in trial_dir:
        policy.to_yaml(os.path.join(trial_dir, "policy.yaml"))
