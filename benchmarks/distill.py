"""Distillation benchmark: does learning the dense model's outputs recover what pruning costs?

    .venv/bin/python benchmarks/distill.py            # the full run (3 seeds; ~5 CPU-minutes)
    .venv/bin/python benchmarks/distill.py --quick    # a smoke run (1 seed, tiny suite)

Setting: `multidigits` (4,000 training pairs; tasks left, right: accuracy; sum: R²), the CNN
trunk at half the default width ([16, 32, 64] / fc 64, ~1 M MACs, so three seeds fit in
minutes on a shared CPU). Per seed, the dense base is trained (seed s: its init and data
order; cached in the temp dir). At about 50 % and 80 % of the trunk's MACs removed (one
uniform sparsity for all four layers, found by bisection on the pruned architecture's MACs),
the same policy (structured, l2 magnitude, one shot) runs the cycle through `apply_policy`
twice: fine-tuned on labels only, and with `finetune.distill` (teacher: the dense base,
weight 1, temperature 2), the same fine-tune epochs, lr, batch and seed. Reported: the mean
task metric on the test split (left and right accuracy, sum R²; all higher-is-better), each
seed, the mean over seeds, and in how many seeds distillation is ahead. One thread.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import markdown_table, mean, setup_threads  # noqa: E402
from mtl_models import artifacts, suites  # noqa: E402
from mtl_models.measuring import measure  # noqa: E402
from mtl_models.pipeline import MeasureSpec, apply_policy  # noqa: E402
from mtl_models.pruning import kept_units, prunable_layers  # noqa: E402
from spaces import Policy  # noqa: E402
from spaces.vocabulary import POLICY_SCHEMA, test_metric  # noqa: E402

SPEC = {"trunk": "cnn", "channels": [16, 32, 64], "fc": 64}
TARGETS = (0.5, 0.8)                 # fraction of MACs removed
DISTILL = {"weight": 1.0, "temperature": 2.0, "teacher": "dense"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def macs_removed(suite, s: float) -> float:
    """Fraction of the dense trunk's MACs a uniform sparsity `s` removes (as `prune` rounds widths)."""
    kept = [kept_units(w, s) for w in [*SPEC["channels"], SPEC["fc"]]]
    pruned = suite.build_model(trunk="cnn", channels=kept[:3], fc=kept[3])
    dense = suite.build_model(**SPEC)
    x = suite.example_inputs(1)
    return 1.0 - measure.count_macs(pruned, x) / measure.count_macs(dense, x)


def sparsity_for(suite, target: float, iters: int = 30) -> float:
    lo, hi = 0.0, 0.95
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs_removed(suite, mid) < target else (lo, mid)
    return min((lo, hi), key=lambda s: abs(macs_removed(suite, s) - target))


def run(suite, art, layers, s: float, seed: int, epochs: float, distill: dict | None) -> float:
    policy = Policy.from_dict({
        "schema": POLICY_SCHEMA, "suite": suite.spec, "model": dict(SPEC),
        "weighting": {"method": "equal"}, "pruning": {"importance": "l2", "sparsity": {n: s for n in layers}},
        "finetune": {"epochs": epochs, "distill": distill}, "seed": seed,
    }, source="distill benchmark")
    _, metrics = apply_policy(suite, policy, art, measure_spec=MeasureSpec(runs=1, warmup=0, latency_batch=8))
    return mean([metrics[test_metric(t)] for t in suite.task_names])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=float, default=2.0, help="fine-tune epochs (both variants)")
    p.add_argument("--base-epochs", type=float, default=8.0)
    p.add_argument("--train-pairs", type=int, default=4000)
    p.add_argument("--weight", type=float, default=DISTILL["weight"], help="distillation weight")
    p.add_argument("--temperature", type=float, default=DISTILL["temperature"])
    p.add_argument("--quick", action="store_true", help="1 seed, a tiny suite, short training (a smoke run)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "prunefuse-bench-distill"),
                   help="where the dense bases are cached")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.base_epochs, args.train_pairs = "0", 0.5, 1.0, 600
    setup_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    pairs = dict(train_pairs=args.train_pairs, val_pairs=max(200, args.train_pairs // 8),
                 test_pairs=max(200, args.train_pairs // 4))
    suite = suites.get("multidigits", **pairs)
    layers = prunable_layers(suite.build_model(**SPEC))
    sparsities = {t: sparsity_for(suite, t) for t in TARGETS}
    cache = Path(args.cache)
    scores: dict = {}
    dense: list = []
    for seed in seeds:
        art = artifacts.prepare(suite, dict(SPEC), artifacts.TrainSpec(epochs=args.base_epochs, seed=seed),
                                cache_dir=cache, log=log)
        dense.append(mean(list(art.dense_metrics["test"].values())))
        for target, s in sparsities.items():
            distill = {**DISTILL, "weight": args.weight, "temperature": args.temperature}
            for name, distill in (("labels only", None), ("distilled", distill)):
                torch.manual_seed(seed)
                scores[(target, name, seed)] = run(suite, art, layers, s, seed, args.epochs, distill)
                log(f"seed {seed}, {target:.0%} MACs removed, {name}: mean test metric {scores[(target, name, seed)]:.4f}")
    rows = []
    for target, s in sparsities.items():
        plain = [scores[(target, "labels only", seed)] for seed in seeds]
        taught = [scores[(target, "distilled", seed)] for seed in seeds]
        wins = sum(t > q for t, q in zip(taught, plain))
        rows.append([f"{macs_removed(suite, s):.0%} (s = {s:.3f})",
                     ", ".join(f"{v:.4f}" for v in plain), f"{mean(plain):.4f}",
                     ", ".join(f"{v:.4f}" for v in taught), f"{mean(taught):.4f}",
                     f"{mean(taught) - mean(plain):+.4f}", f"{wins} of {len(seeds)}"])
    print(f"\nmultidigits ({args.train_pairs} training pairs), CNN {SPEC['channels']} / fc {SPEC['fc']}, base "
          f"{args.base_epochs:g} epochs, fine-tune {args.epochs:g} epochs, seeds {seeds}; distillation from the dense "
          f"base, weight {args.weight:g}, temperature {args.temperature:g}; mean task metric on test (left, right "
          f"accuracy; sum R²); dense bases: {', '.join(f'{d:.4f}' for d in dense)}\n")
    print(markdown_table(["MACs removed", "labels only (per seed)", "mean", "distilled (per seed)", "mean",
                          "distilled − labels", "distillation ahead"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
