"""Deployment benchmark: does int8 pay where the model runs, and which runtime should run it?

multidigits, the MLP trunk (3 × 256) and the CNN trunk ([32, 64, 128], fc 128), each dense and
structurally pruned (l2, uniform sparsity bisected to remove ~50% of MACs, `round_to` 16 on
the CNN as in the pruning benchmark, 2 fine-tune epochs: `pipeline.apply_policy`, the cycle a
trial runs). Each model in six forms:

  torch fp32          its inference form in eager PyTorch (what `--latency-backend torch` times)
  torch int8 dynamic  torch.ao.quantization.quantize_dynamic (int8 Linear weights, x86 engine)
  torch int8 static   torch.ao FX post-training quantization, x86 qconfig (per-channel weights),
                      calibrated on the first 512 training rows
  ORT fp32            the exported graph (`deploy.export_onnx`) in ONNX Runtime's CPU provider
  ORT int8 dynamic    `quantize.quantize(..., dynamic_int8)`: what a policy's dynamic_int8 ships
  ORT int8 static     `quantize.quantize(..., static_int8)`, 512 calibration rows (QDQ)

Latency: median over interleaved rounds (every form timed in turn within a round), one thread,
batch 1 and 256. Bytes: the weights as stored (fp32: `measure.storage_bytes`; ONNX: the graph's
initializers; torch.ao: its serialised state dict). Accuracy: mean test metric of the tasks
(left / right accuracy, sum R²), ×100 = points.

    .venv/bin/python benchmarks/deploy.py            # ~5 min (trains two bases once, cached)
    .venv/bin/python benchmarks/deploy.py --quick    # a smoke run (tests/test_benchmarks.py)
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import goals_table, markdown_table, mean, setup_threads  # noqa: E402
from mtl_models import artifacts, suites  # noqa: E402
from mtl_models.deployment import deploy, quantize  # noqa: E402
from mtl_models.measuring import measure  # noqa: E402
from mtl_models.pipeline import MeasureSpec, apply_policy  # noqa: E402
from mtl_models.pruning import prunable_layers, prune  # noqa: E402
from mtl_models.training.train import evaluate  # noqa: E402
from spaces import Policy  # noqa: E402
from spaces.policy import Pruning, Quantization  # noqa: E402
from spaces.vocabulary import POLICY_SCHEMA  # noqa: E402

TRUNKS = {"mlp": {"trunk": "mlp"}, "cnn": {"trunk": "cnn", "channels": [32, 64, 128], "fc": 128}}
ROUND_TO = {"mlp": 1, "cnn": 16}
FORMS = ("torch fp32", "torch int8 dynamic", "torch int8 static", "ORT fp32", "ORT int8 dynamic", "ORT int8 static")
CALIBRATION = 512
MAC_TARGET = 0.5


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def policy_for(suite, spec: dict, train: artifacts.TrainSpec, sparsity: dict, round_to: int, ft: float) -> Policy:
    from dataclasses import asdict

    return Policy.from_dict({"schema": POLICY_SCHEMA, "suite": suite.spec, "model": spec,
                             "base": asdict(train), "weighting": {"method": "equal"},
                             "pruning": {"sparsity": sparsity, "round_to": round_to},
                             "finetune": {"epochs": ft}}, source="deploy benchmark")


def macs_removed(suite, art, spec, s: float, round_to: int) -> float:
    model = suite.build_model(**spec)
    model.load_state_dict(art.base)
    dense = measure.count_macs(model, suite.example_inputs(1))
    layers = prunable_layers(model)
    prune(model, Pruning(sparsity={n: s for n in layers}, round_to=round_to), example_inputs=suite.example_inputs(2))
    return 1 - measure.count_macs(model, suite.example_inputs(1)) / dense


def sparsity_for(suite, art, spec, round_to: int, iters: int = 12) -> float:
    """The uniform sparsity whose pruned model removes closest to MAC_TARGET of the MACs."""
    lo, hi, best = 0.0, 0.9, (1.0, 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        removed = macs_removed(suite, art, spec, mid, round_to)
        best = min(best, (abs(removed - MAC_TARGET), mid))
        lo, hi = (mid, hi) if removed < MAC_TARGET else (lo, mid)
    return best[1]


def torch_int8(model, suite, static: bool):
    """torch.ao int8 forms of the eval-mode model (x86 engine)."""
    torch.backends.quantized.engine = "x86"
    fp32 = copy.deepcopy(model).eval()
    if not static:
        return torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(fp32, get_default_qconfig_mapping("x86"), (suite.example_inputs(2),))
        with torch.no_grad():
            for i in range(0, CALIBRATION, 64):
                prepared(suite.train.x[i:i + 64])
        return quantize_fx.convert_fx(prepared)


def serialised_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def forms_of(model, suite, threads: int) -> dict:
    """form name -> (callable on a torch batch, bytes, the model `evaluate` scores)."""
    form = measure.inference_form(model)
    channels_last = any(isinstance(m, torch.nn.Conv2d) for m in form.modules())

    def eager(m, layout):
        def call(x):
            with torch.no_grad():
                return m(x.contiguous(memory_format=torch.channels_last) if layout else x)
        return call

    graph = deploy.export_onnx(model, suite.example_inputs(2))
    out = {"torch fp32": (eager(form, channels_last), measure.storage_bytes(model), model)}
    for name, static in (("torch int8 dynamic", False), ("torch int8 static", True)):
        q = torch_int8(model, suite, static)
        out[name] = (eager(q, False), serialised_bytes(q), q)
    ort_fp32 = deploy.OnnxModel(graph, threads=threads)
    out["ORT fp32"] = (ort_fp32, deploy.graph_bytes(graph), ort_fp32)
    for name, method in (("ORT int8 dynamic", "dynamic_int8"), ("ORT int8 static", "static_int8")):
        q = quantize.quantize(model, suite, Quantization(method=method, calibration_samples=CALIBRATION),
                              threads=threads)
        out[name] = (q, deploy.graph_bytes(q.onnx_model), q)
    return out


def interleaved(calls: dict, x, *, rounds: int, runs: int, warmup: int) -> dict:
    samples = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(deploy.median_ms(calls[name], x, warmup=warmup, runs=runs))
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny data and timing: a smoke run")
    p.add_argument("--trunks", default="mlp,cnn")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--cache", default="runs/_artifacts")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    if args.quick:
        suite = suites.get("multidigits", train_pairs=1500, val_pairs=300, test_pairs=300)
        train, ft, rounds, runs = artifacts.TrainSpec(epochs=1, expert_epochs=0), 0.2, 1, {1: 3, 256: 2}
    else:
        suite = suites.get("multidigits")
        train, ft, rounds, runs = artifacts.TrainSpec(epochs=15, expert_epochs=0), 2.0, 7, {1: 50, 256: 10}
    rounds = args.rounds or rounds
    rows, results = [], {}
    for trunk in args.trunks.split(","):
        spec = TRUNKS[trunk]
        art = artifacts.prepare(suite, spec, train, cache_dir=args.cache, experts=False, log=log)
        s = sparsity_for(suite, art, spec, ROUND_TO[trunk], iters=4 if args.quick else 12)
        for variant, sparsity in (("dense", 0.0), ("pruned", s)):
            layers = prunable_layers(suite.build_model(**spec))
            policy = policy_for(suite, spec, train, {n: sparsity for n in layers} if sparsity else {},
                                ROUND_TO[trunk] if sparsity else 1, ft if sparsity else 0.0)
            model, metrics = apply_policy(suite, policy, art, measure_spec=MeasureSpec(runs=2, warmup=1))
            model.eval()
            label = f"{trunk} {variant}" + (f" ({1 - metrics['macs'] / results[f'{trunk} dense']['macs']:.0%} "
                                            f"MACs removed)" if sparsity else "")
            log(f"{label}: sparsity {sparsity:.3f}, {metrics['params']:,} params; timing {len(FORMS)} forms ...")
            forms = forms_of(model, suite, args.threads)
            lat = {b: interleaved({n: f[0] for n, f in forms.items()}, suite.example_inputs(b), rounds=rounds,
                                  runs=runs[b], warmup=2) for b in (1, 256)}
            acc = {n: 100 * mean(evaluate(f[2], suite, "test").values()) for n, f in forms.items()}
            results[f"{trunk} {variant}"] = {"macs": metrics["macs"], "lat": lat, "acc": acc,
                                             "bytes": {n: f[1] for n, f in forms.items()}}
            r = results[f"{trunk} {variant}"]
            for n in FORMS:
                base = "torch fp32" if n.startswith("torch") else "ORT fp32"
                rows.append([label if n == FORMS[0] else "", n, f"{lat[1][n]:.3f}", f"{lat[256][n]:.2f}",
                             f"{lat[256][n] / lat[256][base]:.2f}×", f"{lat[256][n] / lat[256]['torch fp32']:.2f}×",
                             f"{r['bytes'][n]:,}", f"{r['bytes'][n] / r['bytes'][base]:.2f}×", f"{acc[n]:.2f}"])
    print(f"\n### Deployment: latency (ms, median of {rounds} interleaved rounds, {args.threads} thread), bytes, "
          f"test accuracy\n")
    print(markdown_table(["model", "form", "latency @1", "latency @256", "@256 vs fp32 same runtime",
                          "@256 vs torch fp32", "bytes", "bytes vs fp32", "test metric (points)"], rows))
    print()
    print(goals_table(goals(results)))
    return 0


def goals(results: dict) -> list:
    """An int8 form ≤ 0.3× its fp32 bytes, ≤ 0.7× its fp32 latency at batch 256 (same runtime),
    ≤ 1 point of accuracy lost, on at least one trunk; the best candidate is shown either way."""
    candidates = []
    for model, r in results.items():
        for n in FORMS:
            if "int8" not in n:
                continue
            base = "torch fp32" if n.startswith("torch") else "ORT fp32"
            b, t, a = (r["bytes"][n] / r["bytes"][base], r["lat"][256][n] / r["lat"][256][base],
                       r["acc"][base] - r["acc"][n])
            candidates.append((b <= 0.3 and t <= 0.7 and a <= 1.0, -max(b / 0.3, t / 0.7), model, n, b, t, a))
    ok, _, model, n, b, t, a = max(candidates)
    return [("an int8 model ≤ 0.3× fp32 bytes, ≤ 0.7× latency @256, ≤ 1 point lost, on one trunk", ok,
             f"best: {model}, {n}: {b:.2f}× bytes, {t:.2f}× latency @256, {a:+.2f} points lost")]


if __name__ == "__main__":
    sys.exit(main())
