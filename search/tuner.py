"""A whole search: validate, connect, train shared artifacts once, run the Tuner, report.

Flow: check every input before anything is written → save prunefuse.json → connect Ray →
train (or reuse) the base / experts / references as Ray tasks → measure the dense base →
Tuner(OptunaSearch) over trials → report.html + the knee policy beside the experiment.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict

from spaces import SearchSpace, SpaceSpec
from spaces.errors import PrunefuseError
from spaces.files import is_uri, join, read_text, write_text
from spaces.vocabulary import CONFIG_FILE, CONTROL_FILE, DENSE_FILE, FINISHED_FILE, MEAN_SCORE, RECIPES_FILE, TASK_METRIC

from . import experiment as ex
from . import tracking
from .config import SearchConfig
from .shared_artifacts import artifact_cache, measure_control, measure_dense, measure_recipes, train_artifacts


def build_space(cfg: SearchConfig, suite, model) -> SearchSpace:
    from mtl_models import fusion
    from mtl_models.training import weighting
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

    from mtl_models.models.weights import checkpoint_sha256

    spec = asdict(TrainSpec(**cfg.train))
    if cfg.base_checkpoint:  # path and SHA-256 of every user file: apply rebuilds from them, or refuses
        spec["checkpoint"] = os.path.abspath(cfg.base_checkpoint)
        spec["checkpoint_sha256"] = checkpoint_sha256(cfg.base_checkpoint, what="base checkpoint")
    if cfg.experts:
        spec["experts"] = {t: {"path": os.path.abspath(path),
                               "sha256": checkpoint_sha256(path, what=f"expert for task {t!r}")}
                           for t, path in cfg.experts.items()}
    return spec


def prepare_inputs(cfg: SearchConfig):
    """Everything that can be wrong with the user's request is found here, before any write."""
    from mtl_models import suites

    suite = suites.from_spec(cfg.suite)
    if cfg.experts:  # before the space: its base section reads (and hashes) every expert file
        from mtl_models.models.pretrained import check_expert_tasks

        check_expert_tasks(cfg.experts, suite.task_names, cfg.base_checkpoint)
    for name, _ in cfg.objectives:
        task = name.removeprefix(TASK_METRIC)
        if name.startswith(TASK_METRIC) and task not in suite.task_names:
            raise PrunefuseError(f"--objectives {name}: suite {suite.name!r} has no task {task!r}; "
                                 f"its tasks: {', '.join(suite.task_names)}")
    model = suite.build_model(**cfg.model)
    space = build_space(cfg, suite, model)
    check_precisions(cfg, space)
    if space.quantizes:  # an int8 graph is timed in ONNX Runtime: so must every other trial be
        from mtl_models.pipeline import MeasureSpec, check_quantized_backend

        check_quantized_backend("int8", MeasureSpec(**cfg.measure).latency_backend)
    if cfg.tracking:
        tracking.callbacks(cfg)  # mlflow importable and the URI usable: fails before anything is written
    from mtl_models.pruning import left_unpruned, probe
    from mtl_models.pruning.preflight import check_pruning
    from mtl_models.pruning.attention import describe_unsupported

    # attention of no layout prunefuse knows, groups torch-pruning cannot prune: said once, kept whole
    for unpruned in (describe_unsupported(model), probe.describe(left_unpruned(model, suite.example_inputs(2)))):
        if unpruned:
            print(unpruned, flush=True)
    check_pruning(suite, space.hardest_pruning())  # a model that pruning breaks fails now, not after training
    from mtl_models.models.pretrained import load_user_weights

    if cfg.experts and cfg.references:
        raise PrunefuseError("--references trains single-task references; with --experts the experts are the "
                             "references (Δm is taken against their own metrics): leave out --references")
    user_weights = load_user_weights(model, base=cfg.base_checkpoint, experts=cfg.experts)
    return suite, space, user_weights


def check_precisions(cfg: SearchConfig, space: SearchSpace) -> None:
    """fp16 where trials (and the base, which runs where they do) get no GPU: one line, now."""
    from mtl_models.training.device import check_precision

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


def make_tuner(cfg: SearchConfig, suite, space: SearchSpace, art, dense: dict, *, trials: int | None, progress):
    """A fresh Tuner for `trials` more trials (None: until the time budget) over the search's
    Optuna study; a resumed search gets one too, in the same experiment folder."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from .optuna_search import make_searcher
    from .trial import run_trial

    _tune_environment(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, artifacts=art, measure=cfg.measure, cpus=cfg.cpus_per_trial,
                             experiment=experiment_for_trials(cfg), suite=suite),
        {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    floors = task_floors(cfg, dense)
    searcher = make_searcher(space, objectives=cfg.objectives, sampler=cfg.sampler, seed=cfg.seed,
                             trials=cfg.trials, storage_url=ex.study_url(cfg), study_name=cfg.name, floors=floors,
                             experiment=experiment_for_trials(cfg))
    scheduler = make_scheduler(cfg)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials or -1,
                                    time_budget_s=cfg.time_budget_s, reuse_actors=True,
                                    max_concurrent_trials=cfg.max_concurrent,
                                    trial_dirname_creator=ex.trial_dirname),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage_for_ray(cfg.storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.retries),
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                                  callbacks=[progress, JsonLoggerCallback(), *tracking.callbacks(cfg)]),
    )


def make_scheduler(cfg: SearchConfig):
    """`--early-stop`: ASHA on the score alone, or successive halving by non-dominated rank
    over every objective (search/pareto_stop.py); None runs every trial to its end."""
    from ray import tune

    if cfg.early_stop == "asha":
        return tune.schedulers.ASHAScheduler(metric=MEAN_SCORE, mode="max", grace_period=1, reduction_factor=2)
    if cfg.early_stop == "pareto":
        from .pareto_stop import ParetoStopScheduler

        return ParetoStopScheduler(cfg.objectives, keep=cfg.early_stop_keep)
    return None


def task_floors(cfg: SearchConfig, dense: dict):
    from .optuna_search import TaskFloors

    return (TaskFloors(dense["dense_val"], cfg.max_task_drop, senses=dense.get("senses"))
            if cfg.max_task_drop is not None else None)


def experiment_for_trials(cfg: SearchConfig) -> str:
    """The experiment's location as trials on any node see it (absolute for a local folder)."""
    return cfg.path if is_uri(cfg.storage) else os.path.abspath(cfg.path)


def storage_for_ray(storage: str) -> str:
    return storage if is_uri(storage) else os.path.abspath(storage)


def ray_experiment_path(cfg: SearchConfig) -> str:
    return storage_for_ray(cfg.storage).rstrip("/") + "/" + cfg.name


def experiment_exists(cfg: SearchConfig) -> bool:
    if not is_uri(cfg.storage):
        return os.path.exists(join(cfg.path, CONFIG_FILE))
    try:
        read_text(join(cfg.path, CONFIG_FILE))
        return True
    except PrunefuseError:  # not found; any other error (permissions, network) is the user's to see
        return False


def run_search(cfg: SearchConfig, *, resume: bool = False, log=print) -> str:
    """Run (or resume) a search; returns the experiment path.

    Every path and input is checked before Ray starts or anything is written. The experiment
    folder is held by one driver at a time (`claim.claimed`). A resumed search (its driver died,
    at any moment) settles what that driver left (`resume.reconcile`: every trial that wrote its
    final result is kept, once) and runs a fresh Tuner over the same Optuna study until the asked
    number of trials has ended. A finished search is left untouched.
    """
    if not resume and experiment_exists(cfg):
        ex.refuse_existing(cfg)
    if resume and ex.search_over(cfg):
        log(ex.finished_line(cfg))
        return cfg.path
    if resume:  # settling a stopped driver reads the trial folders directly
        ex.refuse_uri("--resume", cfg.storage)
    check_paths(cfg)
    warm = None
    if cfg.warm_start and not resume:  # a resumed search has its carried trials already
        from .warm_start import check_source

        warm = check_source(cfg)
    suite, space, user_weights = prepare_inputs(cfg)
    from .claim import claimed

    with claimed(cfg.path) if not is_uri(cfg.storage) else contextlib.nullcontext():
        if not resume and experiment_exists(cfg):  # another driver created it since the first look
            ex.refuse_existing(cfg)
        if resume and ex.search_over(cfg):
            log(ex.finished_line(cfg))
            return cfg.path
        return _run_claimed(cfg, suite, space, user_weights, resume=resume, log=log, warm=warm)


def _run_claimed(cfg: SearchConfig, suite, space, user_weights, *, resume: bool, log, warm=None) -> str:
    from .cluster import check_fits, cluster_watch, connect

    started = time.time()
    connect(cfg.address, suite_name=cfg.suite["name"], log=log)  # before any write: a wrong address leaves nothing
    check_fits(cfg.address, cfg.cpus_per_trial, cfg.gpus_per_trial, log=log)
    with cluster_watch(cfg.address, lambda gcs: cluster_lost_line(cfg, gcs)):
        results, printer = _train_and_fit(cfg, suite, space, user_weights, resume=resume, log=log, warm=warm)
    _after_fit(cfg, results, log)
    elapsed = time.time() - started
    write_text(join(cfg.path, FINISHED_FILE), json.dumps({
        "wall_s": elapsed, "finished_at": time.time(), "resumed": bool(resume),
        "trial_wall_s": dict(printer.wall_s) if printer else {}}))
    counts = ""
    if printer:
        counts = f" ({printer.done} trials finished, {printer.failed} failed)"
    log(f"search finished in {elapsed:.0f} s{counts}: {cfg.path}")
    return cfg.path


def cluster_lost_line(cfg: SearchConfig, gcs: str) -> str:
    """What a search whose cluster went away says last: what is kept, and how to go on."""
    kept = None if is_uri(cfg.storage) else sum(ex.read_final(cfg.path, t) is not None for t in ex.trial_folders(cfg.path))
    what = f"the {kept} trial(s) that finished are kept" if kept is not None else "the trials that finished are kept"
    return (f"the Ray cluster at {gcs} went away during search {cfg.name!r}; {what} in {cfg.path}; once a cluster "
            f"is up again: prunefuse search --resume {cfg.name} --storage {cfg.storage} --address {cfg.address}")


def _train_and_fit(cfg: SearchConfig, suite, space, user_weights, *, resume: bool, log, warm=None):
    """The Ray part of a search: shared artifacts, the dense base and control, the trials;
    returns Tune's results and the progress printer (None where no trial ran)."""
    if not resume:
        cfg.save()
    art = train_artifacts(cfg, suite, space, user_weights, log)
    dense = _saved_dense(cfg) if resume else None
    if dense is None:
        dense = measure_dense(cfg, suite, art)
        write_text(join(cfg.path, DENSE_FILE), json.dumps(dense, indent=1))
    log(f"dense base: {', '.join(f'{t} {v:.4g}' for t, v in dense['dense_val'].items())}; {dense['params']:,} params, "
        f"{dense['latency_ms']:.3f} ms @ batch {dense['latency_batch']}")
    if not (resume and _saved_json(cfg, CONTROL_FILE)):
        control = measure_control(cfg, suite, art, space, log)
        write_text(join(cfg.path, CONTROL_FILE), json.dumps(control, indent=1))
        tasks = ", ".join(f"{k.removeprefix(TASK_METRIC)} {v:.4g}" for k, v in control.items() if k.startswith(TASK_METRIC))
        log(f"dense control (the base fine-tuned as every trial is): {tasks}")
    if art.expert_metrics and not (resume and _saved_json(cfg, RECIPES_FILE)):
        write_text(join(cfg.path, RECIPES_FILE), json.dumps(measure_recipes(cfg, suite, art, space, log), indent=1))
    remaining = cfg.trials
    if resume:
        remaining = _settle_stopped_driver(cfg, dense, log)
    elif warm is not None:
        from .warm_start import carry_over

        carry_over(cfg, warm, study_url=ex.study_url(cfg), old_study_url=ex.study_url(warm),
                   floors=task_floors(cfg, dense), log=log)
    from .progress import ProgressPrinter

    results, printer = [], None
    if remaining is None or remaining > 0:
        printer = ProgressPrinter(remaining)
        results = make_tuner(cfg, suite, space, art, dense, trials=remaining, progress=printer).fit()
    return results, (printer if results else None)


def _settle_stopped_driver(cfg: SearchConfig, dense: dict, log) -> int | None:
    """How many trials are still to run after settling what the stopped driver left."""
    from .resume import reconcile

    ended = reconcile(cfg.path, ex.study_url(cfg), cfg.name, cfg.objectives, floors=task_floors(cfg, dense), log=log)
    ex.complete_result_logs(cfg.path, log=log)  # kept trials whose last report the stopped driver never logged
    if cfg.trials is None:
        log(f"resuming search {cfg.name!r} from {cfg.path}: {ended} trial(s) ended, a new --time-budget of "
            f"{cfg.time_budget_s:g} s for the rest")
        return None
    remaining = max(0, cfg.trials - ended)
    log(f"resuming search {cfg.name!r} from {cfg.path}: {ended} of {cfg.trials} trials ended, {remaining} to run")
    return remaining


def check_paths(cfg: SearchConfig) -> None:
    """The storage and the artifact cache are folders this driver can write: found before Ray starts."""
    from spaces.files import check_writable_folder

    if is_uri(cfg.storage):
        return
    check_writable_folder(cfg.storage, "--storage")
    check_writable_folder(artifact_cache(cfg), "artifact cache")
    for what, path in [("base checkpoint", cfg.base_checkpoint),
                       *((f"expert for task {t!r}", p) for t, p in (cfg.experts or {}).items())]:
        if path and not os.path.exists(path):  # a file, or a Hugging Face model folder
            raise PrunefuseError(f"{what} {path!r} not found")


def _saved_dense(cfg: SearchConfig) -> dict | None:
    return _saved_json(cfg, DENSE_FILE)


def _saved_json(cfg: SearchConfig, name: str) -> dict | None:
    """An experiment file the stopped driver wrote (a resume reuses it), or None."""
    try:
        return json.loads(read_text(join(cfg.path, name)))
    except (PrunefuseError, ValueError):
        return None


def _after_fit(cfg: SearchConfig, results, log) -> None:
    """Optuna trials still RUNNING when fit() returned (no Tune trial will ever tell them)
    become FAIL; a retried trial's earlier error is kept aside."""
    try:
        stale = ex.fail_stale_trials(ex.study_url(cfg), cfg.name)
    except Exception as exc:  # noqa: BLE001 (any storage error) the study is a by-product: say so, go on
        log(f"could not tidy the Optuna study: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        stale = 0
    if stale:
        log(f"marked {stale} Optuna trial(s) that did not end as failed")
    _keep_retried_errors_aside(results, log)


def _keep_retried_errors_aside(results, log=print) -> None:
    """A trial that failed, was retried (--retries) and then finished is a finished trial:
    Tune leaves the earlier failure in its error.txt, which readers take as "failed"; it
    moves to error_retried.txt."""
    for r in results:
        if r.error is not None or not (r.metrics or {}).get("final") or not r.path:
            continue
        fs = r.filesystem
        src, dst = f"{r.path}/error.txt", f"{r.path}/error_retried.txt"
        from pyarrow import fs as pafs

        try:
            if fs.get_file_info(src).type == pafs.FileType.File:
                fs.move(src, dst)
        except OSError as exc:  # the report would show the trial failed: say why it could not be fixed
            log(f"could not move {src} aside: {exc}")
