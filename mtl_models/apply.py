"""`prunefuse apply`: rebuild the compressed model a policy describes, verify, save."""
from __future__ import annotations

import torch

from spaces import Policy
from spaces.errors import PrunefuseError
from spaces.scores import task_score
from spaces.vocabulary import MEAN_SCORE, TASK_METRIC, TASK_TEST_METRIC, task_metric, test_metric


def rebuild(policy: Policy, *, cache: str, log=print, device: str = "cpu"):
    """(suite, artifacts) a policy starts from: its suite, and the base (trained, reused from
    `cache`, or the user's checkpoint) with experts when it fuses. Checks fit before training."""
    from mtl_models import artifacts, suites
    from mtl_models.pipeline import check_fits

    suite = suites.from_spec(policy.suite)
    model = suite.build_model(**policy.model)  # checks the model spec against the suite
    check_fits(suite, policy, model=model)  # another suite, tasks, layers or method: fail before training
    base = policy.base.model_dump()
    checkpoint_path, experts = base.pop("checkpoint"), base.pop("experts") or {}
    recorded = {checkpoint_path: base.pop("checkpoint_sha256"), **{e["path"]: e["sha256"] for e in experts.values()}}
    from mtl_models.models.pretrained import load_user_weights

    # Every recorded file is hashed first: a changed one is refused before anything loads or trains.
    user = load_user_weights(model, base=checkpoint_path, experts={t: e["path"] for t, e in experts.items()} or None,
                             recorded={p: h for p, h in recorded.items() if p and h}, log=log)
    art = artifacts.prepare(suite, policy.model, artifacts.TrainSpec(**base), cache_dir=cache,
                            experts=policy.fusion is not None, base_state=user.base if user else None,
                            user_experts=user.experts if user else None, log=log, device=device)
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
    problem = mismatch(metrics, measured, scales=metric_scales(suite, art))
    if measured:
        metrics = {**metrics, "matches_trial": problem is None, "mismatch": problem}
    folder = checkpoint.save(model, policy, metrics, output, files={"model.onnx": graph})
    log(f"saved {folder}/model.pt (weights only), model.onnx and policy.yaml")
    _print_comparison(metrics, measured, log)
    if problem:
        raise PrunefuseError(f"the rebuilt model is not the one its trial measured: {problem}; it is saved in "
                             f"{folder}, marked matches_trial: false in metrics.json")
    return model, metrics


# How far a rebuilt model's per-task metric may be from its trial's: in points of the score
# the search optimises (spaces.scores: percent of the dense base's value, oriented), so 0.5 is
# 0.5 % of that task's dense metric whatever its unit (a fraction, degrees, a regression's units).
METRIC_TOLERANCE = 0.5


def metric_scales(suite, art) -> dict[str, tuple[float, str]]:
    """Each task's validation and test metric key -> (the dense base's value on that split, the
    metric's sense): what a difference in that metric is measured against."""
    scales = {}
    for key_of, split in ((task_metric, "val"), (test_metric, "test")):
        for task, value in (art.dense_metrics or {}).get(split, {}).items():
            scales[key_of(task)] = (float(value), suite.senses.get(task, "max"))
    return scales


def points_apart(now: float, then: float, scale: tuple[float, str] | None) -> float:
    """|now − then| in points of the oriented task score against `scale`'s reference (the trial's
    own value where there is no reference): the same for a higher- or a lower-is-better metric."""
    reference, sense = scale if scale is not None else (then, "max")
    return abs(task_score(now, reference, sense) - task_score(then, reference, sense))


def mismatch(metrics: dict, measured: dict, *, scales: dict | None = None) -> str | None:
    """Why a rebuilt model is not the one its trial measured (`measured`: the trial's
    metrics), or None: the stored and the nonzero parameter counts must be equal (the second
    is what unstructured masks change), every per-task metric (val and test) within
    METRIC_TOLERANCE points of its oriented score (`scales`: `metric_scales`). Nothing measured
    (None, NaN: a column older trials lack): nothing to compare. Any other key of `measured`
    is ignored, so a trial's whole record can be given."""
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
        apart = points_apart(now, then, (scales or {}).get(key))
        if apart > METRIC_TOLERANCE:
            return (f"{key} {now:.4f} rebuilt, {then:.4f} in the trial: {apart:.2f} points of its score apart "
                    f"(more than {METRIC_TOLERANCE} points)")
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
        log(f"matches its trial: parameters equal, every task metric within {METRIC_TOLERANCE} points of its "
            f"score (percent of the dense base's value)")
