"""Merging benchmark in the literature's form: one pretrained ViT, independent single-task
experts on distinct image datasets, every merge method, accuracy normalised by the experts'.

    .venv/bin/python benchmarks/merging.py                # seeds 0 1 2 (~25 min on 2 shared cores)
    .venv/bin/python benchmarks/merging.py --seeds 0      # one seed
    .venv/bin/python benchmarks/merging.py --quick        # a smoke run: tiny data and steps, one seed

The setup (FusionBench's CLIP tables, at a size two CPU cores can run):
  tasks     six offline image datasets drawn procedurally, each its own images
            (benchmarks/_merge_tasks.py): digits, shapes, orientation, count, texture, hue.
  backbone  timm's VisionTransformer (embed 64, depth 4, 4 heads, patch 8, 32×32 inputs),
            pretrained once (shared by the seeds, as one CLIP serves the literature's runs) on
            fresh images of all six families with generic labels only (family × two coarse
            attributes of its class, and the object's 3×3 cell): never the downstream classes,
            the role of CLIP's image-text pretraining.
  heads     per task, class prototypes from 16 training images per class on the pretrained
            trunk, compared by cosine (`_merge_models.PrototypeHead`): nothing trained, the role
            of CLIP's zero-shot heads; frozen from then on, shared by every expert and merge.
  experts   the pretrained trunk fine-tuned on one task alone (AdamW, small lr, cosine), its
            head frozen: independent experts.
  merges    `fusion.merge` of the experts' trunks (model size unchanged), each task read by its
            head, scored on that task's test images; normalised accuracy = merged accuracy / the
            expert's, per task, and its mean over tasks (FusionBench's form).
Rows: each method at its literature knobs (ties density 0.2 with the paper's disjoint mean;
  dare p=0.5; breadcrumbs density 0.9 γ=0.01; della density 0.5 ε=0.1; iso_cts fraction 0.8),
  its one scaling coefficient (λ, α) chosen from SCALES on validation, as the task-arithmetic,
  TIES and Iso papers choose theirs; average is λ=1. AdaMerging task-wise and layer-wise start
  from task arithmetic's λ (the paper starts from task arithmetic's 0.3) and take 200 Adam steps
  of lr 1e-3 on the entropy of each head on unlabeled *training* images of its own task.
  "search": Optuna TPE over every method, one λ per task in [0, 2] and the method's knobs,
  scored on validation, reported on test, each row above enqueued as a starting trial.
  References: the separate experts (100 %) and the pretrained trunk (λ = 0).
Interference (a table per run): each expert's trunk on the *other* tasks, as a fraction of the
  pretrained trunk's accuracy on them. The literature's merges rely on it staying near 100 %
  (weight disentanglement, Ortiz-Jimenez et al. 2023); it says how far this scale is from there.
Full cycle (column "after prune + fine-tune"): the merged model pruned structurally to about
half of its MACs (`mtl_models.pruning.prune`, one uniform sparsity over every coupled group and
attention heads, bisected once per seed on the pretrained model, l2 importance), then a short
multi-task fine-tune on the union of the tasks' training data (labels used, as the project's
cycle does), trunk and heads; the same for every row, the pretrained trunk included.
Goals (issue #28): task arithmetic < TIES < layer-wise AdaMerging, TSV-M, Iso-C and Iso-CTS
(mean over seeds; task-wise AdaMerging is below TIES in the literature too); the best single
method ≥ 90 % normalised; the search ≥ the best single method (by test, the strictest reading)
in ≥ 2 of 3 seeds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import torch  # noqa: E402

import _merge_models as mm  # noqa: E402
import _merge_tasks as mt  # noqa: E402
from _common import goals_table, markdown_table, mean, setup_threads, stdev  # noqa: E402
from mtl_models import fusion  # noqa: E402
from mtl_models.measuring import measure  # noqa: E402
from mtl_models.pruning import coupled_groups, prune  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from spaces.policy import Pruning  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setup:
    sizes: dict = dataclasses.field(default_factory=lambda: {"train": 2000, "val": 300, "test": 500})
    pretrain_per_task: int = 2000
    pretrain_steps: int = 1500
    shots: int = 16                   # training images per class that build a head's prototypes
    kappa: float = 20.0               # the heads' logit scale (CLIP's is 100 on cosines of a wider space)
    expert_steps: int = 600
    expert_lr: float = 3e-5           # small: the literature fine-tunes CLIP at 1e-5
    batch: int = 64
    adamerging_rows: int = 512        # unlabeled training images per task AdaMerging may draw
    adamerging: tuple = (("steps", 200), ("lr", 1e-3))  # init: task arithmetic's λ, as in the paper
    trials: int = 40
    grouped_pretraining: bool = True  # pretraining labels name groups of classes (False: family only)
    cycle_steps: int = 150
    cycle_lr: float = 3e-4
    cycle_batch: int = 16             # per task and step
    bisect: int = 6


QUICK = Setup(sizes={"train": 128, "val": 48, "test": 48}, pretrain_per_task=96, pretrain_steps=20, shots=4,
              expert_steps=8, adamerging_rows=32, adamerging=(("steps", 3), ("lr", 1e-3)), trials=16,
              cycle_steps=3, bisect=2)
PRETRAIN_SEED = 1000  # one backbone for every seed; its images are drawn apart from every seed's
MAC_TARGET = 0.5
SCALES = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)  # λ (α) for every task, chosen on validation per method
# Each method at its literature knobs; its one scaling coefficient is chosen on validation.
KNOBS = {
    "task_arithmetic": {},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare_linear": {"drop_rate": 0.5},
    "dare_ties": {"drop_rate": 0.5, "density": 0.2, "scale": 1.0},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1, "scale": 1.0},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {"common_space_fraction": 0.8},
}
LEARNED = {"adamerging (task-wise)": False, "adamerging (layer-wise)": True}
PRETRAINED, SEARCH = "pretrained trunk (zero-shot)", "search (TPE over every method)"
CYCLE_ROWS = (PRETRAINED, "task_arithmetic", "ties", "tsv", "iso_cts", "adamerging (layer-wise)", SEARCH)
# The literature's ordering: layer-wise AdaMerging, TSV-M and Iso-C/CTS above TIES. Task-wise
# AdaMerging is below TIES in the literature itself (AdaMerging paper, ViT-B/32: 71.1 vs 72.4).
LEARNED_AND_SINGULAR = ("adamerging (layer-wise)", "tsv", "iso_c", "iso_cts")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- one seed: pretrained trunk, heads, experts --------------------------------------------

class Bench:
    """One seed's data, pretrained trunk (`base`), experts and the model their heads sit on."""

    def __init__(self, seed: int, setup: Setup, vit: mm.ViT, base: dict):
        self.seed, self.setup, self.base = seed, setup, base
        self.data = mt.task_sets(seed, setup.sizes)
        model = mm.build(vit, {t: d.classes for t, d in self.data.items()}, seed=seed)
        model.load_state_dict(self.base, strict=False)
        mm.prototype_heads(model, self.data, shots=setup.shots, kappa=setup.kappa)
        self.experts = {task: mm.finetune_expert(model, task, td, steps=setup.expert_steps, lr=setup.expert_lr,
                                                 batch=setup.batch, seed=seed) for task, td in self.data.items()}
        self.model = model.eval()
        self.own = {split: {t: mm.accuracy(mm.with_trunk(model, self.experts[t]), {t: self.data[t]}, split)[t]
                            for t in self.data} for split in ("val", "test")}
        self.interference = self._interference()

    def _interference(self) -> dict[str, float]:
        """task -> the other tasks' test accuracy with this expert's trunk, as a fraction of theirs
        with the pretrained trunk: how far one task vector alone moves the tasks it was not
        trained on (1.0: not at all; the literature's merges rely on it staying near 1)."""
        base = mm.accuracy(self.model, self.data, "test")
        out = {}
        for t in self.data:
            acc = mm.accuracy(mm.with_trunk(self.model, self.experts[t]), self.data, "test")
            out[t] = mean(acc[s] / base[s] for s in self.data if s != t)
        return out

    @property
    def tasks(self) -> list[str]:
        return list(self.data)

    def merge(self, method: str, coefficients, **params) -> dict:
        return fusion.merge(self.base, self.experts, method, coefficients, buffers=fusion.buffer_keys(self.model),
                            **params)

    def score(self, state: dict, splits=("val", "test")) -> dict:
        """split -> {task: accuracy / expert's accuracy}, and split + "_acc" -> raw accuracies."""
        model = mm.with_trunk(self.model, state)
        out = {}
        for split in splits:
            acc = mm.accuracy(model, self.data, split)
            out[split] = {t: acc[t] / self.own[split][t] for t in acc}
            out[f"{split}_acc"] = acc
        return out

    def learn(self, *, layerwise: bool, steps: int, lr: float, init: float) -> dict:
        """AdaMerging's coefficients (fusion.learn_coefficients) on unlabeled training images."""
        rows = self.setup.adamerging_rows
        inputs = mm.tag({t: d.x["train"][:rows] for t, d in self.data.items()})
        model = mm.with_trunk(self.model, self.base, cls=mm.TaggedInputs)
        return fusion.learn_coefficients(model, self.base, self.experts, inputs=inputs,
                                         kinds={t: "classification" for t in self.tasks}, layerwise=layerwise,
                                         steps=steps, lr=lr, init=init, seed=self.seed,
                                         buffers=fusion.buffer_keys(self.model))


def avg(score: dict, split: str = "test") -> float:
    return mean(score[split].values())


# --- the rows -------------------------------------------------------------------------------

def method_rows(bench: Bench) -> dict[str, dict]:
    """name -> {"state", score..., "choice", "fusion"}: every method at its default."""
    uniform = lambda lam: {t: lam for t in bench.tasks}  # noqa: E731
    rows = {PRETRAINED: {"state": bench.base, "choice": "λ = 0", "fusion": None},
            "average": {"state": bench.merge("average", uniform(1.0)), "choice": "—",
                        "fusion": ("average", uniform(1.0), {})}}
    for method, params in KNOBS.items():
        best = None
        for lam in SCALES:  # the literature's protocol: one λ per method, chosen on held-out validation
            state = bench.merge(method, uniform(lam), **params)
            val = avg(bench.score(state, ("val",)), "val")
            if best is None or val > best[0]:
                best = (val, lam, state)
        _, lam, state = best
        rows[method] = {"state": state, "choice": f"λ={lam:g} by val", "fusion": (method, uniform(lam), params)}
    # AdaMerging starts from task arithmetic's coefficient, as the paper starts from its 0.3.
    knobs = {**dict(bench.setup.adamerging), "init": min(1.0, rows["task_arithmetic"]["fusion"][1][bench.tasks[0]])}
    for name, layerwise in LEARNED.items():
        coefficients = bench.learn(layerwise=layerwise, **knobs)
        rows[name] = {"state": bench.merge("adamerging", coefficients, **knobs), "choice": _describe(coefficients),
                      "fusion": ("adamerging", coefficients, {**knobs, "layerwise": layerwise})}
    for row in rows.values():
        row.update(bench.score(row["state"]))
    return rows


def _describe(coefficients: dict) -> str:
    values = [v for c in coefficients.values() for v in (c.values() if isinstance(c, dict) else [c])]
    return f"λ learned {min(values):.2f}–{max(values):.2f}"


def search(bench: Bench, rows: dict, trials: int) -> dict:
    """Optuna over method × one λ per task × the method's knobs (adamerging: its knobs and
    task- or layer-wise, λ learned); val mean normalised accuracy; every default enqueued."""
    learned = {}

    def suggest(trial):
        method = trial.suggest_categorical("method", list(fusion.METHODS))
        knobs = {k: knob.suggest(trial, f"{method}.{k}") for k, knob in fusion.KNOBS[method].items()}
        if method == "adamerging":
            layerwise = trial.suggest_categorical("adamerging.layerwise", [False, True])
            key = (layerwise, *sorted(knobs.items()))
            if key not in learned:
                learned[key] = bench.learn(layerwise=layerwise, **knobs)
            return method, learned[key], knobs
        return method, {t: trial.suggest_float(f"coef.{t}", 0.0, 2.0) for t in bench.tasks}, knobs

    def objective(trial):
        method, coefficients, knobs = suggest(trial)
        score = bench.score(bench.merge(method, coefficients, **knobs), ("val",))
        trial.set_user_attr("fusion", (method, coefficients, knobs))
        return avg(score, "val")

    study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed=bench.seed, trials=trials))
    for name, row in rows.items():
        if row["fusion"] is None:
            continue
        method, coefficients, knobs = row["fusion"]
        params = {"method": method, **{f"{method}.{k}": v for k, v in knobs.items() if k != "layerwise"}}
        if method == "adamerging":
            params["adamerging.layerwise"] = knobs["layerwise"]
            learned[(knobs["layerwise"], *sorted((k, v) for k, v in knobs.items() if k != "layerwise"))] = coefficients
        else:
            params.update({f"coef.{t}": c for t, c in coefficients.items()})
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=max(trials, len(study.trials)))
    best = study.best_trial
    method, coefficients, knobs = best.user_attrs["fusion"]
    state = bench.merge(method, coefficients, **knobs)
    enqueued = sum(r["fusion"] is not None for r in rows.values())
    where = "an enqueued default" if best.number < enqueued else "sampled"
    return {"state": state, **bench.score(state), "fusion": (method, coefficients, knobs),
            "choice": f"{method} {_describe(coefficients) if method == 'adamerging' else _lams(coefficients)}"
                      f"{_knobs(knobs)} (trial {best.number}, {where})"}


def _lams(coefficients: dict) -> str:
    return "λ=(" + ", ".join(f"{v:.2f}" for v in coefficients.values()) + ")"


def _knobs(knobs: dict) -> str:
    return "".join(f" {k}={v:.3g}" for k, v in knobs.items())


# --- the full cycle: merge, prune to ~½ MACs, fine-tune -------------------------------------

def sparsity_for_half_macs(bench: Bench) -> tuple[float, float]:
    """(uniform sparsity, fraction of the MACs left): bisected on the pretrained model."""
    x = bench.data[bench.tasks[0]].x["val"][:2]
    dense = measure.count_macs(bench.model, x)
    groups = coupled_groups(bench.model, x)
    lo, hi, best = 0.0, 0.9, (1.0, 0.0, 1.0)
    for _ in range(bench.setup.bisect):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(bench.model)
        prune(trial, Pruning(sparsity={g: mid for g in groups}), example_inputs=x)
        left = measure.count_macs(trial, x) / dense
        best = min(best, (abs(left - (1 - MAC_TARGET)), mid, left))
        lo, hi = (mid, hi) if left > 1 - MAC_TARGET else (lo, mid)
    return best[1], best[2]


def cycle(bench: Bench, state: dict, sparsity: float) -> dict:
    model = mm.with_trunk(bench.model, state)
    x = bench.data[bench.tasks[0]].x["val"][:2]
    groups = coupled_groups(model, x)
    prune(model, Pruning(sparsity={g: sparsity for g in groups}), example_inputs=x)
    s = bench.setup
    mm.finetune_multitask(model, bench.data, steps=s.cycle_steps, lr=s.cycle_lr, batch=s.cycle_batch, seed=bench.seed)
    return {split: {t: a / bench.own[split][t] for t, a in mm.accuracy(model, bench.data, split).items()}
            for split in ("test",)}


def pretrained(setup: Setup, vit: mm.ViT) -> dict:
    """The backbone every seed starts from (one pretraining, as one CLIP serves the literature's runs)."""
    px, py = mt.pretraining_set(PRETRAIN_SEED, setup.pretrain_per_task, grouped=setup.grouped_pretraining)
    return mm.pretrain(vit, px, py, steps=setup.pretrain_steps, lr=1e-3, batch=128, seed=PRETRAIN_SEED)


def run_seed(seed: int, setup: Setup, vit: mm.ViT, base: dict, *, cycle_rows) -> dict:
    started = time.perf_counter()
    bench = Bench(seed, setup, vit, base)
    log(f"seed {seed}: data, heads, experts {time.perf_counter() - started:.0f} s; experts' val "
        + ", ".join(f"{t} {a:.3f}" for t, a in bench.own["val"].items()))
    rows = method_rows(bench)
    log(f"seed {seed}: method rows done at {time.perf_counter() - started:.0f} s")
    rows[SEARCH] = search(bench, rows, setup.trials)
    log(f"seed {seed}: search done at {time.perf_counter() - started:.0f} s: {rows[SEARCH]['choice']}")
    sparsity, left = sparsity_for_half_macs(bench)
    for name in cycle_rows:
        rows[name]["cycle"] = cycle(bench, rows[name]["state"], sparsity)
    log(f"seed {seed}: cycle done at {time.perf_counter() - started:.0f} s (sparsity {sparsity:.3f}, "
        f"{left:.2f} of the MACs left)")
    for row in rows.values():
        row.pop("state")
    return {"rows": rows, "own": bench.own, "interference": bench.interference, "sparsity": sparsity, "macs_left": left,
            "seconds": time.perf_counter() - started}


# --- tables ---------------------------------------------------------------------------------

def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def seed_table(result: dict, tasks: list[str]) -> str:
    header = ["method", *tasks, "avg (norm.)", "avg acc", "after prune + fine-tune", "choice"]
    body = [["experts (6 separate models)", *("100.0" for _ in tasks), "100.0",
             pct(mean(result["own"]["test"].values())), "—", "reference"]]
    for name, r in result["rows"].items():
        after = avg(r["cycle"]) if "cycle" in r else None
        body.append([name, *(pct(r["test"][t]) for t in tasks), f"**{pct(avg(r))}**",
                     pct(mean(r["test_acc"].values())), pct(after), r["choice"]])
    return markdown_table(header, body)


def mean_table(results: dict, tasks: list[str]) -> str:
    seeds = sorted(results)
    names = list(results[seeds[0]]["rows"])
    header = ["method", *tasks, "avg (norm.) mean ± sd", "avg acc", "after prune + fine-tune"]
    body = [["experts (6 separate models)", *("100.0" for _ in tasks), "100.0",
             pct(mean(mean(results[s]["own"]["test"].values()) for s in seeds)), "—"]]
    for name in names:
        rs = [results[s]["rows"][name] for s in seeds]
        avgs = [avg(r) for r in rs]
        after = [avg(r["cycle"]) for r in rs if "cycle" in r]
        body.append([name, *(pct(mean(r["test"][t] for r in rs)) for t in tasks),
                     f"**{pct(mean(avgs))}** ± {100 * stdev(avgs):.1f}", pct(mean(mean(r["test_acc"].values()) for r in rs)),
                     pct(mean(after)) if after else "—"])
    return markdown_table(header, body)


def goals(results: dict) -> list[tuple[str, bool, str]]:
    seeds = sorted(results)
    m = {name: mean(avg(results[s]["rows"][name]) for s in seeds) for name in results[seeds[0]]["rows"]}
    singles = [n for n in m if n not in (PRETRAINED, SEARCH)]
    best = max(singles, key=m.get)
    ta, ties = m["task_arithmetic"], m["ties"]
    others = {n: m[n] for n in LEARNED_AND_SINGULAR}
    wins, evidence = 0, []
    for s in seeds:
        rows = results[s]["rows"]
        best_s = max(singles, key=lambda n: avg(rows[n]))
        ok = avg(rows[SEARCH]) >= avg(rows[best_s])
        wins += ok
        evidence.append(f"s{s}: {pct(avg(rows[SEARCH]))} vs {best_s} {pct(avg(rows[best_s]))}")
    need = -(-2 * len(seeds) // 3)
    return [
        ("task arithmetic < TIES (mean normalised)", ta < ties, f"{pct(ta)} vs {pct(ties)}"),
        ("TIES < every learned / singular-vector method", all(v > ties for v in others.values()),
         ", ".join(f"{n} {pct(v)}" for n, v in others.items()) + f" vs TIES {pct(ties)}"),
        ("best single method ≥ 90 % normalised", m[best] >= 0.9, f"{best} {pct(m[best])}"),
        (f"search ≥ best single method (by test) in ≥ {need} of {len(seeds)} seeds", wins >= need,
         f"{wins}/{len(seeds)}: " + "; ".join(evidence)),
    ]


def report(results: dict, vit: mm.ViT, setup: Setup, seconds: float) -> None:
    seeds = sorted(results)
    tasks = list(results[seeds[0]]["own"]["test"])
    for s in seeds:
        r = results[s]
        print(f"\n### Seed {s}: test accuracy normalised by each expert's (%)\n")
        print(seed_table(r, tasks))
        print(f"\nPruned: uniform sparsity {r['sparsity']:.3f} leaves {100 * r['macs_left']:.0f} % of the MACs; "
              f"seed run {r['seconds']:.0f} s.")
    print(f"\n### Mean over seeds {', '.join(map(str, seeds))}: test accuracy normalised by each expert's (%)\n")
    print(mean_table(results, tasks))
    print("\nExperts' own test accuracy (%), the denominators:\n")
    print(markdown_table(["seed", *tasks], [[s, *(pct(results[s]["own"]["test"][t]) for t in tasks)] for s in seeds]))
    print("\nInterference: the other tasks' test accuracy with one expert's trunk, as a fraction of theirs with the "
          "pretrained trunk (%; 100 = the task vector leaves them alone):\n")
    print(markdown_table(["seed", *tasks, "mean"], [[s, *(pct(results[s]["interference"][t]) for t in tasks),
                                                   pct(mean(results[s]["interference"].values()))] for s in seeds]))
    print("\n### Goals (issue #28)\n")
    print(goals_table(goals(results)))
    print(f"\nViT {vit.options()}, {sum(setup.sizes.values())} images per task, experts {setup.expert_steps} steps at "
          f"lr {setup.expert_lr:g}; total {seconds / 60:.1f} min on "
          f"{torch.get_num_threads()} thread(s) of a shared machine.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny data and steps")
    ap.add_argument("--trials", type=int, help="search trials (default 40; each default is enqueued first)")
    ap.add_argument("--expert-lr", type=float, help="experts' fine-tuning lr (default 3e-5)")
    ap.add_argument("--expert-steps", type=int, help="experts' fine-tuning steps (default 600)")
    ap.add_argument("--pretraining", choices=("grouped", "family"), default="grouped",
                    help="pretraining labels: family x groups of classes (default), or the family alone")
    ap.add_argument("--embed-dim", type=int, default=64, help="the ViT's width (default 64; heads of 16 channels)")
    ap.add_argument("--pretrain-steps", type=int, help="the backbone's pretraining steps (default 1500)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for flag in ("trials", "expert_steps", "embed_dim", "pretrain_steps", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be a positive integer, not {getattr(args, flag)}")
    if args.expert_lr is not None and not 0 < args.expert_lr < float("inf"):
        ap.error(f"--expert-lr must be a positive finite number, not {args.expert_lr}")
    setup_threads(args.threads)
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = QUICK if args.quick else Setup()
    given = {"grouped_pretraining": args.pretraining == "grouped", "trials": args.trials, "expert_lr": args.expert_lr, "expert_steps": args.expert_steps,
             "pretrain_steps": args.pretrain_steps}
    setup = dataclasses.replace(setup, **{k: v for k, v in given.items() if v is not None})
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    vit = mm.ViT(embed_dim=args.embed_dim, num_heads=max(1, args.embed_dim // 16))
    started = time.perf_counter()
    base = pretrained(setup, vit)
    log(f"pretrained in {time.perf_counter() - started:.0f} s")
    results = {s: run_seed(s, setup, vit, base, cycle_rows=CYCLE_ROWS) for s in seeds}
    report(results, vit, setup, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
