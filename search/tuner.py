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

from spaces.vocabulary import DENSE_FILE, FINISHED_FILE, STUDY_DB

from .config import SearchConfig, is_uri, join, write_text
from .shared_artifacts import artifact_cache, load_base_checkpoint, measure_dense, train_artifacts



def build_space(cfg: SearchConfig, suite, model) -> SearchSpace:
    from mtl_models import fusion, weighting
    from mtl_models.pruning import IMPORTANCES, coupled_groups

    spec = SpaceSpec.model_validate(cfg.space)
    trunk_groups = sorted({fusion.layer_group(k) for k, v in model.state_dict().items()
                           if k.startswith("trunk.") and v.is_floating_point()})
    # One sparsity per coupled group (named by its first layer): coupled channels go together.
    layers = list(coupled_groups(model, suite.example_inputs(2)))
    return SearchSpace(spec, layers=layers, tasks=suite.task_names,
                       suite=suite.spec, model=cfg.model,
                       fusion_knobs=fusion.KNOBS, weighting_knobs=weighting.KNOBS,
                       merge_groups=trunk_groups, base=base_spec(cfg), importances=list(IMPORTANCES), seed=cfg.seed)


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

    suite = suites.from_spec(cfg.suite)
    model = suite.build_model(**cfg.model)
    space = build_space(cfg, suite, model)
    check_precisions(cfg, space)
    from mtl_models.preflight import check_pruning

    check_pruning(suite, space.hardest_pruning())  # a model that pruning breaks fails now, not after training
    base_state = None
    if cfg.base_checkpoint:
        base_state = load_base_checkpoint(cfg.base_checkpoint, model)
    return suite, space, base_state


def check_precisions(cfg: SearchConfig, space: SearchSpace) -> None:
    """fp16 where trials (and the base, which runs where they do) get no GPU: one line, now."""
    from mtl_models.device import check_precision

    device = "cuda" if cfg.gpus_per_trial > 0 else "cpu"
    check_precision(cfg.train.get("precision", "fp32"), device, what="--train-option precision")
    for precision in space.precisions:
        check_precision(precision, device, what="space finetune.precision")


# Tune's experiment snapshot (trial states + searcher), uploaded to the storage: how often.
# Its default ("auto", >= 10 s) loses more work when the driver dies; each snapshot costs the
# driver a few ms per trial. An explicit TUNE_GLOBAL_CHECKPOINT_S wins.
SNAPSHOT_PERIOD_S = "5"


_USER_ENV = frozenset(os.environ)  # what the user set before prunefuse touched anything


def trial_slots(cfg: SearchConfig) -> int:
    """How many trials the cluster runs at once now (CPUs, GPUs and --max-concurrent allowing)."""
    import ray

    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1.0) // cfg.cpus_per_trial)
    if cfg.gpus_per_trial > 0:
        slots = min(slots, int(resources.get("GPU", 0.0) // cfg.gpus_per_trial))
    if cfg.max_concurrent:
        slots = min(slots, cfg.max_concurrent)
    return max(1, slots)


def _tune_environment(cfg: SearchConfig) -> None:
    # Tune reads these when the Tuner runs: snapshot period, and no CSV / TensorBoard loggers
    # (result.json, which the reports read, is the one logger the search adds itself).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_PERIOD_S)
    if "TUNE_MAX_PENDING_TRIALS_PG" not in _USER_ENV:
        # With a searcher Tune keeps one trial pending: the second slot's actor would start only
        # once the first one's has. One pending trial per free slot starts them together.
        os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(trial_slots(cfg))
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune tables on the console (verbose=0)
    # A failed trial is one line from ProgressPrinter (its reason); the traceback is in its error.txt.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    import logging

    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _QuietTune) for f in tune_log.filters):
        tune_log.addFilter(_QuietTune())


class _QuietTune:
    """Drops Tune's "Trials did not complete: [...]" line: failed trials are reported one by one."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


def make_tuner(cfg: SearchConfig, suite, space: SearchSpace, art, dense: dict, *, restore: bool):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from .optuna_search import TaskFloors, make_searcher
    from .progress import ProgressPrinter
    from .trial import run_trial

    _tune_environment(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, artifacts=art, measure=cfg.measure, cpus=cfg.cpus_per_trial,
                             experiment=experiment_for_trials(cfg), suite=suite),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    if restore:
        # Finished trials stay as they are; unfinished ones run again (a trial that had in fact
        # finished replays its final.json); errored ones stay errored.
        return tune.Tuner.restore(ray_experiment_path(cfg), trainable=trainable, resume_unfinished=True,
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
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                                  callbacks=[ProgressPrinter(cfg.trials), JsonLoggerCallback()]),
    )


def experiment_for_trials(cfg: SearchConfig) -> str:
    """The experiment's location as trials on any node see it (absolute for a local folder)."""
    return cfg.path if is_uri(cfg.storage) else os.path.abspath(cfg.path)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def study_url(cfg: SearchConfig) -> str:
    # An RDB URL (any SQLAlchemy one) may be given by PRUNEFUSE_STUDY_STORAGE; by default a
    # SQLite file inside the experiment, so optuna-dashboard can open it.
    url = os.environ.get("PRUNEFUSE_STUDY_STORAGE")
    if url:
        return url
    if is_uri(cfg.storage):
        return "sqlite:///" + os.path.join(artifact_cache(cfg), f"{cfg.name}.db")
    return "sqlite:///" + os.path.abspath(join(cfg.path, STUDY_DB))


def storage_for_ray(storage: str) -> str:
    return storage if is_uri(storage) else os.path.abspath(storage)


def ray_experiment_path(cfg: SearchConfig) -> str:
    return storage_for_ray(cfg.storage).rstrip("/") + "/" + cfg.name


def experiment_exists(cfg: SearchConfig) -> bool:
    from .config import CONFIG_FILE

    if not is_uri(cfg.storage):
        return os.path.exists(join(cfg.path, CONFIG_FILE))
    from .config import read_text

    try:
        read_text(join(cfg.path, CONFIG_FILE))
        return True
    except Exception:
        return False


def can_restore(cfg: SearchConfig) -> bool:
    from ray import tune

    try:
        return tune.Tuner.can_restore(ray_experiment_path(cfg))
    except Exception:
        return False


def run_search(cfg: SearchConfig, *, resume: bool = False, log=print) -> str:
    """Run (or resume) a search; returns the experiment path.

    A resumed search (its driver died) keeps the finished and failed trials, runs the
    unfinished ones again, and asks the same Optuna study (its sampler sees every trial
    told so far) for the rest, until the asked number of trials is done.
    """
    if not resume and experiment_exists(cfg):
        raise PrunefuseError(f"experiment {cfg.path!r} already exists; resume it with --resume {cfg.name} "
                             f"or choose another --name")
    if resume and _search_over(cfg):
        log(f"search {cfg.name!r} had finished already; nothing to resume: {cfg.path}")
        return cfg.path
    suite, space, base_state = prepare_inputs(cfg)
    from .cluster import check_fits, connect

    started = time.time()
    connect(cfg.address, suite_name=cfg.suite["name"], log=log)  # before any write: a wrong address leaves nothing
    check_fits(cfg.address, cfg.cpus_per_trial, cfg.gpus_per_trial, log=log)
    if not resume:
        cfg.save()
    art = train_artifacts(cfg, suite, space, base_state, log)
    dense = _saved_dense(cfg) if resume else None
    if dense is None:
        dense = measure_dense(cfg, suite, art)
        write_text(join(cfg.path, DENSE_FILE), json.dumps(dense, indent=1))
    log(f"dense base: accuracy {dense['accuracy']:.4f}, {dense['params']:,} params, "
        f"{dense['latency_ms']:.3f} ms @ batch {dense['latency_batch']}")
    restore = resume and can_restore(cfg)
    if resume:
        log(f"resuming search {cfg.name!r} from {cfg.path}" if restore else
            f"search {cfg.name!r} had started no trials before it stopped; starting them now")
    tuner = make_tuner(cfg, suite, space, art, dense, restore=restore)
    results = tuner.fit()
    _after_fit(cfg, results, log, resumed=resume)
    elapsed = time.time() - started
    from .progress import ProgressPrinter

    printer = ProgressPrinter.last
    write_text(join(cfg.path, FINISHED_FILE), json.dumps({
        "wall_s": elapsed, "finished_at": time.time(), "resumed": bool(resume),
        "trial_wall_s": dict(printer.wall_s) if printer else {}}))
    counts = ""
    if printer:
        counts = f" ({printer.done} trials finished, {printer.failed} failed)"
    log(f"search finished in {elapsed:.0f} s{counts}: {cfg.path}")
    return cfg.path


def _search_over(cfg: SearchConfig) -> bool:
    from .config import read_text

    try:
        read_text(join(cfg.path, FINISHED_FILE))
        return True
    except PrunefuseError:
        return False


def _saved_dense(cfg: SearchConfig) -> dict | None:
    from .config import read_text

    try:
        return json.loads(read_text(join(cfg.path, DENSE_FILE)))
    except (PrunefuseError, ValueError):
        return None


def _after_fit(cfg: SearchConfig, results, log, *, resumed: bool) -> None:
    """Tidy what a dead driver may have left: Optuna trials still RUNNING (no Tune trial will
    ever tell them) become FAIL; trial folders Tune's last snapshot did not know (their trial
    was replaced on resume) move to EXPERIMENT/_orphans so every trial_* folder is a trial."""
    from .optuna_search import fail_stale_trials

    try:
        stale = fail_stale_trials(study_url(cfg), cfg.name)
    except Exception as exc:  # the study is a by-product; never fail a finished search over it
        log(f"could not tidy the Optuna study: {exc}")
        stale = 0
    if stale:
        log(f"marked {stale} Optuna trial(s) left running by a stopped driver as failed")
    _keep_retried_errors_aside(results)
    if not resumed or is_uri(cfg.storage):
        return
    from pathlib import Path

    known = {Path(str(r.path)).name for r in results if getattr(r, "path", None)}
    orphans = [d for d in Path(cfg.path).glob("trial_*") if d.is_dir() and d.name not in known]
    if orphans and known:
        target = Path(cfg.path) / "_orphans"
        target.mkdir(exist_ok=True)
        for d in orphans:
            d.replace(target / d.name)
        log(f"moved {len(orphans)} trial folder(s) of a stopped driver that the resumed search replaced "
            f"to {target}")


def _keep_retried_errors_aside(results) -> None:
    """A trial that failed, was retried (--retries) and then finished is a finished trial:
    Tune leaves the earlier failure in its error.txt, which readers take as "failed"; it
    moves to error_retried.txt."""
    for r in results:
        if r.error is not None or not (r.metrics or {}).get("final") or not getattr(r, "path", None):
            continue
        fs = r.filesystem
        src, dst = f"{r.path}/error.txt", f"{r.path}/error_retried.txt"
        try:
            from pyarrow import fs as pafs

            if fs.get_file_info(src).type == pafs.FileType.File:
                fs.move(src, dst)
        except Exception:
            pass
