"""Fusion benchmark: merge per-task experts with default and searched coefficients.

    .venv/bin/python benchmarks/fusion.py                 # both suites, seeds 0 1 2, 30 trials
    .venv/bin/python benchmarks/fusion.py --suites multidigits --seeds 0 --trials 10
    .venv/bin/python benchmarks/fusion.py --parts bn       # BatchNorm statistics after a merge only

For each suite and seed, `artifacts.prepare(experts=True)` trains the jointly trained
multi-task base (MLP trunk) and fine-tunes one expert per task from it; every row then
builds its model with `pipeline.start_model` (the trunk merged by `fusion.merge`, each head
from its own expert), with no post-merge fine-tune and no pruning: pure merging. Every
choice (λ grids, the searched policy) is made on the validation split; the tables report
the test split. The metric is the mean over tasks of each task's metric (accuracy, R²).

Suites:
  multidigits           default options (tasks left, right: accuracy; sum: R²)
  synthetic-conflict    synthetic, tasks=3, correlation=-0.5: w_2 and w_3 have cosine -0.5
                        with w_1 (and +0.25 with each other), so task 1's label function is
                        anti-correlated with the others' (the conflict is explicit in the data)
Rows:
  average               θ0 + mean_t τ_t (λ = 1 per task: the plain mean of the experts)
  task_arithmetic λ=0.3 θ0 + 0.3 Σ_t τ_t
  task_arithmetic tuned λ from LAMBDA_GRID by val
  ties (defaults)       density 0.2, scale 1, λ = 1
  dare_linear tuned     drop_rate 0.5, λ from LAMBDA_GRID by val
  dare_ties tuned       drop_rate 0.5, density 0.2, scale 1, λ from LAMBDA_GRID by val
  searched              in-process Optuna TPE over the project's own SearchSpace (method in
                        SEARCHED_METHODS, one λ per task in [0, 1.5], the method's knobs),
                        objective: val mean metric; the first trials are the three fixed
                        defaults above (enqueued), the rest sampled
  joint MTL (base)      the jointly trained model: the upper bound merging is measured against
  extra: separate experts  each task scored by its own expert (T models, not a merge)
Training: TrainSpec(epochs=15, expert_epochs=6, lr=3e-4, batch 256, expert_preserve=1):
each expert fine-tunes on its own task while a second loss keeps the other tasks'
predictions where the base had them (`expert_preserve`; --expert-preserve 0 gives plain
fine-tuned experts). The expert recipe was chosen on held-out seeds 3-5 by val (the best
tuned task-arithmetic merge): expert_epochs 3 or 6 × preserve 0 or 1. At lr 1e-3 a fresh
Adam fine-tune knocks a converged base about; at 3e-4 every expert beats the base on its
own task (checked and printed on every run).
Part `bn` (--parts bn): BatchNorm statistics after a merge, on multidigits (--bn-train-pairs)
with a CNN trunk (BN_MODEL): for six merges (DARE up to p = 0.95), each model three ways:
statistics merged as task vectors (what merging did before), the base's statistics (a), and
statistics recalibrated on 512 training samples after the merge (b, the default of
`pipeline.start_model`); a merged model whose outputs are NaN / inf is counted, not scored.
Part `size` (--parts size): TIES, task arithmetic, TSV-M, Iso-C and Iso-CTS over three BERT-base experts,
the merge before and now, time and peak RSS (benchmarks/_merge_size.py; --size-rows picks rows).
Goals: searched ≥ the best default row *by test* (the strictest reading) in ≥ 2 of 3 seeds;
TIES (defaults) ≥ average in mean test over seeds. A TIES investigation (density, per-tensor
vs global trim, λ, and how far each merge moves the trunk) is printed as an extra table.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import torch  # noqa: E402

from _common import fmt, goals_table, markdown_table, mean, policy_for, setup_threads, stopwatch  # noqa: E402
from mtl_models import artifacts as artifacts_mod  # noqa: E402
from mtl_models import fusion, pipeline, pruning, suites  # noqa: E402
from mtl_models.training import weighting  # noqa: E402
from mtl_models.training.train import evaluate  # noqa: E402
from spaces import SearchSpace, SpaceSpec  # noqa: E402

SUITES = {
    "multidigits": ("multidigits", {}),
    "synthetic-conflict": ("synthetic", {"tasks": 3, "correlation": -0.5}),
}
MODEL = {"trunk": "mlp", "width": 256, "depth": 3}
LAMBDA_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
SEARCHED_METHODS = ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
DEFAULT_ROWS = ["average", "task_arithmetic λ=0.3", "task_arithmetic tuned", "ties (defaults)",
                "dare_linear tuned", "dare_ties tuned"]


def score(model, suite) -> dict:
    """val / test mean metric (and per-task metrics) of a model."""
    out = {}
    for split in ("val", "test"):
        m = evaluate(model, suite, split)
        out[split], out[f"{split}_tasks"] = mean(m.values()), m
    return out


class Merger:
    """Builds (through pipeline.start_model) and scores merged models for one suite + seed."""

    def __init__(self, suite, art, seed: int):
        self.suite, self.art, self.seed = suite, art, seed

    def run(self, fusion_spec) -> dict:
        policy = policy_for(self.suite, self.art, fusion=fusion_spec, seed=self.seed)
        return self.run_policy(policy)

    def run_policy(self, policy) -> dict:
        model = pipeline.start_model(self.suite, policy, self.art, device="cpu")
        state = model.state_dict()
        # How far the merge moved the trunk from the base: ||θ_trunk − θ0_trunk||.
        shift = sum(float((state[k] - v).pow(2).sum()) for k, v in self.art.base.items()
                    if k.startswith("trunk.") and v.is_floating_point()) ** 0.5
        return {**score(model, self.suite), "shift": shift}

    def uniform(self, method: str, lam: float, **params) -> dict:
        coefficients = {t: lam for t in self.suite.task_names}
        return self.run({"method": method, "coefficients": coefficients, "params": params})

    def tuned(self, method: str, **params) -> dict:
        """λ (one for all tasks) picked from LAMBDA_GRID by the val metric."""
        return pick_lambda(lambda lam: self.uniform(method, lam, **params))

    def globally_trimmed(self, density: float) -> "Merger":
        """Investigation only: TIES's trim done once over each task's whole trunk vector.

        fusion.ties trims per tensor; the TIES paper ranks the whole task vector. Experts
        pre-trimmed here (entries under the task's global top-`density` magnitude reset to
        the base) and merged with `ties` at density 1 give the paper's global trim with the
        library's own sign election and disjoint mean (trimmed zeros never vote).
        """
        base = self.art.base
        keys = [k for k, v in base.items() if k.startswith("trunk.") and v.is_floating_point()]
        experts = {}
        for task, state in self.art.experts.items():
            tau = {k: state[k] - base[k] for k in keys}
            magnitudes = torch.cat([v.abs().flatten() for v in tau.values()])
            threshold = magnitudes.topk(max(1, round(density * magnitudes.numel()))).values[-1]
            experts[task] = {**state, **{k: base[k] + v * (v.abs() >= threshold) for k, v in tau.items()}}
        return Merger(self.suite, dataclasses.replace(self.art, experts=experts), self.seed)

    def ties_study(self) -> dict:
        """Why TIES wins or loses against averaging: density, trim scope, λ."""
        out = {f"ties λ=1, density {d:g}, per-tensor trim": self.uniform("ties", 1.0, density=d, scale=1.0)
               for d in (0.1, 0.2, 0.5, 1.0)}
        glob = self.globally_trimmed(0.2)
        out["ties λ=1, density 0.2, global trim"] = glob.uniform("ties", 1.0, density=1.0, scale=1.0)
        out["ties λ tuned, density 0.2, per-tensor trim"] = self.tuned("ties", density=0.2, scale=1.0)
        out["ties λ tuned, density 0.2, global trim"] = glob.tuned("ties", density=1.0, scale=1.0)
        return out


def pick_lambda(run) -> dict:
    """run(λ) -> result for each λ of LAMBDA_GRID; the best by val, with its λ."""
    runs = [(lam, run(lam)) for lam in LAMBDA_GRID]
    lam, best = max(runs, key=lambda r: r[1]["val"])
    return {**best, "choice": f"λ={lam:g}"}


def defaults_as_trials(tasks) -> list[dict]:
    """The three fixed default configurations as Optuna params (enqueued first)."""
    coef = lambda lam: {f"coef.{t}": lam for t in tasks}  # noqa: E731
    return [{"fusion.method": "average", **coef(1.0)},
            {"fusion.method": "task_arithmetic", **coef(0.3)},
            {"fusion.method": "ties", **coef(1.0), "fusion.ties.density": 0.2, "fusion.ties.scale": 1.0}]


def searched(merger: Merger, trials: int, seed: int) -> dict:
    """Optuna over method + per-task coefficients + the method's knobs; val mean metric."""
    suite, art = merger.suite, merger.art
    spec = SpaceSpec.model_validate({
        "pruning": {"importance": "l2", "sparsity": 0.0},
        "weighting": {"method": "equal"},
        "fusion": {"method": SEARCHED_METHODS, "coefficient": {"low": 0.0, "high": 1.5}, "finetune_epochs": 0.0},
        "finetune": {"epochs": 0.0},
    })
    model = suite.build_model(**art.model)
    space = SearchSpace(spec, layers=pruning.prunable_layers(model), tasks=suite.task_names,
                        suite=suite.spec, model=art.model, fusion_knobs=fusion.KNOBS,
                        weighting_knobs=weighting.KNOBS, seed=seed)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    for params in defaults_as_trials(suite.task_names):
        study.enqueue_trial(params)

    def objective(trial):
        policy = space.suggest(trial)
        result = merger.run_policy(policy)
        trial.set_user_attr("result", {k: result[k] for k in ("val", "test")})
        trial.set_user_attr("policy", policy.fusion.model_dump())
        return result["val"]

    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    f = best.user_attrs["policy"]
    coefs = ", ".join(f"{c:.2f}" for c in f["coefficients"].values())
    knobs = ", ".join(f"{k}={v:.2f}" for k, v in f["params"].items())
    choice = f"{f['method']} λ=({coefs})" + (f" {knobs}" if knobs else "") + f" [trial {best.number}]"
    return {**best.user_attrs["result"], "choice": choice, "trial": best.number}


def specialisation(suite, art) -> tuple[list[tuple], dict]:
    """Each expert's own-task val metric against the base's (experts must specialise), and
    the score of T separate models (each task by its own expert): an extra reference row."""
    rows, own = [], {"val": {}, "test": {}}
    for task, state in art.experts.items():
        model = suite.build_model(**art.model)
        model.load_state_dict(state)
        val, test = evaluate(model, suite, "val"), evaluate(model, suite, "test")
        own["val"][task], own["test"][task] = val[task], test[task]
        base = art.dense_metrics["val"][task]
        others = mean(val[t] - art.dense_metrics["val"][t] for t in suite.task_names if t != task)
        rows.append((task, base, val[task], others))
    return rows, {split: mean(own[split].values()) for split in ("val", "test")}


def run_seed(label: str, seed: int, train_spec: dict, trials: int, cache_dir: str, log) -> dict:
    name, options = SUITES[label]
    suite = suites.get(name, **{**options, "seed": seed})
    spec = artifacts_mod.TrainSpec(**{**train_spec, "seed": seed})
    art = artifacts_mod.prepare(suite, MODEL, spec, cache_dir=cache_dir, experts=True, log=lambda *a: None)
    merger = Merger(suite, art, seed)
    rows = {
        "average": merger.uniform("average", 1.0),
        "task_arithmetic λ=0.3": merger.uniform("task_arithmetic", 0.3),
        "task_arithmetic tuned": merger.tuned("task_arithmetic"),
        "ties (defaults)": merger.uniform("ties", 1.0, density=0.2, scale=1.0),
        "dare_linear tuned": merger.tuned("dare_linear", drop_rate=0.5),
        "dare_ties tuned": merger.tuned("dare_ties", drop_rate=0.5, density=0.2, scale=1.0),
        f"searched ({trials} trials)": searched(merger, trials, seed),
        "joint MTL (base, upper bound)": merger.run(None),
    }
    special, separate = specialisation(suite, art)
    rows[f"extra: {len(suite.tasks)} separate experts (not one model)"] = separate
    return {"rows": rows, "special": special, "tasks": suite.task_names,
            "ties_study": {"average (λ=1)": rows["average"], "task_arithmetic tuned": rows["task_arithmetic tuned"],
                           **merger.ties_study()}}


def report_suite(label: str, per_seed: dict[int, dict], trials: int) -> list[tuple[str, bool, str]]:
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]]["rows"])
    print(f"\n### {label}: test mean metric (val in brackets), selection on val only\n")
    header = ["method", *(f"seed {s}" for s in seeds), "mean test", "mean val", f"choice (seed {seeds[0]})"]
    rows = []
    for n in names:
        r = [per_seed[s]["rows"][n] for s in seeds]
        rows.append([n, *(f"{fmt(x['test'], 4)} ({fmt(x['val'], 4)})" for x in r),
                     fmt(mean(x["test"] for x in r), 4), fmt(mean(x["val"] for x in r), 4), r[0].get("choice", "")])
    print(markdown_table(header, rows))

    search_name = f"searched ({trials} trials)"
    print(f"\n{label}: the searched policy per seed (trials 0-2 are the enqueued defaults)\n")
    print(markdown_table(["seed", "best trial by val"], [[f"seed {s}", per_seed[s]["rows"][search_name]["choice"]]
                                                           for s in seeds]))

    print(f"\n{label}: expert specialisation on val (own task: base → expert; other tasks: mean change)\n")
    srows = [[f"seed {s}", task, f"{fmt(b, 4)} → {fmt(e, 4)} ({e - b:+.4f})", f"{o:+.4f}"]
             for s in seeds for task, b, e, o in per_seed[s]["special"]]
    print(markdown_table(["seed", "expert", "own task val", "other tasks val"], srows))

    print(f"\n{label}: TIES investigation (extra, not part of the comparison): mean over seeds\n")
    trows = []
    for n in per_seed[seeds[0]]["ties_study"]:
        r = [per_seed[s]["ties_study"][n] for s in seeds]
        rel = mean(x["shift"] / per_seed[s]["rows"]["average"]["shift"] for s, x in zip(seeds, r))
        trows.append([n, fmt(mean(x["test"] for x in r), 4), fmt(mean(x["val"] for x in r), 4), fmt(rel, 2),
                      ", ".join(x.get("choice", "") for x in r if x.get("choice"))])
    print(markdown_table(["variant", "mean test", "mean val", "‖θ−θ0‖ / average's", "λ chosen per seed"], trows))

    print(f"\n{label}: per task, test, mean over seeds (where TIES gains or loses against averaging)\n")
    tasks = per_seed[seeds[0]]["tasks"]
    prow = []
    for n in ("average", "ties (defaults)", "task_arithmetic tuned", "joint MTL (base, upper bound)"):
        prow.append([n, *(fmt(mean(per_seed[s]["rows"][n]["test_tasks"][t] for s in seeds), 4) for t in tasks)])
    print(markdown_table(["method", *tasks], prow))

    wins, evid = 0, []
    for s in seeds:
        r = per_seed[s]["rows"]
        best_name = max(DEFAULT_ROWS, key=lambda n: r[n]["test"])
        ok = r[search_name]["test"] >= r[best_name]["test"]
        wins += ok
        kept = " (search kept an enqueued default)" if r[search_name]["trial"] < 3 else ""
        evid.append(f"s{s}: {r[search_name]['test']:.4f} vs {best_name} {r[best_name]['test']:.4f}{kept}")
    ties_wins = sum(per_seed[s]["rows"]["ties (defaults)"]["test"] >= per_seed[s]["rows"]["average"]["test"]
                    for s in seeds)
    ties_mean = mean(per_seed[s]["rows"]["ties (defaults)"]["test"] for s in seeds)
    avg_mean = mean(per_seed[s]["rows"]["average"]["test"] for s in seeds)
    n_tasks = len(per_seed[seeds[0]]["tasks"])
    need = -(-2 * len(seeds) // 3)  # 2 of 3 seeds
    special = [(s, t, e - b) for s in seeds for t, b, e, _ in per_seed[s]["special"]]
    worst = min(special, key=lambda x: x[2])
    return [
        (f"{label}: (precondition) every expert improves its own task over the base on val",
         all(d > 0 for _, _, d in special),
         f"{sum(d > 0 for _, _, d in special)}/{len(special)} experts; smallest gain {worst[2]:+.4f} "
         f"({worst[1]}, seed {worst[0]})"),
        (f"{label}: searched ≥ best default (by test) in ≥{need} of {len(seeds)} seeds", wins >= need,
         f"{wins}/{len(seeds)}; " + "; ".join(evid)),
        (f"{label}: TIES ≥ averaging ({n_tasks} tasks), mean test over seeds", ties_mean >= avg_mean,
         f"TIES {ties_mean:.4f} vs average {avg_mean:.4f}; TIES ≥ average in {ties_wins}/{len(seeds)} seeds"),
    ]


# --- BatchNorm statistics after a merge (a CNN trunk: BatchNorm after every conv) -----------

BN_MODEL = {"trunk": "cnn", "channels": [8, 16, 32], "fc": 64}
BN_MERGES = {
    "average (λ=1)": ("average", 1.0, {}),
    "task_arithmetic λ=0.3": ("task_arithmetic", 0.3, {}),
    "ties (defaults)": ("ties", 1.0, {"density": 0.2, "scale": 1.0}),
    "dare_linear p=0.5, λ=0.3": ("dare_linear", 0.3, {"drop_rate": 0.5}),
    "dare_linear p=0.9, λ=0.3": ("dare_linear", 0.3, {"drop_rate": 0.9}),
    "dare_ties p=0.95, λ=1": ("dare_ties", 1.0, {"drop_rate": 0.95, "density": 0.2, "scale": 1.0}),
}
BN_VARIANTS = ("merged as task vectors (before)", "base statistics (a)", "recalibrated (b)")


def _statistics_merged_too(suite, art, policy):
    """What merging did before: running statistics merged like weights (buffers=())."""
    model = pipeline.start_model(suite, policy, art, device="cpu", statistics="base")
    trunk = {k: v for k, v in art.base.items() if k.startswith("trunk.")}
    experts = {t: {k: art.experts[t][k] for k in trunk} for t in suite.task_names}
    merged = fusion.merge(trunk, experts, policy.fusion.method, dict(policy.fusion.coefficients), buffers=(),
                          **pipeline.fusion_params(policy))
    model.load_state_dict({**model.state_dict(), **merged})
    return model


def bn_seed(seed: int, train_spec: dict, train_pairs: int | None, cache_dir: str) -> dict:
    """name -> variant -> score (or None where the merged model's outputs are not finite)."""
    options = {"seed": seed, "train_pairs": train_pairs}
    suite = suites.get("multidigits", **options)
    spec = artifacts_mod.TrainSpec(**{**train_spec, "seed": seed})
    art = artifacts_mod.prepare(suite, BN_MODEL, spec, cache_dir=cache_dir, experts=True, log=lambda *a: None)
    x = suite.val.x[:256]
    out = {"joint MTL (base)": {v: score(pipeline.start_model(suite, policy_for(suite, art, seed=seed), art,
                                                              device="cpu"), suite) for v in BN_VARIANTS}}
    for name, (method, lam, params) in BN_MERGES.items():
        policy = policy_for(suite, art, seed=seed, fusion={"method": method, "params": params,
                                                           "coefficients": {t: lam for t in suite.task_names}})
        models = {BN_VARIANTS[0]: _statistics_merged_too(suite, art, policy),
                  BN_VARIANTS[1]: pipeline.start_model(suite, policy, art, device="cpu", statistics="base"),
                  BN_VARIANTS[2]: pipeline.start_model(suite, policy, art, device="cpu", statistics="recalibrate")}
        row = {}
        for variant, model in models.items():
            with torch.no_grad():
                finite = all(torch.isfinite(v).all() for v in model.eval()(x).values())
            row[variant] = score(model, suite) if finite else None
        out[name] = row
    return out


def report_bn(per_seed: dict[int, dict]) -> list[tuple[str, bool, str]]:
    seeds = sorted(per_seed)
    print(f"\n### BatchNorm statistics after a merge: multidigits, CNN trunk {BN_MODEL['channels']} / fc "
          f"{BN_MODEL['fc']}; test mean metric, mean over seeds {seeds} (NaN: seeds whose merged model "
          f"outputs NaN / inf)\n")
    rows, gains, wins, total = [], [], 0, 0
    for name in per_seed[seeds[0]]:
        cells = []
        for variant in BN_VARIANTS:
            got = [per_seed[s][name][variant] for s in seeds]
            ok = [g["test"] for g in got if g is not None]
            bad = len(got) - len(ok)
            cells.append((fmt(mean(ok), 4) if ok else "—") + (f" (NaN in {bad}/{len(got)})" if bad else ""))
        rows.append([name, *cells])
        if name.startswith("joint"):
            continue
        for s in seeds:
            a, b = per_seed[s][name][BN_VARIANTS[1]], per_seed[s][name][BN_VARIANTS[2]]
            if a is not None and b is not None:
                gains.append(b["test"] - a["test"])
                wins += b["val"] >= a["val"]
                total += 1
    print(markdown_table(["merge", *BN_VARIANTS], rows))
    nan_free = all(per_seed[s][n][v] is not None for s in seeds for n in per_seed[s] for v in BN_VARIANTS[1:])
    return [("BN trunk: no merge with base or recalibrated statistics outputs NaN (DARE up to p = 0.95)", nan_free,
             "see the table"),
            ("BN trunk: recalibrated (b) vs base statistics (a), test, mean gain over merges × seeds",
             bool(gains) and mean(gains) >= 0,
             f"{mean(gains):+.4f} (b ≥ a by val in {wins}/{total})" if gains else "no pair")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=30, help="Optuna trials of the searched row")
    ap.add_argument("--epochs", type=float, default=15.0, help="base (joint) training epochs")
    ap.add_argument("--expert-epochs", type=float, default=6.0, help="per-task expert fine-tune epochs")
    ap.add_argument("--expert-preserve", type=float, default=artifacts_mod.TrainSpec.expert_preserve,
                    help="weight of the loss keeping the other tasks' predictions during an expert's fine-tune")
    ap.add_argument("--lr", type=float, default=3e-4,
                    help="Adam lr of the base and the experts (TrainSpec has one lr; see the module docstring)")
    ap.add_argument("--expert-lr", type=float, default=None,
                    help="Adam lr of the expert fine-tunes (default: TrainSpec's)")
    ap.add_argument("--parts", default="merge,bn",
                    help="merge: the methods on the MLP suites; bn: BatchNorm statistics after a merge (CNN); "
                         "size: TIES / TSV / Iso over 3 BERT-base experts, before and after (run it alone)")
    ap.add_argument("--size-rows", default=None,
                    help="size part: which rows, e.g. tsv:after,iso_c (a method alone: before and after; default all)")
    ap.add_argument("--bn-train-pairs", type=int, default=4000, help="bn part: multidigits train_pairs")
    ap.add_argument("--bn-epochs", type=float, default=6.0, help="bn part: base epochs (experts: --expert-epochs / 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="artifact cache (default: a fresh temp dir)")
    args = ap.parse_args(argv)
    setup_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="prunefuse-fusion-")
    train_spec = {"epochs": args.epochs, "expert_epochs": args.expert_epochs, "lr": args.lr, "batch_size": 256,
                  "expert_lr": args.expert_lr, "expert_preserve": args.expert_preserve}

    print("## Fusion benchmark: pure merging (no post-merge fine-tune, no pruning)\n")
    print(f"model {MODEL}; base {args.epochs:g} epochs, experts {args.expert_epochs:g} epochs "
          f"(preserve {args.expert_preserve:g}), Adam lr {args.lr:g}, "
          f"batch 256; seeds {args.seeds}; λ grid {list(LAMBDA_GRID)}; searched: {args.trials} Optuna TPE trials "
          f"(3 enqueued defaults + {args.trials - 3} sampled) over {SEARCHED_METHODS}, λ_t ∈ [0, 1.5] per task + knobs")
    goals = []
    parts = set(args.parts.split(","))
    for label in args.suites if "merge" in parts else []:
        per_seed = {}
        with stopwatch(label):
            for seed in args.seeds:
                per_seed[seed] = run_seed(label, seed, train_spec, args.trials, cache_dir, log=print)
        goals += report_suite(label, per_seed, args.trials)
    if "bn" in parts:
        bn_spec = {**train_spec, "epochs": args.bn_epochs, "expert_epochs": args.expert_epochs / 3, "lr": 1e-3,
                   "expert_lr": args.expert_lr or 3e-4}
        with stopwatch("bn statistics"):
            per_seed = {seed: bn_seed(seed, bn_spec, args.bn_train_pairs, cache_dir) for seed in args.seeds}
        goals += report_bn(per_seed)
    if "size" in parts:
        import _merge_size

        with stopwatch("real size"):
            rows = _merge_size.run(args.threads, rows_spec=args.size_rows)
        goals += _merge_size.report(rows, markdown_table, fmt)
    print("\n### Goals\n")
    print(goals_table(goals))


if __name__ == "__main__":
    main()
