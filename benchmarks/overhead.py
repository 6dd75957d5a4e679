"""What Ray Tune costs a search: the same N trials three ways, as a markdown table.

(a) a plain in-process Optuna loop calling `mtl_models.pipeline.apply_policy` (one trial at
    a time, one torch thread, as a 1-CPU trial uses);
(b) `search.tuner.run_search` on an embedded Ray (all CPUs here, 1 CPU per trial);
(c) `run_search` against a 2-node local cluster (1 CPU a node, started here and stopped).

Same trials: the default search (multidigits, MLP trunk, default space; 48 trials, as
`prunefuse search` runs) with Optuna's RandomSampler and one seed, so every variant
evaluates the same N policies in the same order. The shared artifacts are trained into a
cache before any timing, and every variant reuses them.

Each variant runs in a fresh Python process, as a user would start it, and its wall time
runs from that process's launch to its last trial's result: imports, suite, artifacts from
the cache and (b) Ray's start-up all count. (c)'s cluster is started before its clock.

Columns: wall; median / mean overhead = a trial's wall time on the driver (start → complete
for Tune, ask → tell for the loop) minus the time inside the cycle (`cycle_s`); all-in
overhead = (wall × parallel slots − Σ cycle_s) / N, which also counts start-up, scheduling
and idle slots; timing-lock wait = the time a trial's timing sections waited for the
machine's timing lock (latency is timed alone: mtl_models/timing_lock.py), summed over its
steps. Run: `.venv/bin/python benchmarks/overhead.py [--trials 48] [--tiny]`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = dict(suite={"train_pairs": 1500, "val_pairs": 300, "test_pairs": 300}, model={"width": 64},
            train={"epochs": 2, "expert_epochs": 1})


def make_config(args, name: str, storage: str, address=None):
    from search.config import SearchConfig

    cfg = SearchConfig(name=name, storage=storage, trials=args.trials, sampler="random", seed=args.seed,
                       cpus_per_trial=1.0, address=address)
    if args.tiny:  # a frozen config: changed by a validated copy
        cfg = cfg.replace(suite={**cfg.suite, **TINY["suite"]}, model={**cfg.model, **TINY["model"]},
                          train={**cfg.train, **TINY["train"]})
    return cfg


def prepare(cfg):
    """Suite, space and artifacts, trained into the cache once (not timed)."""
    from mtl_models import artifacts
    from search.shared_artifacts import artifact_cache
    from search.tuner import prepare_inputs

    suite, space, _ = prepare_inputs(cfg)
    art = artifacts.prepare(suite, cfg.model, artifacts.TrainSpec(**cfg.train), cache_dir=artifact_cache(cfg),
                            experts=space.fuses, log=lambda m: print(f"  {m}", file=sys.stderr))
    return suite, space, art


def plain_loop(args, storage, launched):
    """(a): ask → apply_policy → tell, in this process."""
    import optuna
    import torch

    from mtl_models import artifacts, suites
    from mtl_models.pipeline import MeasureSpec, apply_policy
    from search.shared_artifacts import artifact_cache
    from search.tuner import build_space

    cfg = make_config(args, "plain", storage)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    suite = suites.from_spec(cfg.suite)
    space = build_space(cfg, suite, suite.build_model(**cfg.model))
    art = artifacts.prepare(suite, cfg.model, artifacts.TrainSpec(**cfg.train), cache_dir=artifact_cache(cfg),
                            experts=space.fuses, log=lambda m: None)
    study = optuna.create_study(directions=["maximize" if s == "max" else "minimize" for _, s in cfg.objectives],
                                sampler=optuna.samplers.RandomSampler(seed=cfg.seed))
    walls, cycles, waits = [], [], []
    for _ in range(cfg.trials):
        t0 = time.perf_counter()
        trial = study.ask()
        policy = space.suggest(trial)
        c0 = time.perf_counter()
        _, metrics = apply_policy(suite, policy, art, measure_spec=MeasureSpec(**{**cfg.measure, "threads": 1}))
        cycles.append(time.perf_counter() - c0)
        waits.append(metrics.get("lock_wait_s", 0.0))
        study.tell(trial, [metrics[m] for m, _ in cfg.objectives])
        walls.append(time.perf_counter() - t0)
    wall = time.time() - launched
    return dict(wall=wall, slots=1, walls=walls, cycles=cycles, waits=waits)


def through_prunefuse(args, storage, launched, name, address=None, slots=2):
    """(b) / (c): the search as the CLI runs it; per-trial times from finished.json + result.json."""
    from search.tuner import run_search

    cfg = make_config(args, name, storage, address)
    with contextlib.redirect_stdout(sys.stderr):  # the per-trial lines; stdout keeps the table
        path = run_search(cfg, log=lambda m: print(f"  {m}", file=sys.stderr))
    wall = time.time() - launched
    done = json.loads(Path(path, "finished.json").read_text())
    walls, cycles, waits = [], [], []
    for trial_id, trial_wall in done["trial_wall_s"].items():
        rows = [json.loads(x) for x in Path(path, f"trial_{trial_id}", "result.json").read_text().splitlines() if x]
        final = [r for r in rows if r.get("final")]
        if final:
            walls.append(trial_wall)
            cycles.append(final[-1]["cycle_s"])
            # Each step's timing section waited this long for the machine's timing lock.
            waits.append(sum(r.get("lock_wait_s", 0.0) for r in rows))
    return dict(wall=wall, slots=slots, walls=walls, cycles=cycles, waits=waits)


def in_fresh_process(args, variant: str, storage: str, name: str | None = None, address: str | None = None) -> dict:
    """Run one variant in a new Python process; its clock starts here, before the launch."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-variant", variant, "--cache", storage,
           "--trials", str(args.trials), "--seed", str(args.seed), "--launched", repr(time.time())]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--name", name] if name else []
    cmd += ["--address", address] if address else []
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_AUTH_MODE"] = "token"  # the local cluster below takes the default token
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
    line = next(x for x in reversed(out.splitlines()) if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


class LocalCluster:
    """Two `ray start --block` nodes (1 CPU each), each in its own session; killed by session id."""

    def __init__(self):
        import socket
        import subprocess

        self.dir = Path(tempfile.mkdtemp(prefix="pfbench", dir="/tmp"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # Token auth with the default token (~/.ray/auth_token), which the variant's driver also reads.
        self.env.update(RAY_AUTH_MODE="token")
        ray_cli = str(Path(sys.executable).parent / "ray")
        self.procs = []
        for i, extra in enumerate((["--head", f"--port={self.port}", "--include-dashboard=false"],
                                   [f"--address={self.address}"])):
            log = self.dir / f"node{i}.log"
            self.procs.append(subprocess.Popen(
                [ray_cli, "start", "--block", "--num-cpus=1", f"--temp-dir={self.dir / f'n{i}'}",
                 "--disable-usage-stats", *extra], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True))
            deadline = time.time() + 120
            while "Ray runtime started" not in log.read_text():
                if time.time() > deadline or self.procs[-1].poll() is not None:
                    self.stop()
                    raise RuntimeError(f"ray node {i} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)

    def stop(self):
        import shutil
        import signal

        for p in self.procs:
            for _ in range(100):
                pids = _session_pids(p.pid)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _session_pids(sid: int) -> list[int]:
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


def row(label: str, r: dict, n: int) -> str:
    over = [w - c for w, c in zip(r["walls"], r["cycles"])]
    all_in = (r["wall"] * r["slots"] - sum(r["cycles"])) / n
    return (f"| {label} | {r['slots']} | {len(r['cycles'])} | {r['wall']:.1f} | {statistics.median(r['cycles']):.2f} | "
            f"{statistics.median(over):.2f} | {statistics.mean(over):.2f} | {all_in:.2f} | {n / r['wall'] * 3600:.0f} | "
            f"{statistics.median(r.get('waits') or [0.0]):.3f} | {max(r.get('waits') or [0.0]):.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny suite and model (a quick smoke run)")
    p.add_argument("--variants", default="a,b,c", help="which of a,b,c to run")
    p.add_argument("--cache", default=None, help="storage folder whose _artifacts to reuse (default: a temp folder)")
    # Internal: run one variant in this (fresh) process and print its result as JSON.
    p.add_argument("--run-variant", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if args.run_variant:
        if args.run_variant == "a":
            result = plain_loop(args, args.cache, args.launched)
        else:
            result = through_prunefuse(args, args.cache, args.launched, args.name, address=args.address)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    storage = args.cache or tempfile.mkdtemp(prefix="pf-overhead-")
    stamp = time.strftime("%H%M%S")
    print(f"preparing the shared artifacts in {storage}/_artifacts ...", file=sys.stderr)
    prepare(make_config(args, "prepare", storage))
    results = {}
    variants = args.variants.split(",")
    if "a" in variants:
        print("(a) plain Optuna loop ...", file=sys.stderr)
        results["a"] = in_fresh_process(args, "a", storage)
    if "b" in variants:
        print("(b) prunefuse on an embedded Ray ...", file=sys.stderr)
        results["b"] = in_fresh_process(args, "b", storage, name=f"embedded-{stamp}")
    if "c" in variants:
        print("(c) prunefuse on a 2-node local cluster ...", file=sys.stderr)
        cluster = LocalCluster()
        try:
            results["c"] = in_fresh_process(args, "c", storage, name=f"cluster-{stamp}", address=cluster.address)
        finally:
            cluster.stop()
    labels = {"a": "(a) plain Optuna loop, in-process", "b": "(b) prunefuse, embedded Ray (2 CPUs)",
              "c": "(c) prunefuse, 2-node local cluster (1 CPU each)"}
    what = "tiny suite" if args.tiny else "default search"
    print(f"\n{args.trials} trials, {what}, RandomSampler(seed={args.seed}), 1 CPU per trial, "
          f"{os.cpu_count()} cores\n")
    print("| variant | parallel slots | trials done | wall (s) | median cycle (s) | median overhead (s) | "
          "mean overhead (s) | all-in overhead per trial (s) | trials / hour | median timing-lock wait (s) | "
          "max timing-lock wait (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in ("a", "b", "c"):
        if key in results:
            print(row(labels[key], results[key], args.trials))
    if "a" in results and "b" in results:
        print(f"\n(b) wall / (a) wall = {results['b']['wall'] / results['a']['wall']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
