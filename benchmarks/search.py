"""Which sampler finds the better front for fewer trials: hypervolume against finished trials.

Every sampler Optuna ships that handles several objectives (and constraints) searches the
same space with the same budget, 3 seeds each: multi-objective TPE (multivariate, the
shipped default and a variant with fewer start-up trials), NSGA-II, the GP sampler
(log-EHVI; Optuna 5 takes several objectives and a constraints_func) and random. Trials
run in this process with plain Optuna (ask → `mtl_models.pipeline.apply_policy` → tell,
as `benchmarks/overhead.py` variant (a) does) on one cached base and its experts, with a
short fine-tune, so the run fits on 2 shared cores. Hypervolume is over (score, params):
latency under a shared machine's load is noise. One reference point for the suite: score
−100 (100% worse than the dense base) and the dense base's parameter count.

Printed: the table of mean hypervolume after 8 / 16 / 24 / 32 / 48 trials (± stdev over
seeds), the first trial count at which each sampler reaches random's 48-trial hypervolume
(mean curve), the sampler's own time per trial (ask + suggest) and the wall time per trial;
then the early-stopping row: the chosen sampler with and without the Pareto rule
(`search.pareto_stop.should_stop`, the rule `--early-stop pareto` applies) on a space with
`steps: 2`, at an equal budget of this process's CPU seconds (a fair clock on a loaded
machine; wall seconds shown too). The curves go to a self-contained plotly HTML figure.

Run: `.venv/bin/python benchmarks/search.py [--trials 48] [--seeds 0,1,2] [--out search.html]`;
`--quick` is the smoke run tests/test_benchmarks.py makes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import markdown_table, mean, setup_threads, stdev

SUITE = {"name": "multidigits", "train_pairs": 2500, "val_pairs": 500, "test_pairs": 200}
MODEL = {"trunk": "mlp", "width": 128}
TRAIN = {"epochs": 6, "expert_epochs": 2}
FINETUNE = {"epochs": 0.3}
MEASURE = {"latency_batch": 16, "runs": 1, "warmup": 0, "threads": 1}
# --quick: a suite and model small enough to train in seconds (workers read SEARCH_BENCH_QUICK).
QUICK = {"suite": {"train_pairs": 400, "val_pairs": 200, "test_pairs": 100}, "model": {"width": 32},
         "train": {"epochs": 1, "expert_epochs": 0.5}}
if os.environ.get("SEARCH_BENCH_QUICK"):
    SUITE, MODEL, TRAIN = {**SUITE, **QUICK["suite"]}, {**MODEL, **QUICK["model"]}, {**TRAIN, **QUICK["train"]}
SAMPLERS = ("tpe", "tpe-5", "nsga2", "gp", "random")
OBJECTIVES = [("score", "max"), ("params", "min")]
SCORE_REF = -100.0   # the reference point's score: 100% worse than the dense base
# Objectives as hypervolume sees them: params as a fraction of the dense base's (reference 1.0).


class Stopped(Exception):
    """Raised from on_step when the Pareto rule stops a trial at a rung."""


def make_sampler(name: str, seed: int, trials: int):
    import optuna

    from search.samplers import make_sampler as shipped

    if name == "tpe-5":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10, warn_independent_sampling=False)
    return shipped(name, seed=seed, trials=trials, floors=None)


def prepare(cache: str, space_spec: dict):
    from mtl_models import artifacts, suites
    from search.config import SearchConfig
    from search.tuner import build_space

    cfg = SearchConfig(name="bench", storage=cache, suite=SUITE, model=MODEL, train=TRAIN, space=space_spec)
    suite = suites.from_spec(cfg.suite)
    space = build_space(cfg, suite, suite.build_model(**cfg.model))
    art = artifacts.prepare(suite, cfg.model, artifacts.TrainSpec(**cfg.train), cache_dir=Path(cache, "_artifacts"),
                            experts=space.fuses, log=lambda m: print(f"  {m}", file=sys.stderr))
    return suite, space, art


def run_study(suite, space, art, *, sampler: str, seed: int, trials: int | None, budget_cpu_s: float | None = None,
              early_stop: bool = False) -> dict:
    """One search in this process; per finished trial: (score, params), sampler and wall seconds."""
    import optuna

    from mtl_models.pipeline import MeasureSpec, apply_policy
    from search.pareto_stop import should_stop

    senses = [s for _, s in OBJECTIVES]
    study = optuna.create_study(directions=["maximize" if s == "max" else "minimize" for s in senses],
                                sampler=make_sampler(sampler, seed, trials or 48))
    spec = MeasureSpec(**MEASURE)
    dense = dense_params(suite)
    points, sampler_s, wall_s, rungs, stopped = [], [], [], {}, 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    n = 0
    while (trials is None or n < trials) and (budget_cpu_s is None or time.process_time() - cpu0 < budget_cpu_s):
        n += 1
        t0 = time.perf_counter()
        trial = study.ask()
        policy = space.suggest(trial)
        sampler_s.append(time.perf_counter() - t0)

        def on_step(step, steps, metrics):
            if not early_stop or step == steps:
                return
            vector = [metrics[m] for m, _ in OBJECTIVES]
            if should_stop(vector, rungs.get(step, []), senses):
                raise Stopped
            rungs.setdefault(step, []).append(vector)

        try:
            _, metrics = apply_policy(suite, policy, art, measure_spec=spec, on_step=on_step)
        except Stopped:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            stopped += 1
            continue
        values = [float(metrics[m]) for m, _ in OBJECTIVES]
        study.tell(trial, values)
        points.append([values[0], values[1] / dense])
        wall_s.append(time.perf_counter() - t0)
    return {"points": points, "sampler_s": sampler_s, "wall_s": wall_s, "stopped": stopped, "started": n,
            "cpu_s": time.process_time() - cpu0, "wall": time.perf_counter() - wall0}


def dense_params(suite) -> int:
    return sum(p.numel() for p in suite.build_model(**MODEL).parameters())


_PREPARED = {}


def _job(job: tuple) -> tuple:
    """One (sampler, seed[, early stopping]) search, in a worker process (`--jobs`)."""
    cache, space_spec, kwargs = job
    key = (cache, repr(space_spec))
    if key not in _PREPARED:
        import warnings

        import optuna

        warnings.filterwarnings("ignore")
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        setup_threads(1)
        _PREPARED[key] = prepare(cache, space_spec)
    suite, space, art = _PREPARED[key]
    return run_study(suite, space, art, **kwargs)


def run_all(jobs: list[tuple], workers: int, results: Path | None = None) -> list[dict]:
    """Each job's result; with `results`, each is saved there as it ends and a saved one is reused
    (an interrupted run picks up where it stopped)."""
    import hashlib
    import json

    def saved(job) -> Path | None:
        return results / (hashlib.sha256(repr(job).encode()).hexdigest()[:16] + ".json") if results else None

    todo = [j for j in jobs if not (saved(j) and saved(j).is_file())]
    if os.environ.get("SEARCH_BENCH_REVERSE"):  # a second runner sharing --results takes the jobs from the end
        todo.reverse()
    out = {}
    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            out[repr(j)] = _job(j)
            _save(saved(j), out[repr(j)])
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_job, j): j for j in todo}
            for f in as_completed(futures):
                out[repr(futures[f])] = f.result()
                _save(saved(futures[f]), out[repr(futures[f])])
                print(f"  done: {futures[f][2]}", file=sys.stderr, flush=True)
    return [out[repr(j)] if repr(j) in out else json.loads(saved(j).read_text()) for j in jobs]


def _load(results: Path | None, job: tuple) -> dict | None:
    import hashlib
    import json

    path = results / (hashlib.sha256(repr(job).encode()).hexdigest()[:16] + ".json") if results else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _save(path: Path | None, result: dict) -> None:
    if path is not None:
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))


def curve(points, reference) -> list[float]:
    from reports.pareto import hypervolume_history

    senses = [s for _, s in OBJECTIVES]
    return list(hypervolume_history(points, senses, reference)) if points else []


def at(c: list[float], k: int) -> float:
    return c[min(k, len(c)) - 1] if c else 0.0


def first_reaching(c: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(c) if v >= target - 1e-12), None)


def figure(curves: dict[str, list[list[float]]], out: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, runs in curves.items():
        n = min(len(c) for c in runs)
        avg = [mean(c[i] for c in runs) for i in range(n)]
        fig.add_scatter(x=list(range(1, n + 1)), y=avg, mode="lines", name=f"{name} (mean of {len(runs)} seeds)")
    fig.update_layout(title="Hypervolume of (score, params) against finished trials", xaxis_title="finished trials",
                      yaxis_title="hypervolume (score − ref × params saved)", template="plotly_white")
    out.write_text(fig.to_html(include_plotlyjs=True, full_html=True))


def sampler_table(runs: dict, samplers, seeds, trials: int, reference) -> tuple[str, dict]:
    """The markdown table of hypervolume against trials; runs: (sampler, seed) -> result (missing: not run)."""
    curves = {n: [curve(runs[n, s]["points"], reference) for s in seeds if runs.get((n, s))] for n in samplers}
    curves = {n: cs for n, cs in curves.items() if cs}
    mean_curve = {n: [mean(at(c, k) for c in cs) for k in range(1, trials + 1)] for n, cs in curves.items()}
    target = mean_curve["random"][-1] if "random" in mean_curve else None
    marks = [k for k in (8, 16, 24, 32, 48) if k <= trials]
    header = ["sampler", "seeds", *(f"HV @{k}" for k in marks), f"reaches random's HV @{trials} at",
              "sampler ms / trial", "wall s / trial"]
    rows = []
    for name, cs in curves.items():
        done = [runs[name, s] for s in seeds if runs.get((name, s))]
        reach = first_reaching(mean_curve[name], target) if target is not None else None
        rows.append([name, ",".join(str(s) for s in seeds if runs.get((name, s))),
                     *(f"{mean(at(c, k) for c in cs):.2f} ± {stdev(at(c, k) for c in cs):.2f}" for k in marks),
                     f"{reach} trials" if reach else f"not within {trials}",
                     f"{1000 * mean(x for r in done for x in r['sampler_s']):.0f}",
                     f"{mean(x for r in done for x in r['wall_s']):.2f}"])
    return markdown_table(header, rows), curves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=48)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--parts", default="samplers,es", help="samplers (the table) and / or es (the early-stopping row)")
    p.add_argument("--chosen", default="tpe", help="the sampler the early-stopping row runs")
    p.add_argument("--es-trials", type=int, default=16, help="trials of the run without early stopping")
    p.add_argument("--cache", default=str(ROOT / "runs"), help="storage whose _artifacts to reuse")
    p.add_argument("--out", default=str(ROOT / "runs" / "search_benchmark.html"))
    p.add_argument("--results", default=None, help="a folder keeping each search's result: a rerun reuses them")
    p.add_argument("--available", action="store_true", help="with --results: tables from the saved results only")
    p.add_argument("--jobs", type=int, default=2, help="searches run side by side (each one torch thread)")
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny suite, 4 trials, 1 seed, 2 samplers")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.seeds, args.samplers, args.es_trials, args.jobs = 4, "0", "tpe,random", 3, 1
        os.environ["SEARCH_BENCH_QUICK"] = "1"
        SUITE.update(QUICK["suite"]), MODEL.update(QUICK["model"]), TRAIN.update(QUICK["train"])
    import warnings

    import optuna

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    setup_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    samplers = args.samplers.split(",")
    parts = args.parts.split(",")
    results = Path(args.results) if args.results else None
    reference = [SCORE_REF, 1.0]
    started = time.time()

    def run(jobs):
        if args.available:
            return [_load(results, j) for j in jobs]
        return run_all(jobs, args.jobs, results)

    space_spec = {"finetune": FINETUNE}
    if not args.available:
        prepare(args.cache, space_spec)   # trains the base and experts once, before any worker
    if "samplers" in parts:
        keys = [(name, seed) for seed in seeds for name in samplers]
        runs = dict(zip(keys, run([(args.cache, space_spec, {"sampler": n, "seed": s, "trials": args.trials})
                                   for n, s in keys])))
        table, curves = sampler_table(runs, samplers, seeds, args.trials, reference)
        print(f"Hypervolume of (score, params / dense params), reference ({SCORE_REF:g}, 1); mean ± stdev over "
              f"the seeds shown; {args.trials} trials each")
        print(table)
        figure(curves, Path(args.out))
        print(f"\nfigure: {args.out}")
    if "es" in parts:
        es_row(args, seeds, reference, run)
    print(f"total {time.time() - started:.0f} s")
    return 0


def es_row(args, seeds, reference, run) -> None:
    """The chosen sampler on a space with two pruning steps, without and with the Pareto rule at equal CPU s."""
    es_spec = {"finetune": FINETUNE, "pruning": {"steps": 2}}
    plains = run([(args.cache, es_spec, {"sampler": args.chosen, "seed": s, "trials": args.es_trials}) for s in seeds])
    pairs = [(s, p) for s, p in zip(seeds, plains) if p]
    stops = run([(args.cache, es_spec, {"sampler": args.chosen, "seed": s, "trials": None, "budget_cpu_s": p["cpu_s"],
                                        "early_stop": True}) for s, p in pairs])
    rows, wins, n = [], 0, 0
    for (seed, plain), stop in zip(pairs, stops):
        if not stop:
            continue
        n += 1
        hv_plain, hv_stop = at(curve(plain["points"], reference), 10 ** 6), at(curve(stop["points"], reference), 10 ** 6)
        wins += hv_stop >= hv_plain
        rows.append([seed, f"{plain['started']} ({plain['cpu_s']:.0f} CPU s, {plain['wall']:.0f} s)", f"{hv_plain:.2f}",
                     f"{stop['started']}, {stop['stopped']} stopped ({stop['cpu_s']:.0f} CPU s, {stop['wall']:.0f} s)",
                     f"{hv_stop:.2f}"])
    print(f"\n{args.chosen} with `steps: 2`, without and with the Pareto early-stopping rule at equal CPU seconds; "
          f"front hypervolume with early stopping >= without in {wins} of {n} seeds")
    print(markdown_table(["seed", "without: trials", "HV", "--early-stop pareto: trials", "HV"], rows))


if __name__ == "__main__":
    sys.exit(main())
