"""`prunefuse apply`: rebuild the compressed model a policy describes, verify, save."""
from __future__ import annotations

import torch

from spaces import Policy
from spaces.errors import PrunefuseError
from spaces.vocabulary import MEAN_SCORE, TASK_METRIC, TASK_TEST_METRIC


def rebuild(policy: Policy, *, cache: str, log=print, device: str = "cpu"):
    """(suite, artifacts) a policy starts from: its suite, and the base (trained, reused from
    `cache`, or the user's checkpoint) with experts when it fuses. Checks fit before training."""
    from mtl_models import artifacts, suites
    from mtl_models.pipeline import check_fits

    suite = suites.from_spec(policy.suite)
    model = suite.build_model(**policy.model)  # checks the model spec against the suite
    check_fits(suite, policy, model=model)  # another suite, tasks, layers or method: fail before training
    base = policy.base.model_dump()
    checkpoint_path = base.pop("checkpoint")
    base_state = artifacts.load_base_checkpoint(checkpoint_path, model) if checkpoint_path else None
    art = artifacts.prepare(suite, policy.model, artifacts.TrainSpec(**base), cache_dir=cache,
                            experts=policy.fusion is not None, base_state=base_state, log=log, device=device)
    return suite, art


def apply_device(policy: Policy, requested: str | None = None) -> str:
    """`--device`, or else the device the policy's trial ran on where this machine has it, else the CPU."""
    from mtl_models.training.device import check_precision, job_device

    if requested is None:
        measured = (policy.provenance or {}).get("metrics", {}).get("device", "cpu")
        requested = "auto" if str(measured).startswith("cuda") else "cpu"
    device = job_device(requested)
    check_precision(policy.base.precision, device, what="policy base.precision")
    check_precision(policy.finetune.precision, device)
    return device


def apply_backend(policy: Policy, requested: str | None = None) -> str:
    """`--latency-backend`, or else the backend the policy's trial was timed with; an int8
    policy without a record runs (and is timed) in ONNX Runtime."""
    if requested:
        return requested
    measured = (policy.provenance or {}).get("metrics", {}).get("latency_backend")
    return measured or ("onnxruntime" if policy.quantization.method != "none" else "torch")


def apply_and_save(policy: Policy, output: str, *, cache: str, threads: int = 1, log=print,
                   device: str | None = None, latency_backend: str | None = None):
    from mtl_models.models import checkpoint
    from mtl_models.pipeline import MeasureSpec, apply_policy

    from spaces.files import check_writable_folder

    checkpoint.check_target(output)  # -o and --cache are checked (and a killed save tidied) before training
    check_writable_folder(cache, "--cache")
    torch.set_num_threads(threads)
    device = apply_device(policy, device)  # before any training: fp16 on a CPU fails here
    from mtl_models.deployment.deploy import check_backend

    backend = check_backend(apply_backend(policy, latency_backend))  # an unknown name fails before training too
    suite, art = rebuild(policy, cache=cache, log=log, device=device)
    measured = (policy.provenance or {}).get("metrics", {})
    spec = MeasureSpec(latency_batch=int(measured.get("latency_batch", 256)), threads=threads, device=device,
                       latency_backend=backend)
    model, metrics = apply_policy(suite, policy, art, measure_spec=spec)
    from mtl_models.deployment.ship import shipped_graph

    graph, parity = shipped_graph(model, suite, policy.quantization, threads=threads)  # parity fails in one line
    log(f"model.onnx: ONNX Runtime vs PyTorch on {parity['onnx_parity_rows']} validation inputs, "
        f"max abs diff {parity['onnx_max_abs_diff']:.3g}")
    metrics = {**metrics, **parity}
    problem = mismatch(metrics, measured)
    if measured:
        metrics = {**metrics, "matches_trial": problem is None, "mismatch": problem}
    folder = checkpoint.save(model, policy, metrics, output, files={"model.onnx": graph})
    log(f"saved {folder}/model.pt (weights only), model.onnx and policy.yaml")
    _print_comparison(metrics, measured, log)
    if problem:
        raise PrunefuseError(f"the rebuilt model is not the one its trial measured: {problem}; it is saved in "
                             f"{folder}, marked matches_trial: false in metrics.json")
    return model, metrics


# How far a rebuilt model's per-task metric may be from its trial's, in points (×100).
METRIC_TOLERANCE = 0.5


def mismatch(metrics: dict, measured: dict) -> str | None:
    """Why a rebuilt model is not the one its trial measured (`measured`: the trial's
    metrics), or None: the stored and the nonzero parameter counts must be equal (the second
    is what unstructured masks change), every per-task metric (val and test) within
    METRIC_TOLERANCE points. Nothing measured (None, NaN: a column older trials lack): nothing
    to compare. Any other key of `measured` is ignored, so a trial's whole record can be given."""
    for count in ("params", "nonzero_params"):
        then, now = measured.get(count), metrics.get(count)
        if then is None or now is None or then != then:
            continue
        if int(now) != int(then):
            return f"{int(now):,} {count} rebuilt, {int(then):,} in the trial"
    for key in sorted(k for k in measured if k.startswith((TASK_METRIC, TASK_TEST_METRIC))):
        then, now = measured[key], metrics.get(key)
        if now is None or then is None or then != then:
            continue
        if abs(now - then) * 100 > METRIC_TOLERANCE:
            return f"{key} {now:.4f} rebuilt, {then:.4f} in the trial (more than {METRIC_TOLERANCE} points)"
    return None


def _print_comparison(metrics: dict, measured: dict, log) -> None:
    counts = ["params", "nonzero_params", "macs"] if metrics.get("nonzero_params") != metrics["params"] \
        else ["params", "macs"]
    quality = [k for k in metrics if k == MEAN_SCORE or k.startswith((TASK_METRIC, TASK_TEST_METRIC))]
    keys = quality + counts + ["latency_ms"]
    log(f"{'metric':<16}{'applied':>14}{'in search':>14}")
    for k in keys:
        then = measured.get(k)
        fmt = (lambda v: f"{v:,.0f}") if k in counts else (lambda v: f"{v:.4f}")
        log(f"{k:<16}{fmt(metrics[k]):>14}{(fmt(then) if then is not None else '-'):>14}")
    if measured and metrics.get("matches_trial"):
        log(f"matches its trial: parameters equal, every task metric within {METRIC_TOLERANCE} points")
