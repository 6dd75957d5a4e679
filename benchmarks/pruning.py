"""Pruning benchmark: what structured and unstructured pruning really buy, whether a searched
per-layer allocation beats a uniform one, and whether the multi-task criterion beats magnitude.

    .venv/bin/python benchmarks/pruning.py                   # the full run (< 15 min on 2 cores)
    .venv/bin/python benchmarks/pruning.py --seeds 0 --trials 6 --epochs 4   # a quick look
    .venv/bin/python benchmarks/pruning.py --parts a                         # the cost table only
    .venv/bin/python benchmarks/pruning.py --parts d                         # the coupled trunks only
    .venv/bin/python benchmarks/pruning.py --parts e                         # the ViT only

Setting: `multidigits` with its default options (20k training pairs; tasks left, right:
accuracy; sum: R²), the CNN trunk with channels [32, 64, 128] and fc 128 (≈ 3.8 M MACs and
161 k parameters dense). The dense base is trained once (`artifacts.prepare`, cached in the
temp dir, so a second run skips it). "accuracy" below is the suite's mean metric (the mean of
left accuracy, right accuracy and sum R²); every fine-tune is Adam, lr 1e-3, batch 256, on
the training split; choices are made on val; test is reported. One thread throughout.

a) Cost. Uniform per-layer sparsities found by bisection on the architecture's MACs so that
   about 0, 50 and 80 % of the MACs go; structured pruning (l2 magnitude) at those, without
   and with `round_to` = this CPU's fp32 channel block (16 with AVX-512, else 8), and
   unstructured 80 % (l2 magnitude masks, all trunk layers). Latency: `measure.latency_ms`,
   the variants timed in turn in each of several rounds (interleaved), median over rounds,
   batch 1 and batch 256, one thread, of the inference form (BatchNorm folded, channels-last)
   and, at batch 256, as trained. Accuracy after FT_A epochs of fine-tune.
b) Allocation. A target parameter count (that of uniform sparsity TARGET_UNIFORM). Per seed,
   an in-process Optuna TPE search over per-layer sparsities: each trial proposes a shape
   r ∈ [0.05, 1]^4 and sparsity s_l = min(0.95, t·r_l), t set by bisection so the pruned model
   has the target parameter count (a trial that rounding leaves outside ±3 % is discarded);
   l2 pruning, FT_B epochs, val accuracy. The best trial by val vs uniform sparsity at the same count (same pruning,
   same fine-tune, same seed), test accuracy.
c) Criterion. Uniform sparsity 0.5 / 0.7 / 0.85 on all four layers, l2 magnitude vs
   multitask_taylor ("max"), 3 seeds (the seed draws the 512 calibration samples and orders
   the fine-tune), FT_C epochs, test accuracy.
d) Coupled trunks. The built-in resnet and mobilenet trunks (COUPLED), each base trained once.
   Allocations over the coupled groups (`pruning.coupled_groups`), each one sparsity t found by
   bisection on MACs so that about 50 % go, kept widths rounded to the channel block: `uniform`
   (t on every group) and, for a trunk with depthwise convs, `depthwise` (t on the groups that
   hold one, the inverted residuals' expanded width; 0 elsewhere). A depthwise conv does few
   MACs per byte it moves, so MACs alone undersell what its width costs. Params, MACs, latency
   at batch 256 vs the dense base fine-tuned alike, test accuracy.
e) A ViT. The built-in `vit` trunk (nn.MultiheadAttention blocks), base trained 1.5 × --epochs
   (15) on 5k pairs at lr 2e-3: half of every block's heads and the MLP width found by bisection on
   MACs so that about 50 % go (params, MACs, latency at batch 256 of the inference form, test
   accuracy, vs the dense base fine-tuned alike); then l2 vs multitask_taylor with heads and
   MLP at the highest sparsity of c), one line per seed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402
import torch  # noqa: E402

from _common import goals_table, markdown_table, mean, setup_threads  # noqa: E402
from mtl_models import artifacts, suites  # noqa: E402
from mtl_models.measuring import measure  # noqa: E402
from mtl_models.pruning import attention  # noqa: E402
from mtl_models.pruning import (MAX_SPARSITY, coupled_groups, kept_units, prunable_layers, prune,  # noqa: E402
                                 without_masks)
from mtl_models.training.tasks import task_loss  # noqa: E402
from mtl_models.training.train import TrainOptions, evaluate, train  # noqa: E402
from spaces.policy import Pruning  # noqa: E402

SPEC = {"trunk": "cnn", "channels": [32, 64, 128], "fc": 128}
# d): the built-in coupled trunks, wider than their defaults so that batch-256 time is compute, not calls.
COUPLED = {"resnet": {"trunk": "resnet", "channels": [16, 32, 64], "blocks": 1},
           "mobilenet": {"trunk": "mobilenet", "channels": [16, 24, 24, 32], "expand": 4}}
MAC_TARGETS = (0.0, 0.5, 0.8)
UNSTRUCTURED = 0.8
TARGET_UNIFORM = 0.7
CRITERION_SPARSITIES = (0.5, 0.7, 0.85)
FT_A, FT_B, FT_C = 1.0, 0.5, 1.0
CALIBRATION = 512
# e): the built-in ViT; a smaller training split than a)-d) (attention is the slow part on 2 cores).
VIT = {"trunk": "vit", "dim": 64, "depth": 2, "heads": 4, "mlp": 128, "patch": 2}
VIT_PAIRS = 5000


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- helpers ---

def widths_at(sparsity: dict, round_to: int = 1) -> list[int]:
    """Kept widths [conv1, conv2, conv3, fc] at per-layer sparsities (as `prune` rounds them)."""
    names = ["trunk.conv1", "trunk.conv2", "trunk.conv3", "trunk.fc"]
    full = list(SPEC["channels"]) + [SPEC["fc"]]
    return [kept_units(w, sparsity[n], round_to) for n, w in zip(names, full)]


def architecture(suite, sparsity: dict, round_to: int = 1):
    k = widths_at(sparsity, round_to)
    return suite.build_model(trunk="cnn", channels=k[:3], fc=k[3])


def params_at(suite, sparsity):
    return measure.stored_params(architecture(suite, sparsity))


def macs_at(suite, sparsity, round_to: int = 1):
    return measure.count_macs(architecture(suite, sparsity, round_to), suite.example_inputs(1))


def channel_block() -> int:
    """fp32 channels per SIMD register here: what oneDNN blocks convolution channels by."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def bisect(f, target, lo=0.0, hi=MAX_SPARSITY, iters=40):
    """The t in [lo, hi] where the decreasing step function f(t) is closest to target."""
    best = min((lo, hi), key=lambda t: abs(f(t) - target))
    for _ in range(iters):
        mid = (lo + hi) / 2
        value = f(mid)
        if abs(value - target) < abs(f(best) - target):
            best = mid
        if value > target:
            lo = mid
        else:
            hi = mid
    return best


def uniform(layers, s):
    return {n: s for n in layers}


def calibration(suite, seed):
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(suite.train), generator=g)[:CALIBRATION]
    x, y = suite.train.x[idx], {k: v[idx] for k, v in suite.train.y.items()}

    def task_losses(model):
        out = model(x)
        return {t.name: task_loss(t, out[t.name], y[t.name]) for t in suite.tasks}
    return task_losses


def pruned(suite, base, sparsity, *, mode="structured", importance="l2", seed=0, ft=1.0, round_to=1, spec=None):
    """Base → prune → fine-tune (inside `after_step`, as the pipeline does, so that
    unstructured masks are still live and the zeros stay zero); returns the model as stored."""
    torch.manual_seed(seed)
    model = suite.build_model(**(spec or SPEC))
    model.load_state_dict(base)
    model.eval()

    def fine_tune(step, m):
        if ft > 0:
            train(m, suite, TrainOptions(epochs=ft, lr=1e-3, batch_size=256, seed=seed))

    if any(v > 0 for v in sparsity.values()):
        prune(model, Pruning(sparsity=sparsity, mode=mode, importance=importance, round_to=round_to),
              example_inputs=suite.example_inputs(2), task_losses=calibration(suite, seed), after_step=fine_tune)
    else:
        fine_tune(1, model)
    return without_masks(model).eval()


def score(model, suite, split):
    return mean(evaluate(model, suite, split).values())


# --- a) cost ---

def part_a(suite, art, rounds):
    layers = prunable_layers(suite.build_model(**SPEC))
    dense_macs = macs_at(suite, uniform(layers, 0.0))
    variants, rows = {}, {}
    block = channel_block()
    for target, round_to in [(t, 1) for t in MAC_TARGETS] + [(t, block) for t in MAC_TARGETS if t > 0]:
        s = 0.0 if target == 0 else bisect(lambda t: macs_at(suite, uniform(layers, t), round_to),
                                           dense_macs * (1 - target))
        log(f"a) structured, {target:.0%} of MACs, round_to {round_to}: uniform sparsity {s:.3f}")
        name = f"structured, {target:.0%} MACs removed" + (f", round_to {round_to}" if round_to > 1 else "")
        variants[name] = pruned(suite, art.base, uniform(layers, s), ft=FT_A, round_to=round_to)
        rows[name] = {"sparsity": f"{s:.3f} per layer (widths {widths_at(uniform(layers, s), round_to)})"}
    log("a) unstructured 80 %")
    name = f"unstructured, {UNSTRUCTURED:.0%} of weights"
    variants[name] = pruned(suite, art.base, uniform(layers, UNSTRUCTURED), mode="unstructured", ft=FT_A)
    rows[name] = {"sparsity": f"{UNSTRUCTURED} of each layer's weights zeroed"}
    dense_name = next(iter(variants))
    log("a) timing (interleaved) ...")
    lat1 = measure.interleaved_latency_ms(variants, suite.example_inputs(1), rounds=rounds, runs=100, warmup=10)
    lat256 = measure.interleaved_latency_ms(variants, suite.example_inputs(256), rounds=rounds, runs=10, warmup=2)
    trained256 = measure.interleaved_latency_ms(variants, suite.example_inputs(256), rounds=rounds, runs=10, warmup=2,
                                                as_trained=True)
    table = []
    for name, model in variants.items():
        m = measure.count_macs(model, suite.example_inputs(1))
        table.append([name, rows[name]["sparsity"], f"{measure.stored_params(model):,}",
                      f"{measure.nonzero_params(model):,}", f"{measure.storage_bytes(model) / 1024:.0f}",
                      f"{m / 1e6:.2f} ({m / dense_macs:.2f}×)",
                      f"{lat1[name]:.3f} ({lat1[name] / lat1[dense_name]:.2f}×)",
                      f"{lat256[name]:.1f} ({lat256[name] / lat256[dense_name]:.2f}×)",
                      f"{trained256[name]:.1f} ({trained256[name] / trained256[dense_name]:.2f}×)",
                      f"{score(model, suite, 'test'):.4f}"])
    print(f"\n### a) What pruning buys (CNN [32, 64, 128] / fc 128, l2 magnitude, {FT_A:g} epoch fine-tune)\n")
    print(markdown_table(["variant", "sparsity", "params (stored)", "non-zero params", "KiB (dense or CSR)",
                          "MACs M (vs dense)", "latency ms @1 (vs dense)", "latency ms @256 (vs dense)",
                          "as trained: latency ms @256 (vs dense)",
                          "test accuracy"], table))
    print(f"\nLatency: median over {rounds} interleaved rounds (each the median of 100 runs at batch 1, "
          f"10 at batch 256; the order rotates every round), one thread, of each model's inference form "
          f"(`measure.inference_form`: BatchNorm folded into the conv before it, channels-last; what trials measure). "
          f"The 'as trained' column times the same models unfolded, NCHW. The first row is the dense base, fine-tuned like the others. "
          f"Unstructured zeros save storage (CSR) and nothing else: MACs and latency stay dense.")
    half = f"structured, {MAC_TARGETS[1]:.0%} MACs removed"
    rounded = f"{half}, round_to {block}"
    return {"ratio256_half": lat256[half] / lat256[dense_name],
            "ratio256_half_trained": trained256[half] / trained256[dense_name],
            "ratio256_rounded": lat256[rounded] / lat256[dense_name], "round_to": block,
            "macs_rounded": measure.count_macs(variants[rounded], suite.example_inputs(1)) / dense_macs,
            "ratio256_unstructured": lat256[f"unstructured, {UNSTRUCTURED:.0%} of weights"] / lat256[dense_name]}


# --- d) coupled trunks: ResNet (residual adds, downsample branches), MobileNetV2 (depthwise) ---

def depthwise_groups(model, groups) -> set[str]:
    """The coupled groups that hold a depthwise conv (groups == in_channels > 1): an inverted
    residual's expanded width, the one its depthwise conv runs over."""
    modules = dict(model.named_modules())
    return {g for g, members in groups.items()
            if any(isinstance(modules[n], torch.nn.Conv2d) and modules[n].groups > 1
                   and modules[n].groups == modules[n].in_channels for n in members)}


def part_d(suite, epochs, cache, rounds):
    """Per trunk, allocations that each remove about half of the MACs (bisection on one t, kept
    widths rounded to the channel block): `uniform`, t on every coupled group; and where the
    trunk has depthwise convs, `depthwise`, t on the groups that hold one (the expanded width)
    and 0 on the rest. Dense and pruned fine-tuned alike, timed interleaved at batch 256."""
    block, out, ratios = channel_block(), [], {}
    for name, spec in COUPLED.items():
        art = artifacts.prepare(suite, spec, artifacts.TrainSpec(epochs=epochs), cache_dir=cache, log=log)
        x = suite.example_inputs(2)
        fresh = suite.build_model(**spec)
        groups = coupled_groups(fresh, x)
        dense_macs = measure.count_macs(fresh, x[:1])
        allocations = {"uniform": set(groups)}
        if depthwise := depthwise_groups(fresh, groups):
            allocations["depthwise"] = depthwise

        def at(chosen, t):
            return {g: (t if g in chosen else 0.0) for g in groups}

        def macs(chosen, t):
            m = prune(suite.build_model(**spec).eval(), Pruning(sparsity=at(chosen, t), round_to=block),
                      example_inputs=x)
            return measure.count_macs(m, x[:1])

        variants, labels = {"dense": pruned(suite, art.base, at((), 0.0), ft=FT_A, spec=spec)}, {"dense": "dense"}
        for label, chosen in allocations.items():
            t = bisect(lambda t: macs(chosen, t), dense_macs * (1 - MAC_TARGETS[1]), iters=12)
            log(f"d) {name} {label}: {len(chosen)} of {len(groups)} coupled groups at {t:.3f}, round_to {block}")
            variants[label] = pruned(suite, art.base, at(chosen, t), ft=FT_A, round_to=block, spec=spec)
            labels[label] = f"{label}: {t:.3f} on {len(chosen)} of {len(groups)} groups"
        lat = measure.interleaved_latency_ms(variants, suite.example_inputs(256), rounds=rounds, runs=10, warmup=2)
        ratios[name] = {label: lat[label] / lat["dense"] for label in allocations}
        for variant, model in variants.items():
            m = measure.count_macs(model, x[:1])
            out.append([name, labels[variant], f"{measure.stored_params(model):,}",
                        f"{m / 1e6:.2f} ({m / dense_macs:.2f}×)",
                        f"{lat[variant]:.2f} ({lat[variant] / lat['dense']:.2f}×)", f"{score(model, suite, 'test'):.4f}"])
    print(f"\n### d) Coupled trunks at about {MAC_TARGETS[1]:.0%} of MACs removed (l2 magnitude, one sparsity "
          f"per coupled group, {FT_A:g} epoch fine-tune, base {epochs:g} epochs)\n")
    print(markdown_table(["trunk", "allocation", "params (stored)", "MACs M (vs dense)", "latency ms @256 (vs dense)",
                          "test accuracy"], out))
    print(f"\nTrunks: {'; '.join(f'{n} {spec}' for n, spec in COUPLED.items())}. Latency as in a) (inference form, "
          f"one thread, median over {rounds} interleaved rounds of 10 runs).")
    return ratios


# --- e) a ViT: attention heads + MLP width ---

def part_e(epochs, cache, rounds, seeds):
    """The built-in ViT (nn.MultiheadAttention blocks) on multidigits: half of every block's
    heads and the MLP width that brings the MACs to about half, l2 magnitude; then l2 vs
    multitask_taylor with heads and MLP at the highest criterion sparsity, over `seeds`."""
    suite = suites.get("multidigits", train_pairs=VIT_PAIRS)
    art = artifacts.prepare(suite, VIT, artifacts.TrainSpec(epochs=epochs, lr=2e-3), cache_dir=cache, log=log)
    x = suite.example_inputs(2)
    fresh = suite.build_model(**VIT)
    heads = [n for n in coupled_groups(fresh, x) if n in attention.sites(fresh)]
    mlp = [n for n in coupled_groups(fresh, x) if n.endswith(".fc1")]
    dense_macs = measure.count_macs(fresh, x[:1])

    def macs(t):
        m = prune(suite.build_model(**VIT).eval(), Pruning(sparsity={**uniform(heads, 0.5), **uniform(mlp, t)}),
                  example_inputs=x)
        return measure.count_macs(m, x[:1])

    s = bisect(macs, dense_macs * (1 - MAC_TARGETS[1]), iters=12)
    log(f"e) vit: heads 0.5, mlp {s:.3f}")
    variants = {"dense": pruned(suite, art.base, uniform(heads, 0.0), ft=FT_A, spec=VIT),
                "pruned": pruned(suite, art.base, {**uniform(heads, 0.5), **uniform(mlp, s)}, ft=FT_A, spec=VIT)}
    lat = measure.interleaved_latency_ms(variants, suite.example_inputs(256), rounds=rounds, runs=10, warmup=2)
    rows = []
    for variant, model in variants.items():
        m = measure.count_macs(model, x[:1])
        kept = [attention.heads_of(dict(model.named_modules())[n]) for n in heads]
        width = [dict(model.named_modules())[n].out_features for n in mlp]
        rows.append([variant, f"{kept} heads, MLP {width}", f"{measure.stored_params(model):,}",
                     f"{m / 1e6:.2f} ({m / dense_macs:.2f}×)", f"{lat[variant]:.2f} ({lat[variant] / lat['dense']:.2f}×)",
                     f"{score(model, suite, 'test'):.4f}"])
    print(f"\n### e) ViT {VIT} on multidigits ({VIT_PAIRS} training pairs, base {epochs:g} epochs at lr 2e-3): "
          f"heads + MLP at about {MAC_TARGETS[1]:.0%} of MACs removed (l2, {FT_A:g} epoch fine-tune)\n")
    print(markdown_table(["variant", "kept", "params (stored)", "MACs M (vs dense)", "latency ms @256 (vs dense)",
                          "test accuracy"], rows))
    top, crit = max(CRITERION_SPARSITIES), []
    for seed in seeds:
        got = {imp: score(pruned(suite, art.base, {**uniform(heads, top), **uniform(mlp, top)}, importance=imp,
                                 seed=seed, ft=FT_C, spec=VIT), suite, "test") for imp in ("l2", "multitask_taylor")}
        log(f"e) vit s={top} seed {seed}: {got}")
        crit.append([seed, f"{got['l2']:.4f}", f"{got['multitask_taylor']:.4f}",
                     f"{got['multitask_taylor'] - got['l2']:+.4f}"])
    print(f"\nHeads and MLP at sparsity {top}, {FT_C:g} epoch fine-tune, test accuracy:\n")
    print(markdown_table(["seed", "l2", "multitask_taylor", "multitask − l2"], crit))
    wins = sum(float(r[2]) >= float(r[1]) for r in crit)
    return lat["pruned"] / lat["dense"], variants, dense_macs, wins, len(crit)


# --- b) searched allocation vs uniform at equal parameter count ---

def part_b(suite, art, seeds, trials):
    layers = prunable_layers(suite.build_model(**SPEC))
    target = params_at(suite, uniform(layers, TARGET_UNIFORM))
    dense = params_at(suite, uniform(layers, 0.0))

    def shaped(r, t):
        return {n: min(MAX_SPARSITY, t * r_l) for n, r_l in zip(layers, r)}

    def project(r):
        t = bisect(lambda t: params_at(suite, shaped(r, t)), target, lo=0.0, hi=MAX_SPARSITY / min(r))
        return shaped(r, t)

    s_uniform = project([1.0] * len(layers))
    rows, wins = [], 0
    for seed in seeds:
        uni_model = pruned(suite, art.base, s_uniform, seed=seed, ft=FT_B)
        uni_val, uni_test = score(uni_model, suite, "val"), score(uni_model, suite, "test")
        results = []

        def objective(trial):
            r = [trial.suggest_float(f"r.{n}", 0.05, 1.0) for n in layers]
            s = project(r)
            p = params_at(suite, s)
            if abs(p - target) > 0.03 * target:
                raise optuna.TrialPruned(f"{p} params is outside ±3 % of {target}")
            model = pruned(suite, art.base, s, seed=seed, ft=FT_B)
            val = score(model, suite, "val")
            results.append((val, score(model, suite, "test"), s, p))
            return val

        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, trials // 3), multivariate=True)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        started = time.perf_counter()
        study.optimize(objective, n_trials=trials)
        val, test, s, p = max(results, key=lambda r: r[0])
        wins += test > uni_test
        log(f"b) seed {seed}: {len(results)} trials in {time.perf_counter() - started:.0f} s; "
            f"best val {val:.4f} (test {test:.4f}) vs uniform val {uni_val:.4f} (test {uni_test:.4f})")
        rows.append([seed, f"{uni_test:.4f} (val {uni_val:.4f})", f"{test:.4f} (val {val:.4f})",
                     f"{test - uni_test:+.4f}", str(widths_at(s)), f"{p:,}", len(results)])
    print(f"\n### b) Searched per-layer sparsity vs uniform at equal parameter count "
          f"({target:,} params, {target / dense:.1%} of dense; l2 pruning, {FT_B:g} epoch fine-tune)\n")
    print(markdown_table(["seed", "uniform test", "searched test (best trial by val)", "searched − uniform",
                          "searched widths [conv1, conv2, conv3, fc]", "searched params", "trials"], rows))
    print(f"\nUniform: sparsity {s_uniform[layers[0]]:.3f} on every layer, widths "
          f"{widths_at(s_uniform)}, {params_at(suite, s_uniform):,} params. Search: Optuna TPE "
          f"(multivariate, {max(4, trials // 3)} random start-up trials), {trials} trials per seed; "
          f"a trial whose widths miss the target by more than ±3 % (rounding) is discarded, so "
          f"'trials' counts those evaluated.")
    return wins


# --- c) multi-task criterion vs magnitude ---

def part_c(suite, art, seeds):
    layers = prunable_layers(suite.build_model(**SPEC))
    rows, at_top = [], []
    for s in CRITERION_SPARSITIES:
        pairs = []
        for seed in seeds:
            got = {}
            for importance in ("l2", "multitask_taylor"):
                started = time.perf_counter()
                model = pruned(suite, art.base, uniform(layers, s), importance=importance, seed=seed, ft=FT_C)
                got[importance] = score(model, suite, "test")
                log(f"c) s={s} seed {seed} {importance}: {got[importance]:.4f} ({time.perf_counter() - started:.0f} s)")
            pairs.append((got["l2"], got["multitask_taylor"]))
            rows.append([s, seed, f"{got['l2']:.4f}", f"{got['multitask_taylor']:.4f}",
                         f"{got['multitask_taylor'] - got['l2']:+.4f}"])
        rows.append([s, "mean", f"{mean(p[0] for p in pairs):.4f}", f"{mean(p[1] for p in pairs):.4f}",
                     f"{mean(p[1] - p[0] for p in pairs):+.4f}"])
        if s == max(CRITERION_SPARSITIES):
            at_top = pairs
    print(f"\n### c) multitask_taylor (max) vs l2 magnitude, uniform sparsity, {FT_C:g} epoch fine-tune, test accuracy\n")
    print(markdown_table(["sparsity", "seed", "l2", "multitask_taylor", "multitask − l2"], rows))
    return sum(m >= l for l, m in at_top), len(at_top)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=20, help="search trials per seed in b)")
    p.add_argument("--epochs", type=float, default=10.0, help="dense base training epochs")
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds in a) and d)")
    p.add_argument("--coupled-epochs", type=float, default=4.0, help="d): the coupled trunks' base training epochs")
    p.add_argument("--vit-epochs", type=float, default=None, help="e)'s ViT base epochs (default: 1.5 × --epochs)")
    p.add_argument("--parts", default="abcde", help="which of the parts a, b, c, d, e to run")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "prunefuse-bench-pruning"))
    args = p.parse_args(argv)
    setup_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    suite = suites.get("multidigits")
    art = artifacts.prepare(suite, SPEC, artifacts.TrainSpec(epochs=args.epochs), cache_dir=args.cache, log=log)
    dense = artifacts.TrainSpec(epochs=args.epochs)
    print(f"## Pruning benchmark: multidigits (default options), CNN {SPEC['channels']} / fc {SPEC['fc']}\n")
    print(f"Dense base ({dense.epochs:g} epochs): val {mean(art.dense_metrics['val'].values()):.4f}, "
          f"test {mean(art.dense_metrics['test'].values()):.4f} mean accuracy "
          f"({', '.join(f'{t} {v:.3f}' for t, v in art.dense_metrics['test'].items())} on test).")
    timings, goals = {}, []
    need = (2 * len(args.seeds) + 2) // 3
    if "a" in args.parts:
        t0 = time.perf_counter()
        a = part_a(suite, art, args.rounds)
        timings["a"] = time.perf_counter() - t0
        goals.append(("structured, 50 % MACs removed: latency @256 ≤ 0.65× dense", a["ratio256_rounded"] <= 0.65,
                      f"{a['ratio256_rounded']:.2f}× with round_to {a['round_to']} ({a['macs_rounded']:.2f}× MACs); "
                      f"without rounding {a['ratio256_half']:.2f}×, and {a['ratio256_half_trained']:.2f}× timed as "
                      f"trained (BatchNorm unfolded, NCHW); unstructured 80 %: {a['ratio256_unstructured']:.2f}×"))
    if "b" in args.parts:
        t0 = time.perf_counter()
        b_wins = part_b(suite, art, args.seeds, args.trials)
        timings["b"] = time.perf_counter() - t0
        goals.append((f"searched allocation beats uniform (test) in ≥ {need} of {len(args.seeds)} seeds",
                      b_wins >= need, f"{b_wins} of {len(args.seeds)}"))
    if "c" in args.parts:
        t0 = time.perf_counter()
        c_wins, c_n = part_c(suite, art, args.seeds)
        timings["c"] = time.perf_counter() - t0
        goals.append((f"multitask_taylor ≥ l2 at sparsity {max(CRITERION_SPARSITIES)} in ≥ {need} of {c_n} seeds",
                      c_wins >= need, f"{c_wins} of {c_n}"))
    if "d" in args.parts:
        t0 = time.perf_counter()
        d = part_d(suite, min(args.epochs, args.coupled_epochs), args.cache, args.rounds)
        timings["d"] = time.perf_counter() - t0
        for name, by_allocation in d.items():
            best = min(by_allocation, key=by_allocation.get)
            goals.append((f"{name} trunk, 50 % MACs removed: latency @256 ≤ 0.65× dense", by_allocation[best] <= 0.65,
                          ", ".join(f"{a} {r:.2f}×" for a, r in by_allocation.items())))
    if "e" in args.parts:
        t0 = time.perf_counter()
        ratio, _, _, e_wins, e_n = part_e(args.vit_epochs or 1.5 * args.epochs, args.cache, args.rounds, args.seeds)
        timings["e"] = time.perf_counter() - t0
        goals.append(("ViT, heads + MLP, 50 % MACs removed: latency @256 ≤ 0.65× dense", ratio <= 0.65, f"{ratio:.2f}×"))
        goals.append((f"ViT: multitask_taylor ≥ l2 at sparsity {max(CRITERION_SPARSITIES)} in ≥ {need} of {e_n} seeds",
                      e_wins >= need, f"{e_wins} of {e_n}"))
    print("\n### Goals\n")
    print(goals_table(goals))
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    print(f"\nWall time: {time.perf_counter() - started:.0f} s ({parts}; the rest is the dense base, or loading it "
          f"from {args.cache}).")


if __name__ == "__main__":
    main()
