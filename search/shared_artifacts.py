"""What a search trains once, on Ray: the dense base, task experts, single-task references.

`mtl_models.artifacts` knows how to train and cache them; this module decides where they
run (Ray tasks with the trials' resources, or here) and measures the dense base the way a
trial measures its model, as the report's reference point.
"""
from __future__ import annotations

import json
import os

from spaces import SearchSpace
from spaces.files import is_uri

from .config import SearchConfig


def artifact_cache(cfg: SearchConfig) -> str:
    # Artifacts are cached beside the experiments when storage is a local folder (all local
    # searches share them); with a URI storage they stay on the driver's disk.
    if is_uri(cfg.storage):
        return os.path.join(os.path.expanduser("~"), ".cache", "prunefuse", "artifacts")
    return os.path.join(cfg.storage, "_artifacts")


def search_cache_of(policy, policy_file: str) -> tuple[str, str] | None:
    """(the artifact cache, the experiment) of the search a policy came from, where that
    experiment is reachable here: the folder its provenance names, or the folder holding the
    policy file (a knee's policy.yaml sits in its experiment). None when neither is one.

    `apply` then rebuilds from the very base and experts its trial started from: training
    them again in another process is not bit-identical."""
    from spaces.vocabulary import CONFIG_FILE

    named = (policy.provenance or {}).get("experiment")
    for where in (named, os.path.dirname(os.path.abspath(policy_file))):
        if not isinstance(where, str) or not where or is_uri(where):
            continue
        try:
            if not os.path.isfile(os.path.join(where, CONFIG_FILE)):
                continue
            cfg = SearchConfig.load(where)
        except Exception:  # noqa: BLE001 a damaged or odd experiment is only a lost shortcut: the base is retrained
            continue
        # An experiment is STORAGE/NAME, and a local storage keeps its cache beside it.
        cache = artifact_cache(cfg) if is_uri(cfg.storage) else os.path.join(os.path.dirname(
            os.path.abspath(where).rstrip(os.sep)), "_artifacts")
        if os.path.isdir(cache):
            return cache, where
    return None


def train_artifacts(cfg: SearchConfig, suite, space: SearchSpace, user_weights, log):
    """Base, experts and references, trained once and cached by content hash (or reused).

    Experts and references fan out as Ray tasks with the trials' resources. The base is a Ray
    task too when the search runs on a cluster or on GPUs; on an embedded CPU-only Ray it
    trains here, on all of this machine's cores (a task would only add a worker start).
    """
    from mtl_models import artifacts

    from .cluster import ray_map

    def mapper(fn, items):
        return ray_map(fn, list(items), num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)

    on_ray = runs_on_ray(cfg)
    return artifacts.prepare(suite, cfg.model, artifacts.TrainSpec(**cfg.train), cache_dir=artifact_cache(cfg),
                             experts=space.fuses, references=cfg.references,
                             base_state=user_weights.base if user_weights else None,
                             user_experts=user_weights.experts if user_weights else None,
                             map_fn=mapper, base_map_fn=mapper if on_ray else None, log=log)


def runs_on_ray(cfg: SearchConfig) -> bool:
    """Whether the base's jobs run as Ray tasks with the trials' resources (on a cluster, or where
    trials get GPUs: then the base trains and is timed on the device trials have) or here. Only
    a driver connected to Ray sends them there: `report --remeasure` (no Ray) measures here."""
    import sys

    ray = sys.modules.get("ray")
    connected = ray is not None and ray.is_initialized()
    return connected and (cfg.address is not None or cfg.gpus_per_trial > 0)


def measure_dense(cfg: SearchConfig, suite, art) -> dict:
    """The dense base measured like any trial, on the device a trial gets: the report's reference point."""
    job = _DenseMeasureJob(suite, cfg.model, _trial_measure(cfg), art, cfg.train.get("precision", "fp32"))
    dense = _run_measure_job(cfg, job)
    dense["dense_val"] = art.dense_metrics["val"]
    # Which way each task's metric is better, and its name: readers (floors, export, the
    # report) orient task metrics by these without rebuilding the suite.
    dense["senses"] = suite.senses
    dense["task_metrics"] = {t.name: t.metric for t in suite.tasks}
    if art.references:
        dense["references"] = art.references
    if art.expert_metrics:  # a user's experts, each on its own task: the individual-model reference
        dense["experts"] = art.expert_metrics
    return dense


def measure_control(cfg: SearchConfig, suite, art, space: SearchSpace, log) -> dict:
    """The equal-budget dense control (`SearchSpace.control_policy`): the base fine-tuned exactly
    as a trial fine-tunes, unpruned and unfused, measured like a trial on a trial's device.

    Trials get more training than the base (experts, then the fine-tune), so comparing them
    with the base alone credits compression with that training; the control has it too. Its
    weights are cached beside the base (one fine-tune per base and control policy)."""
    import hashlib
    from pathlib import Path

    import torch

    policy = space.control_policy()
    digest = hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    cached = Path(artifact_cache(cfg), art.key, f"control-{digest}.pt")
    from mtl_models.models.weights import load_weights

    state = load_weights(cached) if cached.is_file() else None
    log("reusing the dense control from the cache" if state is not None else
        f"fine-tuning the dense control ({policy.finetune.epochs:g} epochs at lr {policy.finetune.lr:g}, "
        f"{policy.weighting.method} weighting: the trials' fine-tune) ...")
    out = _run_measure_job(cfg, _ControlJob(suite, policy, _trial_measure(cfg), art, state))
    if state is None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp")
        torch.save(out["state"], tmp)
        os.replace(tmp, cached)
    return {**out["metrics"], "policy": policy.to_dict()}


# The merging literature's standard recipes, applied to a user's experts as they are (no pruning,
# no fine-tune): name -> (method, every task's coefficient). TIES at its defaults (density, scale).
RECIPES = {"task arithmetic λ=0.3": ("task_arithmetic", 0.3), "TIES (defaults)": ("ties", 1.0)}


def measure_recipes(cfg: SearchConfig, suite, art, space: SearchSpace, log) -> dict:
    """Each of `RECIPES` on the search's experts, measured once like a trial: the reference
    points that show what the search adds over the standard merges."""
    control = space.control_policy()
    out = {}
    for name, (method, coefficient) in RECIPES.items():
        log(f"measuring the standard recipe {name} on the experts ...")
        policy = control.replace(fusion={"method": method, "coefficients": {t: coefficient for t in suite.task_names}},
                                 finetune={**control.finetune.model_dump(mode="json"), "epochs": 0.0})
        result = _run_measure_job(cfg, _ControlJob(suite, policy, _trial_measure(cfg), art, None))
        out[name] = {**result["metrics"], "policy": policy.to_dict()}
    return out


def _trial_measure(cfg: SearchConfig) -> dict:
    # Timed with the threads a trial times with (search/trial.py: --cpus-per-trial unless set).
    return {"threads": max(1, int(cfg.cpus_per_trial)), **cfg.measure}


def _run_measure_job(cfg: SearchConfig, job):
    """Run a one-off measuring job where a trial would (a Ray task on a cluster or a GPU), else here."""
    import torch

    from .cluster import ray_map

    if runs_on_ray(cfg):
        [out] = ray_map(job, [None], num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)
        return out
    torch.set_num_threads(max(1, int(cfg.cpus_per_trial)))
    return job(None)


class _ControlJob:
    """Picklable: fine-tunes (or loads) the control and measures it where it runs."""

    def __init__(self, suite, policy, measure, art, state):
        self.suite, self.policy, self.measure, self.art, self.state = suite, policy, measure, art, state

    def __call__(self, _item):
        import dataclasses

        from mtl_models.training.device import job_device
        from mtl_models.pipeline import MeasureSpec, apply_policy, measure_model

        spec = MeasureSpec(**{**self.measure, "device": job_device()})
        if self.state is None:
            model, metrics = apply_policy(self.suite, self.policy, self.art, measure_spec=spec)
        else:
            model = self.suite.build_model(**self.policy.model)
            model.load_state_dict(self.state)
            metrics = measure_model(model, self.suite, self.art,
                                    dataclasses.replace(spec, precision=self.policy.finetune.precision))
        return {"metrics": metrics, "state": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


class _DenseMeasureJob:
    """Picklable: measures the dense base where it runs (a Ray task's GPU when it has one)."""

    def __init__(self, suite, model_spec, measure, art, precision):
        self.suite, self.model_spec, self.measure, self.art, self.precision = suite, model_spec, measure, art, precision

    def __call__(self, _item):
        from mtl_models.training.device import job_device, peak_memory_mb, reset_peak_memory
        from mtl_models.pipeline import MeasureSpec, measure_model

        device = job_device()
        reset_peak_memory(device)
        model = self.suite.build_model(**self.model_spec)
        model.load_state_dict(self.art.base)
        spec = MeasureSpec(**{**self.measure, "device": device, "precision": self.precision})
        return {**measure_model(model, self.suite, self.art, spec), "cuda_peak_mb": peak_memory_mb(device)}
