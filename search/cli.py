"""`prunefuse`: search, report, export, apply.

Errors a user can cause end in one line on stderr and exit code 2; nothing already
written is lost (every file is written whole or not at all).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import yaml

from spaces.errors import PrunefuseError
from spaces.files import check_plain_name
from spaces.vocabulary import MEAN_SCORE, POLICY_FILE, REPORT_FILE, suite_spec

from .config import FLAGS, SETTINGS
from .samplers import SAMPLERS


def _key_values(pairs: list[str] | None, flag: str) -> dict:
    """`["width=64", "depth=2"]` -> {"width": 64, "depth": 2}; values parsed as YAML scalars."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrunefuseError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise PrunefuseError(f"{flag} {pair!r}: value is not a valid YAML scalar") from None
        if isinstance(out[key], float) and not math.isfinite(out[key]):
            raise PrunefuseError(f"{flag} {pair!r}: expected a finite number")
    return out


def finite_float(text: str) -> float:
    """argparse type for every float flag: NaN and inf pass `<=` checks, so they are refused here."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes (a missing -o, an unknown flag) in the same one-line form as ours."""

    def error(self, message):
        verb = self.prog.removeprefix("prunefuse").strip()
        self.exit(2, f"prunefuse: error: {verb + ': ' if verb else ''}{message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prunefuse", description="Search prune / fuse policies for multi-task models.")
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("search", help="run a search (the default: multidigits, embedded local Ray)")

    def setting(field, **kwargs):  # a flag that sets one SearchConfig field as typed (dest = the field)
        s.add_argument(FLAGS[field], dest=field, **kwargs)

    s.add_argument(FLAGS["suite"], default="multidigits", help="multidigits | synthetic | tabular | images | scenes | sequences | package.module:function")
    s.add_argument("--suite-option", action="append", metavar="KEY=VALUE", help="a suite option, e.g. offset=1")
    s.add_argument("--trunk", default="mlp", help="a built-in trunk (mlp, cnn, resnet, mobilenet, vit, transformer) or a library's: timm:NAME, "
                   "torchvision:NAME, hf:MODEL_TYPE (random weights; docs/zoo.md)")
    s.add_argument(FLAGS["model"], action="append", metavar="KEY=VALUE", help="a trunk option, e.g. width=128; for a library trunk, passed to its constructor or config")
    s.add_argument(FLAGS["train"], action="append", metavar="KEY=VALUE",
                   help="how the dense base is trained: epochs, lr, batch_size, expert_epochs, expert_lr, seed, "
                        "precision (fp32 | bf16 | fp16)")
    s.add_argument(FLAGS["measure"], action="append", metavar="KEY=VALUE",
                   help="latency measurement: latency_batch, threads, runs, warmup")
    s.add_argument(FLAGS["space"], help="a search space YAML file (see README)")
    s.add_argument("--latency-backend", default=None, metavar="BACKEND",
                   help="where latency is timed: torch (eager, the default) or onnxruntime (the exported graph); "
                        "the dense base is timed the same way")
    setting("tracking", default=None, metavar="mlflow[=URI]",
                   help="log every trial to MLflow (default store: sqlite EXPERIMENT/mlflow.db; mlflow=http://host:5000 for a server)")
    s.add_argument(FLAGS["trials"], type=int, default=None, help="number of trials (default 48)")
    setting("time_budget_s", type=finite_float, default=None, metavar="S", help="stop starting trials after S seconds")
    setting("address", default=None, help="auto | HOST:PORT of a Ray cluster (default: embedded local Ray)")
    setting("storage", default="runs", help="folder or URI holding experiments (default ./runs)")
    s.add_argument(FLAGS["name"], default=None, help="experiment name (default: SUITE-DATE-TIME)")
    s.add_argument("--resume", metavar="NAME", default=None, help="continue the search NAME whose driver died")
    setting("cpus_per_trial", type=finite_float, default=1.0)
    setting("gpus_per_trial", type=finite_float, default=0.0, help="fractions share a GPU, e.g. 0.5")
    setting("max_concurrent", type=int, default=None)
    setting("sampler", default="tpe", help=" | ".join(SAMPLERS))
    s.add_argument(FLAGS["objectives"], default=None,
                   help="NAME:max|min, comma-separated; score = the mean oriented task score (0 = the dense base). "
                        "Default score:max,params:min,latency_ms:min, with nonzero_params for params where the "
                        "space may prune unstructured")
    setting("seed", type=int, default=0)
    setting("max_task_drop", type=finite_float, default=None, metavar="POINTS",
                   help="per-task floor: trials whose oriented score on any task is below -POINTS "
                        "(percent worse than the dense base) are infeasible")
    setting("early_stop", choices=("asha", "pareto"), default=None,
                   help="stop weak trials between pruning steps (space pruning.steps > 1): asha = on the score "
                        "alone; pareto = by non-dominated rank over every objective")
    setting("early_stop_keep", type=finite_float, default=0.5, metavar="FRACTION",
                   help="--early-stop pareto: the fraction of the trials at each step kept, by rank (default 0.5)")
    setting("warm_start", default=None, metavar="EXPERIMENT",
                   help="seed the study with the finished trials of an earlier experiment (a folder, or a name "
                        "under --storage) whose suite, model, training and space are the same")
    setting("retries", type=int, default=0, help="retry a failing trial this many times")
    setting("references", action="store_true", help="train single-task references; Δm is measured against them")
    setting("base_checkpoint", default=None,
            help="start from this backbone or trained base: a torch state dict (.pt/.pth/.bin), .safetensors "
                 "(or a sharded *.index.json) or a Hugging Face model folder; library key names are mapped")
    s.add_argument(FLAGS["experts"], action="append", metavar="TASK=PATH",
                   help="one per task: a copy of the --base-checkpoint backbone fine-tuned on TASK (same formats, "
                        "with or without its head); merged instead of experts prunefuse would fine-tune")
    s.add_argument("--data", default=None, help="tabular suite: a CSV or Parquet file; images suite: a table "
                   "(CSV / Parquet / Arrow) of image paths and labels, or a folder CLASS/*.png")
    s.add_argument("--image-column", default=None, help="images suite: the table's column of image paths (default path)")
    s.add_argument("--features", default=None, help="tabular suite: comma-separated feature columns")
    s.add_argument("--task", action="append", metavar="NAME:KIND:COLUMN",
                   help="tabular suite: one per task; KIND classification | regression | multilabel "
                        "(multilabel: NAME:multilabel:COL1,COL2,...)")
    s.add_argument("--no-report", action="store_true", help="skip writing report.html and policy.yaml at the end")

    r = sub.add_parser("report", help="write the HTML Pareto report of an experiment")
    r.add_argument("experiment")
    r.add_argument("-o", "--output", default=None, help="default: EXPERIMENT/report.html")
    r.add_argument("--remeasure", action="store_true", help="re-time the front's models one at a time first")
    r.add_argument("--latency-backend", default=None, metavar="BACKEND",
                   help="with --remeasure: time in torch or onnxruntime (default: the search's), the dense base too")

    e = sub.add_parser("export", help="export one trial's policy as YAML")
    e.add_argument("experiment")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--trial", default=None, help="a trial id")
    how.add_argument("--knee", action="store_true", help="the front's knee (normalised objectives, nearest the ideal)")
    e.add_argument("--max-task-drop", type=finite_float, default=None, metavar="POINTS",
                   help="per-task floors for this export (default: the search's): no task's oriented score more "
                        "than POINTS below its reference")
    e.add_argument("--floors-vs", choices=("dense", "control"), default="dense",
                   help="what floors are measured against: the dense base (default, as the search's constraints "
                        "were) or the dense control (the base fine-tuned as every trial is)")
    e.add_argument("--max-params", type=finite_float, default=None)
    e.add_argument("--max-latency-ms", type=finite_float, default=None)
    e.add_argument("--min-score", type=finite_float, default=None,
                   help="the mean oriented task score at least this (0 = the dense base, -2 = 2%% worse)")
    e.add_argument("--min-task", action="append", metavar="TASK=VALUE", help="a per-task bound on its metric, e.g. left=0.9 (a floor; a ceiling for a lower-is-better metric such as mae)")
    e.add_argument("-o", "--output", required=True)

    a = sub.add_parser("apply", help="rebuild the compressed model from a policy and save it")
    a.add_argument("policy")
    a.add_argument("-o", "--output", required=True, help="folder for model.pt, policy.yaml, metrics.json")
    a.add_argument("--cache", default=None,
                   help="where trained bases are cached (default: the cache of the search the policy came from, "
                        "when its experiment is reachable here, else runs/_artifacts)")
    a.add_argument("--threads", type=int, default=1, help="CPU threads (the search's trials used --cpus-per-trial)")
    a.add_argument("--latency-backend", default=None, metavar="BACKEND",
                   help="time in torch or onnxruntime (default: the backend the policy's trial was timed with)")
    a.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to train and time (default: the device the policy's trial ran on, where there is one)")
    return p


def cmd_search(args) -> int:
    from .config import SearchConfig, parse_objectives
    from spaces.files import join
    from .experiment import finished_line, search_over
    from .tuner import run_search

    if args.resume:
        _only_resume_flags(args)
        cfg = SearchConfig.load(join(args.storage, check_plain_name(args.resume, "--resume")))
        if args.address:
            cfg = cfg.replace(address=args.address)
        if search_over(cfg):  # its report and policy stay as they are
            print(finished_line(cfg))
            return 0
        path = run_search(cfg, resume=True)
    else:
        cfg = SearchConfig(
            name=args.name if args.name is not None else
            f"{args.suite.replace(':', '_').replace('.', '_')}-{time.strftime('%Y%m%d-%H%M%S')}",
            suite=suite_spec(args.suite, _suite_options(args)), model=_model_spec(args),
            space=_space(args.space), objectives=parse_objectives(args.objectives) if args.objectives else None,
            trials=args.trials if args.trials is not None else (None if args.time_budget_s else 48),
            train=_key_values(args.train_option, "--train-option"),
            measure={**_key_values(args.measure_option, "--measure-option"),
                     **({"latency_backend": args.latency_backend} if args.latency_backend else {})},
            experts=_experts(args.experts), **{field: getattr(args, field) for field in SETTINGS})
        path = run_search(cfg)
    if not args.no_report:
        _report_and_export(path)
    return 0


def _model_spec(args) -> dict:
    """--trunk and --model-option; an hf: trunk takes a Hugging Face --base-checkpoint folder's config.json."""
    from mtl_models.models.pretrained import model_spec_from_checkpoint

    return model_spec_from_checkpoint({"trunk": args.trunk, **_key_values(args.model_option, "--model-option")},
                                      args.base_checkpoint)


def _experts(pairs: list[str] | None) -> dict[str, str] | None:
    """`--experts left=a.safetensors` -> {"left": "a.safetensors"}: paths stay strings."""
    out = {}
    for pair in pairs or []:
        task, sep, path = pair.partition("=")
        if not sep or not task or not path:
            raise PrunefuseError(f"--experts expects TASK=PATH, got {pair!r}")
        if task in out:
            raise PrunefuseError(f"--experts names task {task!r} twice; one expert per task")
        out[task] = path
    return out or None


def _only_resume_flags(args) -> None:
    """A resumed search keeps what it was asked; a flag that would change it is refused, not dropped."""
    defaults = vars(_parser().parse_args(["search"]))
    allowed = {"resume", "storage", "address", "no_report", "verb"}
    changed = sorted(k for k, v in vars(args).items() if k not in allowed and v != defaults.get(k))
    if changed:
        flags = ", ".join(sorted(FLAGS.get(k, "--" + k.replace("_", "-")) for k in changed))
        raise PrunefuseError(f"--resume continues the search as it was asked; {flags} cannot change it "
                             f"(only --storage, --address and --no-report go with --resume)")


def _suite_options(args) -> dict:
    options = _key_values(args.suite_option, "--suite-option")
    if args.suite == "tabular":
        if not args.data or not args.features or not args.task:
            raise PrunefuseError("--suite tabular needs --data FILE, --features a,b,c and at least one --task NAME:KIND:COLUMN")
        options.update(path=os.path.abspath(args.data), features=[c.strip() for c in args.features.split(",") if c.strip()],
                       tasks=list(args.task))
    elif args.suite == "images":
        if not args.data or args.features:
            raise PrunefuseError("--suite images needs --data TABLE_OR_FOLDER (with --image-column COLUMN and "
                                 "--task NAME:KIND:COLUMN for a table); --features belongs to --suite tabular")
        options.update(path=os.path.abspath(args.data), **({"tasks": list(args.task)} if args.task else {}),
                       **({"image_column": args.image_column} if args.image_column else {}))
    elif args.data or args.features or args.task:
        raise PrunefuseError("--data, --features and --task belong to --suite tabular or --suite images")
    if args.image_column and args.suite != "images":
        raise PrunefuseError("--image-column belongs to --suite images")
    return options


def _space(path):
    from spaces import SpaceSpec

    return SpaceSpec.from_yaml(path).model_dump(mode="json") if path else {}


def _report_and_export(path) -> None:
    """The end of a search: the front re-timed in one process (local storage), then report.html
    and the knee's policy.yaml inside the experiment (written through `config.write_text`, so
    a URI storage gets them too)."""
    from reports import experiment, select
    from reports.html import build_report

    from spaces.files import is_uri, join, write_text

    latency_source = None
    if not is_uri(str(path)):
        from .remeasure import remeasure_front

        print("re-timing the front and the dense base in one process ...")
        try:
            latency_source, mismatched = remeasure_front(path, log=lambda *a: None)
        except PrunefuseError as exc:  # the search's own timings stand; say why they were kept
            print(f"front not re-timed ({exc}); latency shown is the search's")
            mismatched = []
        for line in mismatched:
            print(f"warning: {line}")
    report = join(path, REPORT_FILE)
    write_text(report, build_report(path, latency_source=latency_source))
    print(f"report: {report}")
    df = experiment.load_experiment(path)
    objectives = experiment.objectives(path)
    if experiment.unreadable_note(df):
        print(experiment.unreadable_note(df))
    try:
        row = select.by_knee(df, objectives, path)
    except PrunefuseError as exc:
        print(f"no policy exported: {exc}")
        return
    out = join(path, POLICY_FILE)
    write_text(out, select.policy_of(row, path, objectives).to_yaml())
    print(f"knee policy (trial {row['trial_id']}: score {row[MEAN_SCORE]:+.2f}, {int(row['params']):,} params, "
          f"{row['latency_ms']:.3f} ms): {out}")
    from .config import SearchConfig
    from .shared_artifacts import artifact_cache

    cache = artifact_cache(SearchConfig.load(path))
    hint = "" if os.path.abspath(cache) == os.path.abspath(os.path.join("runs", "_artifacts")) else f" --cache {cache}"
    print(f"next: prunefuse apply {out} -o {join(path, 'model')}{hint}")


def cmd_report(args) -> int:
    from reports.html import write_report

    from spaces.files import check_writable_file

    from spaces.files import is_uri, join

    output = args.output or (join(args.experiment, REPORT_FILE) if not is_uri(str(args.experiment)) else None)
    if output and not is_uri(str(output)):
        check_writable_file(output, "-o" if args.output else "report")
    latency_source, mismatched = None, []
    if args.latency_backend and not args.remeasure:
        raise PrunefuseError("--latency-backend re-times the front: it goes with --remeasure")
    if args.remeasure:
        from .remeasure import remeasure_front

        latency_source, mismatched = remeasure_front(args.experiment, backend=args.latency_backend)
    print(f"report: {write_report(args.experiment, args.output, latency_source=latency_source)}")
    if mismatched:
        raise PrunefuseError(f"{len(mismatched)} front model(s) rebuilt are not the ones their trials measured, "
                             f"first {mismatched[0]}")
    return 0


def cmd_export(args) -> int:
    from reports import experiment, select
    from spaces.files import check_writable_file

    check_writable_file(args.output, "-o")
    df = experiment.load_experiment(args.experiment)
    objectives = experiment.objectives(args.experiment)
    floors = {}
    for task, value in _key_values(args.min_task, "--min-task").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrunefuseError(f"--min-task {task}={value!r}: expected a number, e.g. {task}=0.9")
        floors[task] = float(value)
    if args.max_task_drop is not None and args.max_task_drop < 0:
        raise PrunefuseError(f"--max-task-drop {args.max_task_drop}: expected 0 or more points")
    rec = experiment.records(args.experiment)  # the experiment's own files, read once
    drop = args.max_task_drop if args.max_task_drop is not None else rec.config.get("max_task_drop")
    task_drop = (drop, args.floors_vs) if drop is not None else None
    if task_drop:
        select.floor_references(rec, args.floors_vs)  # no control recorded: one line, now
    constraints = dict(max_params=args.max_params, max_latency_ms=args.max_latency_ms,
                       min_score=args.min_score, task_floors=floors or None)
    limited = any(v is not None for v in constraints.values())
    if limited and (args.trial or args.knee):
        raise PrunefuseError("choose one way: --trial ID, --knee, or constraints (--max-params, --max-latency-ms, "
                             "--min-score, --min-task), not several")
    if (limited or args.knee) and not args.trial and experiment.unreadable_note(df):
        print(experiment.unreadable_note(df))  # the front below is computed without them: say so
    if args.trial:
        row = select.by_trial(df, args.trial)
    elif limited:
        row = select.by_constraints(df, objectives, rec, **constraints, floors=task_drop)
    elif args.knee:
        row = select.by_knee(df, objectives, rec, task_drop)
    else:
        raise PrunefuseError("say which policy: --trial ID, --knee, or constraints (--max-params, --max-latency-ms, "
                             "--min-score, --min-task)")
    select.policy_of(row, args.experiment, objectives).to_yaml(args.output)
    print(f"exported trial {row['trial_id']} (score {row[MEAN_SCORE]:+.2f}, {int(row['params']):,} params, "
          f"{row['latency_ms']:.3f} ms) to {args.output}")
    return 0


def cmd_apply(args) -> int:
    from spaces import Policy

    if args.threads < 1:
        raise PrunefuseError(f"--threads {args.threads}: expected 1 or more")

    policy = Policy.from_yaml(args.policy)
    from mtl_models.apply import apply_and_save

    apply_and_save(policy, args.output, cache=_apply_cache(args, policy), threads=args.threads, device=args.device,
                   latency_backend=args.latency_backend)
    return 0


def _apply_cache(args, policy) -> str:
    """`--cache`, else the cache of the search the policy came from (its very base and experts:
    retrained in another process they would differ in the last digits), else runs/_artifacts."""
    if args.cache is not None:
        return args.cache
    from .shared_artifacts import search_cache_of

    found = search_cache_of(policy, args.policy)
    if found is None:
        return os.path.join("runs", "_artifacts")
    cache, where = found
    print(f"using the artifact cache of the search {where}: {cache}")
    return cache


def os_error_line(exc: OSError) -> str:
    """`cannot write 'runs/x/report.html': No space left on device` from any OSError."""
    import errno

    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = f"{exc.strerror} (read-only or not writable)"
    where = f" {exc.filename!r}" if exc.filename else ""
    return f"cannot use{where}: {reason}"


VERBS = {"search": cmd_search, "report": cmd_report, "export": cmd_export, "apply": cmd_apply}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return VERBS[args.verb](args)
    except PrunefuseError as exc:
        print(f"prunefuse: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write (or read) the system refused: which path, and why
        print(f"prunefuse: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunefuse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
