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
import time

from spaces.policy import Policy

from .experiment import read_final, write_final



@functools.lru_cache(maxsize=4)
def _suite(spec_json: str):
    # Suites are deterministic in their options: build once per worker process, reuse across
    # trials (actors are reused). A suite read from files (the images suite) holds only its
    # rows' positions and labels here; the decoded data is a file on this node's disk that every
    # worker reads (mtl_models.suites.image_cache), prepared once per node, never per trial.
    from mtl_models import suites

    return suites.from_spec(json.loads(spec_json))


def run_trial(config: dict, *, artifacts, measure: dict, cpus: float, experiment: str | None = None,
              suite=None) -> None:
    """The Tune trainable. `config["policy"]` is the policy Optuna proposed for this trial.

    Reports carry `cycle_s` (seconds inside the cycle so far, reporting excluded) and
    `setup_s` (this call's time before the cycle: imports, suite, artifacts), so a search's
    framework overhead can be told from its work. The final report is also written to
    EXPERIMENT/trial_<id>/final.json before Tune sees it: a trial that a resumed search
    runs again after it had finished (the driver died before its snapshot said so)
    reports that result again instead of recomputing it.
    """
    entered, started_at = time.perf_counter(), time.time()
    import ray
    import torch
    from ray import tune

    from mtl_models.training.device import job_device, peak_memory_mb, reset_peak_memory
    from mtl_models.pipeline import MeasureSpec, apply_policy

    trial_id = tune.get_context().get_trial_id()
    done = read_final(experiment, trial_id)
    if done is not None:
        tune.report({**{k: v for k, v in done.items() if k != "config"}, "replayed": True})
        return
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    policy = Policy.from_dict(config["policy"], source="trial config")
    if suite is None or suite.spec != policy.suite:
        # The search hands its suite over through the object store (no rebuild, no data files
        # needed on this node); rebuilt only for a policy of another suite.
        suite = _suite(json.dumps(policy.suite, sort_keys=True))
    device = job_device()  # CUDA where Ray gave this trial a GPU (or a share of one)
    reset_peak_memory(device)  # actors are reused: the peak is this trial's own
    spec = MeasureSpec(**{**measure, "device": device, "threads": measure.get("threads", threads)})
    node_id = ray.get_runtime_context().get_node_id()
    clock = {"start": time.perf_counter(), "reporting": 0.0}
    setup_s = clock["start"] - entered

    def report(step: int, steps: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(f"metric {name} is {value} after pruning step {step}")
        now = time.perf_counter()
        result = {**metrics, "step": step, "steps": steps, "final": step == steps, "node_id": node_id,
                  "pid": os.getpid(), "cycle_s": now - clock["start"] - clock["reporting"], "setup_s": setup_s,
                  "cuda_peak_mb": peak_memory_mb(device), "started_at": started_at, "reported_at": time.time()}
        if step == steps:
            # with the trial's config: Tune's params.json reaches the storage only when it syncs
            write_final(experiment, trial_id, {**result, "config": config})
        tune.report(result)
        clock["reporting"] += time.perf_counter() - now

    try:
        apply_policy(suite, policy, artifacts, measure_spec=spec, on_step=report)
    except torch.OutOfMemoryError:
        if device == "cuda":
            torch.cuda.empty_cache()  # leave the GPU usable for whatever runs next in this process
        raise
