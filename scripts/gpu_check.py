"""The GPU path end to end, on one machine, in a few minutes (run by scripts/gpu_check.sh).

1. a search of 4 trials, `steps: 2` with `--early-stop asha`, at 0.5 GPU a trial (two trials share the GPU);
2. `prunefuse apply` of the most pruned finished trial on CUDA;
3. latency on CUDA vs the CPU of the dense base and that pruned model;
then one table. Without CUDA the same search and apply run on the CPU, the CUDA column is
skipped, and the script says so and exits 0. Any broken expectation exits 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PRUNEFUSE = str(Path(sys.executable).parent / "prunefuse")
TRIALS = 4
SUITE = ["--suite-option", "train_pairs=4000", "--suite-option", "val_pairs=1000", "--suite-option", "test_pairs=1000"]
TRAIN = ["--train-option", "epochs=3"]
MEASURE = ["--measure-option", "runs=10", "--measure-option", "latency_batch=256"]


def space(cuda: bool) -> str:
    # fp16 on CUDA exercises autocast, the grad scaler and the half-precision latency.
    return (f"pruning: {{importance: l2, steps: 2, sparsity: {{low: 0.3, high: 0.85}}}}\n"
            f"fusion: {{method: none}}\n"
            f"finetune: {{epochs: 1.0, precision: {'fp16' if cuda else 'fp32'}}}\n")


def cli(*args, timeout=400) -> str:
    proc = subprocess.run([PRUNEFUSE, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"gpu_check: `prunefuse {' '.join(map(str, args[:2]))} ...` failed ({proc.returncode}):\n"
                 f"{proc.stderr[-3000:]}")
    return proc.stdout


def check(ok: bool, what: str, failures: list) -> None:
    if not ok:
        failures.append(what)


def trial_spans(exp: Path) -> list[tuple[float, float]]:
    """(start, last report) of each trial, wall clock, from its result.json (search/trial.py)."""
    spans = []
    for f in exp.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows and "started_at" in rows[-1]:
            spans.append((rows[-1]["started_at"], rows[-1]["reported_at"]))
    return spans


def most_at_once(spans) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda t: (t[0], t[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def latencies(models: dict, cuda: bool) -> dict:
    from mtl_models.measuring import measure
    from mtl_models.training.device import device_name

    x = next(iter(models.values()))[1]
    out = {name: {} for name in models}
    cpu = measure.interleaved_latency_ms({n: m for n, (m, _) in models.items()}, x, rounds=5, runs=10, threads=1)
    for name in models:
        out[name]["cpu"] = cpu[name]
    if cuda:
        gpu = measure.interleaved_latency_ms({n: m for n, (m, _) in models.items()}, x, rounds=5, runs=20,
                                             device="cuda")
        for name, (model, _) in models.items():
            out[name]["cuda"] = gpu[name]
            out[name]["cuda_fp16"] = measure.latency_ms(model, x, runs=20, device="cuda", dtype=torch.float16)
        out["_gpu"] = device_name("cuda")
    return out


def main() -> int:
    started = time.time()
    cuda = torch.cuda.is_available()
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="pf-gpu-check-"))
    (work / "space.yaml").write_text(space(cuda))
    exp = work / "runs" / "check"
    gpus = "0.5" if cuda else "0"

    cli("search", "--storage", work / "runs", "--name", "check", "--trials", TRIALS, "--space", work / "space.yaml",
        "--early-stop", "asha", "--gpus-per-trial", gpus, "--cpus-per-trial", "1", *SUITE, *TRAIN, *MEASURE, "--no-report",
        timeout=600)
    finals = {p.parent.name.removeprefix("trial_"): json.loads(p.read_text()) for p in exp.glob("trial_*/final.json")}
    stopped = TRIALS - len(finals)
    device = "cuda" if cuda else "cpu"
    check(len(finals) >= 1, "no trial finished", failures)
    check(all(f["device"] == device for f in finals.values()), f"a trial did not run on {device}", failures)
    check(all(f["steps"] == 2 for f in finals.values()), "a trial did not run 2 pruning steps", failures)
    peaks = [f.get("cuda_peak_mb", 0.0) for f in finals.values()]
    check(all((p > 0) == cuda for p in peaks), "CUDA peak memory missing (or non-zero on the CPU)", failures)
    if cuda:
        check(all(f.get("half_precision") == "fp16" and f.get("latency_ms_half", 0) > 0 for f in finals.values()),
              "fp16 latency missing on CUDA", failures)
    at_once = most_at_once(trial_spans(exp))
    if cuda:
        check(at_once >= 2, f"trials never shared the GPU (at most {at_once} at once)", failures)
    dense = json.loads((exp / "dense.json").read_text())
    check(dense["device"] == device, f"the dense base was timed on {dense['device']}, trials on {device}", failures)

    # The most pruned finished trial, exported and applied on the device its trial ran on.
    pruned_id = min(finals, key=lambda t: finals[t]["params"])
    cli("export", exp, "--trial", pruned_id, "-o", work / "policy.yaml")
    cli("apply", work / "policy.yaml", "-o", work / "model", "--device", device, "--cache", work / "runs" / "_artifacts")
    applied = json.loads((work / "model" / "metrics.json").read_text())
    check(applied["device"] == device, f"apply ran on {applied['device']}", failures)
    check(applied["params"] == finals[pruned_id]["params"], "apply rebuilt another architecture", failures)

    from mtl_models.models import checkpoint
    from mtl_models.measuring import measure
    from mtl_models.apply import rebuild

    pruned, policy = checkpoint.load(work / "model")
    suite, art = rebuild(policy, cache=str(work / "runs" / "_artifacts"), log=lambda *a: None)
    base = suite.build_model(**policy.model)
    base.load_state_dict(art.base)
    x = suite.example_inputs(256)
    times = latencies({"dense": (base.eval(), x), f"pruned ({pruned_id})": (pruned, x)}, cuda)

    print(f"search: {TRIALS} trials, steps 2, --early-stop asha, {gpus} GPU a trial: {len(finals)} finished, {stopped} stopped "
          f"early; at most {at_once} trials at once; trials and the dense base ran on {device}")
    print(f"apply --device {device}: {applied['params']:,} params as in trial {pruned_id}; score "
          f"{applied.get('score', float('nan')):.4f} (search {finals[pruned_id].get('score', float('nan')):.4f})")
    gpu = times.pop("_gpu", None)
    print()
    print("| model | params | MACs | CPU ms @256 (1 thread) | CUDA ms @256 | CUDA fp16 ms | CUDA / CPU | "
          "peak CUDA MiB (trial) |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, t), model in zip(times.items(), (base, pruned)):
        params, macs = measure.stored_params(model), measure.count_macs(model, x[:1])
        peak = finals[pruned_id].get("cuda_peak_mb", 0.0) if name.startswith("pruned") else dense.get("cuda_peak_mb")
        cells = [name, f"{params:,}", f"{macs / 1e6:.2f} M", f"{t['cpu']:.3f}"]
        if cuda:
            cells += [f"{t['cuda']:.3f}", f"{t['cuda_fp16']:.3f}", f"{t['cuda'] / t['cpu']:.2f}×",
                      f"{peak:,.0f}" if peak else "-"]
        else:
            cells += ["skipped", "skipped", "-", "-"]
        print("| " + " | ".join(cells) + " |")
    print()
    if cuda:
        print(f"GPU: {gpu}; torch {torch.__version__}; {time.time() - started:.0f} s")
    else:
        print(f"CUDA parts skipped: torch {torch.__version__} sees no CUDA GPU here (the search, apply and CPU "
              f"latency ran on the CPU); {time.time() - started:.0f} s")
    if failures:
        print("gpu_check FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
