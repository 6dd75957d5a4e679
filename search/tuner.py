"""A whole search: validate, connect, train shared artifacts once, run the Tuner, report.

Flow: check every input before anything is written → save prunefuse.json → connect Ray →
train (or reuse) the base / experts / references as Ray tasks → measure the dense base →
Tuner(OptunaSearch) over trials → report.html + the knee policy beside the experiment.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

from spaces import SearchSpace, SpaceSpec
from spaces.errors import PrunefuseError

from .config import SearchConfig, is_uri, join, write_text

STUDY_DB = "optuna.db"
DENSE_FILE = "dense.json"
FINISHED_FILE = "finished.json"  # written when fit() returns; absent while running or after a crash


def _artifact_cache(cfg: SearchConfig) -> str:
    # Artifacts are cached beside the experiments when storage is a local folder (all local
    # searches share them); with a URI storage they stay on the driver's disk.
    if is_uri(cfg.storage):
        return os.path.join(os.path.expanduser("~"), ".cache", "prunefuse", "artifacts")
    return os.path.join(cfg.storage, "_artifacts")


def build_space(cfg: SearchConfig, suite, model) -> SearchSpace:
    from mtl_models import fusion, weighting
    from mtl_models.pruning import prunable_layers

    spec = SpaceSpec.model_validate(cfg.space)
    trunk_groups = sorted({fusion.layer_group(k) for k, v in model.state_dict().items()
                           if k.startswith("trunk.") and v.is_floating_point()})
    return SearchSpace(spec, layers=prunable_layers(model), tasks=suite.task_names,
                       suite={"name": suite.name, **suite.options}, model=cfg.model,
                       fusion_knobs=fusion.KNOBS, weighting_knobs=weighting.KNOBS,
                       merge_groups=trunk_groups, base=base_spec(cfg), seed=cfg.seed)


def base_spec(cfg: SearchConfig) -> dict:
    """The policy's `base:` section: the TrainSpec plus the user's checkpoint, if any."""
    from mtl_models.artifacts import TrainSpec

    spec = asdict(TrainSpec(**cfg.train))
    if cfg.base_checkpoint:
        spec["checkpoint"] = os.path.abspath(cfg.base_checkpoint)
    return spec


def prepare_inputs(cfg: SearchConfig):
    """Everything that can be wrong with the user's request is found here, before any write."""
    from mtl_models import suites

    options = {k: v for k, v in cfg.suite.items() if k != "name"}
    suite = suites.get(cfg.suite["name"], **options)
    model = suite.build_model(**cfg.model)
    space = build_space(cfg, suite, model)
    base_state = None
    if cfg.base_checkpoint:
        base_state = load_base_checkpoint(cfg.base_checkpoint, model)
    return suite, space, base_state


def load_base_checkpoint(path: str, model):
    import torch

    from mtl_models.artifacts import load_checked

    if not os.path.isfile(path):
        raise PrunefuseError(f"base checkpoint {path!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PrunefuseError(f"base checkpoint {path!r} cannot be read as a weights-only state dict: "
                             f"{str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PrunefuseError(f"base checkpoint {path!r} holds a {type(state).__name__}, expected a state dict")
    load_checked(model, state, source=f"base checkpoint {path}")
    return state


def train_artifacts(cfg: SearchConfig, suite, space: SearchSpace, base_state, log):
    from mtl_models import artifacts

    from .cluster import ray_map

    def mapper(fn, items):
        return ray_map(fn, list(items), num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)

    return artifacts.prepare(suite, cfg.model, artifacts.TrainSpec(**cfg.train), cache_dir=_artifact_cache(cfg),
                             experts=space.fuses, references=cfg.references, base_state=base_state,
                             map_fn=mapper, log=log)


def measure_dense(cfg: SearchConfig, suite, art) -> dict:
    """The dense base measured like any trial: the report's reference point."""
    import torch

    from mtl_models.pipeline import MeasureSpec, measure_model

    model = suite.build_model(**cfg.model)
    model.load_state_dict(art.base)
    torch.set_num_threads(max(1, int(cfg.cpus_per_trial)))
    dense = measure_model(model, suite, art, MeasureSpec(**cfg.measure))
    dense["dense_val"] = art.dense_metrics["val"]
    if art.references:
        dense["references"] = art.references
    return dense


def make_tuner(cfg: SearchConfig, suite, space: SearchSpace, art, dense: dict, *, restore: bool):
    from ray import tune

    from .optuna_search import TaskFloors, make_searcher
    from .progress import ProgressPrinter
    from .trial import run_trial

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, artifacts=art, measure=cfg.measure, cpus=cfg.cpus_per_trial),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    if restore:
        return tune.Tuner.restore(cfg.path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    floors = TaskFloors(dense["dense_val"], cfg.max_task_drop) if cfg.max_task_drop is not None else None
    searcher = make_searcher(space, objectives=cfg.objectives, sampler=cfg.sampler, seed=cfg.seed,
                             trials=cfg.trials, storage_url=study_url(cfg), study_name=cfg.name, floors=floors)
    scheduler = None
    if cfg.asha:
        scheduler = tune.schedulers.ASHAScheduler(metric="accuracy", mode="max", grace_period=1, reduction_factor=2)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.trials or -1,
                                    time_budget_s=cfg.time_budget_s, reuse_actors=True,
                                    max_concurrent_trials=cfg.max_concurrent,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage_for_ray(cfg.storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.retries),
                                  callbacks=[ProgressPrinter(cfg.trials)]),
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def study_url(cfg: SearchConfig) -> str:
    # An RDB URL (any SQLAlchemy one) may be given by PRUNEFUSE_STUDY_STORAGE; by default a
    # SQLite file inside the experiment, so optuna-dashboard can open it.
    url = os.environ.get("PRUNEFUSE_STUDY_STORAGE")
    if url:
        return url
    if is_uri(cfg.storage):
        return "sqlite:///" + os.path.join(_artifact_cache(cfg), f"{cfg.name}.db")
    return "sqlite:///" + os.path.abspath(join(cfg.path, STUDY_DB))


def storage_for_ray(storage: str) -> str:
    return storage if is_uri(storage) else os.path.abspath(storage)


def experiment_exists(cfg: SearchConfig) -> bool:
    from .config import CONFIG_FILE

    return not is_uri(cfg.storage) and os.path.exists(join(cfg.path, CONFIG_FILE))


def run_search(cfg: SearchConfig, *, resume: bool = False, log=print) -> str:
    """Run (or resume) a search; returns the experiment path."""
    if not resume and experiment_exists(cfg):
        raise PrunefuseError(f"experiment {cfg.path!r} already exists; resume it with --resume {cfg.name} "
                             f"or choose another --name")
    suite, space, base_state = prepare_inputs(cfg)
    if not resume:
        cfg.save()
    from .cluster import connect

    started = time.time()
    connect(cfg.address, log=log)
    art = train_artifacts(cfg, suite, space, base_state, log)
    dense = measure_dense(cfg, suite, art)
    write_text(join(cfg.path, DENSE_FILE), json.dumps(dense, indent=1))
    log(f"dense base: accuracy {dense['accuracy']:.4f}, {dense['params']:,} params, "
        f"{dense['latency_ms']:.3f} ms @ batch {dense['latency_batch']}")
    tuner = make_tuner(cfg, suite, space, art, dense, restore=resume)
    tuner.fit()
    elapsed = time.time() - started
    write_text(join(cfg.path, FINISHED_FILE), json.dumps({"wall_s": elapsed, "finished_at": time.time()}))
    log(f"search finished in {elapsed:.0f} s: {cfg.path}")
    return cfg.path
