"""The cycle: fuse → prune → fine-tune → measure, as one policy says.

`apply_policy` is the one function both a search trial and `prunefuse apply` call, so an
exported policy reproduces the model its trial measured (same machine, same seed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from spaces.errors import PrunefuseError, unknown_name
from spaces.knobs import coerce_number
from spaces.policy import Policy, learned_fusion_record
from spaces.scores import mean_score
from spaces.vocabulary import LEARNED_FUSION, task_metric, test_metric

from mtl_models.deployment import deploy, quantize
from mtl_models import fusion
from mtl_models.measuring import measure
from mtl_models.artifacts import Artifacts
from mtl_models.training.finite import check_finite
from mtl_models.training.device import check_precision, device_name, half_dtype
from mtl_models.fusion import merge
from mtl_models.pruning import left_unpruned, prune, recalibrate_batchnorm, without_masks
from mtl_models.training.tasks import task_loss
from mtl_models.training.train import Guidance, TrainOptions, evaluate, train


@dataclass(frozen=True)
class MeasureSpec:
    """How cost is measured; recorded with the results so numbers say how they were taken."""
    latency_batch: int = 256
    threads: int = 1
    runs: int = 30
    warmup: int = 5
    device: str = "cpu"        # set per job by mtl_models.training.device.job_device, not by the user
    precision: str = "fp32"    # the policy's fine-tune precision: bf16 / fp16 also time latency in it on CUDA
    latency_backend: str = "torch"  # torch (eager) | onnxruntime (the exported graph): mtl_models.deployment.deploy

    def __post_init__(self):
        for name, low in (("latency_batch", 1), ("threads", 1), ("runs", 1), ("warmup", 0)):
            object.__setattr__(self, name, coerce_number("measure", name, getattr(self, name), int, low=low))
        deploy.check_backend(self.latency_backend)


def _first_difference(policy_spec: dict, here: dict) -> tuple[str, str]:
    """`key=value` of the first key where the policy's spec and the one here differ."""
    for key in sorted(set(policy_spec) | set(here), key=lambda k: (k != "name", str(k))):
        if policy_spec.get(key, _UNSET) != here.get(key, _UNSET):
            show = lambda spec: f"{key}={spec[key]!r}" if key in spec else f"no {key}"  # noqa: E731
            return show(policy_spec), show(here)
    return str(policy_spec), str(here)


_UNSET = object()


def check_fits(suite, policy: Policy, artifacts: Artifacts | None = None, *, model=None) -> None:
    """A policy for another suite or model fails here, naming the mismatch.

    Without `artifacts` (before any training) the model spec is not compared; with `model`
    the policy's pruned layer names are checked against it too.
    """
    suite_spec = suite.spec
    if policy.suite != suite_spec:
        mine, here = _first_difference(policy.suite, suite_spec)
        raise PrunefuseError(f"the policy is for suite {policy.suite['name']!r} with {mine}, "
                             f"but the suite here has {here}")
    if artifacts is not None and policy.model != artifacts.model:
        mine, here = _first_difference(policy.model, artifacts.model)
        raise PrunefuseError(f"the policy is for model {mine}, but the trained base is {here}")
    tasks = set(suite.task_names)
    for what, names in (("weighting.weights", policy.weighting.weights or {}),
                        ("fusion.coefficients", policy.fusion.coefficients if policy.fusion else {})):
        if names and set(names) != tasks:
            raise PrunefuseError(f"policy {what} names tasks {sorted(names)}; suite {suite.name!r} has {sorted(tasks)}")
    check_method_names(policy, suite.task_names)
    if model is not None:
        from mtl_models.pruning import check_sparsity

        check_sparsity(model, dict(policy.pruning.sparsity), suite.example_inputs(2))


def check_method_names(policy: Policy, tasks: list[str]) -> None:
    """Every method a policy names, and its knobs, exist: a typo fails before any training."""
    from mtl_models import pruning
    from mtl_models.training.weighting import make_weighter

    make_weighter(weighting_spec(policy), tasks)
    pruning.IMPORTANCES.method(policy.pruning.importance)
    if policy.fusion is not None:
        method = policy.fusion.method
        fusion.METHODS.check_params(method, policy.fusion.params)


def weighting_spec(policy: Policy) -> dict:
    from mtl_models.training.weighting import METHODS as WEIGHTING_METHODS

    spec = {"method": policy.weighting.method, **policy.weighting.params}
    if policy.weighting.weights is not None:
        spec["weights"] = dict(policy.weighting.weights)
    if policy.weighting.method in WEIGHTING_METHODS.needing("seed"):
        spec.setdefault("seed", policy.seed)  # a seeded method (RLW) follows the policy's seed
    return spec


def fusion_params(policy: Policy) -> dict:
    """The merge method's knobs; a seeded method (DARE's drop masks) follows the policy's seed."""
    params = dict(policy.fusion.params)
    if policy.fusion.method in fusion.METHODS.needing("seed"):
        params.setdefault("seed", policy.seed)
    return params


# Training samples the BatchNorm statistics of a merged (or pruned) model are estimated on.
CALIBRATION_SAMPLES = 512
# How a merged trunk's BatchNorm statistics are set (never merged as task vectors; see
# `fusion.merge`): "base" keeps the base's, "recalibrate" re-estimates them on
# CALIBRATION_SAMPLES training samples, for the merged weights. benchmarks/fusion.py measures both.
STATISTICS = ("base", "recalibrate")


def calibration_batch(suite) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x, y) of the first CALIBRATION_SAMPLES training rows, deterministic view (no augmentation):
    what BatchNorm statistics, Taylor scores and the finiteness check are computed on."""
    from mtl_models.suites.reading import first_rows

    return first_rows(suite.train, CALIBRATION_SAMPLES)


def _trunk_and_experts(suite, artifacts: Artifacts) -> tuple[dict, dict]:
    """The trunk the experts were fine-tuned from and each task expert's: what a merge combines
    (heads are never merged). Task vectors are taken against the base's trunk, or against the
    backbone a user's own experts (--experts) started from."""
    trunk = artifacts.backbone or {k: v for k, v in artifacts.base.items() if k.startswith("trunk.")}
    return trunk, {t: {k: artifacts.experts[t][k] for k in trunk} for t in suite.task_names}


def _expert_heads(suite, artifacts: Artifacts) -> dict:
    """Each head from its own expert."""
    return {k: v for t in suite.task_names for k, v in artifacts.experts[t].items() if k.startswith(f"heads.{t}.")}


def _check_experts(artifacts: Artifacts) -> None:
    if not artifacts.experts:
        raise PrunefuseError("the policy fuses task experts, but none were trained for this search")


# AdaMerging's unlabeled inputs: the first training rows, deterministic view (labels never read).
ADAMERGING_ROWS = 4096


def unlabeled_inputs(suite) -> torch.Tensor:
    from mtl_models.suites.reading import first_rows

    return first_rows(suite.train, ADAMERGING_ROWS)[0]


def learn_fusion(suite, policy: Policy, artifacts: Artifacts, *, device: str) -> Policy:
    """`policy` itself, or, where its fusion method learns its coefficients from unlabeled
    training inputs (`adamerging`) and has steps to take, a copy holding the learned
    coefficients and `steps: 0`: the policy a trial records (`LEARNED_FUSION`), which merges
    the same trunk again without learning."""
    f = policy.fusion
    if f is None or f.method not in fusion.METHODS.needing("data"):
        return policy
    params = {**{k: knob.default for k, knob in fusion.KNOBS[f.method].items()}, **f.params}
    if int(params["steps"]) <= 0:
        return policy
    _check_experts(artifacts)
    model = suite.build_model(**policy.model)
    model.load_state_dict({**artifacts.base, **_expert_heads(suite, artifacts)})
    trunk, experts = _trunk_and_experts(suite, artifacts)
    coefficients = fusion.learn_coefficients(
        model, trunk, experts, inputs=unlabeled_inputs(suite), kinds={t.name: t.kind for t in suite.tasks},
        layerwise=any(isinstance(c, dict) for c in f.coefficients.values()), steps=int(params["steps"]),
        lr=float(params["lr"]), init=float(params["init"]), seed=policy.seed,
        buffers=fusion.buffer_keys(model, "trunk."), device=device)
    data = policy.to_dict()
    data["fusion"] = {**data["fusion"], "coefficients": coefficients, "params": {**f.params, "steps": 0}}
    return Policy.from_dict(data, source="the learned fusion coefficients")


def start_model(suite, policy: Policy, artifacts: Artifacts, *, device: str, statistics: str = "recalibrate"):
    """The dense base, or the base with its trunk merged from the task experts (BatchNorm
    statistics set as `statistics` says)."""
    torch.manual_seed(policy.seed)
    model = suite.build_model(**policy.model)
    # What torch-pruning cannot prune is a property of the layout, judged on the model as built
    # (the driver's check does the same) and kept per layout: on trained weights a forward may
    # fail for other reasons, and a group refused in one trial but not another would split a search.
    left_unpruned(model, suite.example_inputs(2))
    model.load_state_dict(artifacts.base)
    if policy.fusion is None:
        return model
    _check_experts(artifacts)
    trunk, experts = _trunk_and_experts(suite, artifacts)
    # Merging happens here: only the shared trunk is merged; each head comes from its own expert.
    if statistics not in STATISTICS:
        raise unknown_name("merged statistics", statistics, STATISTICS)
    merged = merge(trunk, experts, policy.fusion.method, dict(policy.fusion.coefficients),
                   buffers=fusion.buffer_keys(model, "trunk."), **fusion_params(policy))
    state = dict(artifacts.base)
    state.update(merged)
    state.update(_expert_heads(suite, artifacts))
    model.load_state_dict(state)
    calib, _ = calibration_batch(suite)
    if statistics == "recalibrate":
        recalibrate_batchnorm(model, lambda m: m(calib))
    check_finite(model, f"the model merged by {policy.fusion.method}", calib)
    if policy.fusion.finetune_epochs > 0:
        train(model, suite, TrainOptions(epochs=policy.fusion.finetune_epochs, lr=policy.finetune.lr,
                                         batch_size=policy.finetune.batch_size, weighting=weighting_spec(policy),
                                         seed=policy.seed, device=device, precision=policy.finetune.precision))
    return model


def measure_model(model, suite, artifacts: Artifacts, spec: MeasureSpec) -> dict:
    """Every metric a trial reports: per-task quality, mean, Δm, size, MACs, latency.

    The model is neither moved nor changed: it is evaluated where it is (a copy goes to
    `spec.device` when it lives elsewhere), MACs and latency are taken on copies, and its
    training mode is given back."""
    from mtl_models.training.modes import kept_modes

    with kept_modes(model):  # evaluation switches to eval mode
        return _measure(model, suite, artifacts, spec)


def _measure(model, suite, artifacts: Artifacts, spec: MeasureSpec) -> dict:
    placed = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if placed and placed != {torch.device(spec.device).type}:
        import copy

        stored = without_masks(model)
        model = (stored if stored is not model else copy.deepcopy(model)).to(spec.device)
    val, test = evaluate(model, suite, "val", device=spec.device), evaluate(model, suite, "test", device=spec.device)
    reference = artifacts.references.get("val") or artifacts.dense_metrics["val"]
    higher = {t.name: t.higher_is_better for t in suite.tasks}
    example = suite.example_inputs(spec.latency_batch)
    out = {
        # The oriented score against the dense base (spaces.scores): every task counts the
        # right way round, whatever its metric's sense and scale.
        "score": mean_score(val, artifacts.dense_metrics["val"], suite.senses),
        "test_score": mean_score(test, artifacts.dense_metrics["test"], suite.senses),
        "delta_m": measure.delta_m(val, reference, higher),
        "params": measure.stored_params(model),
        "nonzero_params": measure.nonzero_params(model),
        "bytes": measure.storage_bytes(model),
        "macs": measure.count_macs(model, example[:1]),
        **_latencies(model, example, spec),
        "latency_batch": spec.latency_batch,
        "threads": spec.threads,
        "device": spec.device,
        "device_name": device_name(spec.device),  # the GPU model a CUDA figure was taken on
    }
    out.update({task_metric(t): v for t, v in val.items()})
    out.update({test_metric(t): v for t, v in test.items()})
    return out


def _latencies(model, example, spec: MeasureSpec) -> dict:
    """latency_ms (and, on CUDA with a bf16 / fp16 policy, latency_ms_half), timed while no other
    timing section on this machine runs (mtl_models.measuring.timing_lock); how long that took to get."""
    from mtl_models.measuring.timing_lock import timed_alone

    timing = dict(threads=spec.threads, runs=spec.runs, warmup=spec.warmup, device=spec.device)
    half = half_dtype(spec.precision, spec.device)
    timed = deploy.for_backend(model, example, spec.latency_backend)  # an ONNX export happens before the lock
    with timed_alone() as slot:
        out = {"latency_ms": deploy.latency_ms(timed, example, backend=spec.latency_backend, **timing),
               "latency_backend": spec.latency_backend}
        if half is not None:
            out.update(latency_ms_half=measure.latency_ms(model, example, **timing, dtype=half),
                       half_precision=spec.precision)
    return {**out, **slot.facts()}


def check_quantized_backend(method: str, backend: str) -> None:
    """An int8 graph runs in ONNX Runtime only; timing it beside torch-eager trials would mix runtimes."""
    if method != "none" and backend != "onnxruntime":
        raise PrunefuseError(f"quantization {method!r} makes an ONNX Runtime int8 graph; time it (and the dense "
                             f"base) with --latency-backend onnxruntime, not {backend!r}")


def measure_quantized(model, suite, policy: Policy, artifacts: Artifacts, spec: MeasureSpec, fp32: dict) -> dict:
    """The metrics that quantization changes, taken on the int8 graph in ONNX Runtime (on the
    CPU): task quality, `bytes` (int8 weights at one byte), latency; the fp32 model's score,
    bytes and latency stay beside them as fp32_*. Parameters and MACs are the fp32 model's."""
    from mtl_models.measuring.timing_lock import timed_alone

    q = quantize.quantize(model, suite, policy.quantization, threads=spec.threads)
    val, test = evaluate(q, suite, "val"), evaluate(q, suite, "test")
    reference = artifacts.references.get("val") or artifacts.dense_metrics["val"]
    higher = {t.name: t.higher_is_better for t in suite.tasks}
    out = {f"fp32_{k}": fp32[k] for k in ("score", "bytes", "latency_ms")}
    with timed_alone():
        latency = deploy.latency_ms(q, suite.example_inputs(spec.latency_batch), backend="onnxruntime",
                                    threads=spec.threads, runs=spec.runs, warmup=spec.warmup)
    out.update({
        "score": mean_score(val, artifacts.dense_metrics["val"], suite.senses),
        "test_score": mean_score(test, artifacts.dense_metrics["test"], suite.senses),
        "delta_m": measure.delta_m(val, reference, higher),
        "bytes": deploy.graph_bytes(q.onnx_model), "latency_ms": latency,
        "latency_backend": "onnxruntime", "device": "cpu", "quantization": policy.quantization.method,
    })
    out.update({task_metric(t): v for t, v in val.items()})
    out.update({test_metric(t): v for t, v in test.items()})
    return out


def distill_teacher(suite, policy: Policy, artifacts: Artifacts, start):
    """The frozen teacher of the fine-tune's distillation (None without one): the dense base, or
    `start`, the model the cycle begins with (merged when the policy fuses), before pruning."""
    from mtl_models.training.distill import teacher_for

    d, ft = policy.finetune.distill, policy.finetune
    if d is None or d.weight <= 0 or ft.epochs <= 0:
        return None
    return teacher_for(d.teacher, start=start, dense_state=artifacts.base,
                       build=lambda: suite.build_model(**policy.model))


def apply_policy(suite, policy: Policy, artifacts: Artifacts, *, measure_spec: MeasureSpec = MeasureSpec(),
                 on_step=None):
    """Run the whole cycle; returns (compressed model, final metrics).

    on_step(step, steps, metrics) is called after every pruning step's fine-tune, so a
    trial can report each step to Tune (early stopping) before the final result.
    """
    check_fits(suite, policy, artifacts)
    check_quantized_backend(policy.quantization.method, measure_spec.latency_backend)
    device = measure_spec.device
    check_precision(policy.finetune.precision, device)
    measure_spec = dataclasses.replace(measure_spec, precision=policy.finetune.precision)
    learned = learn_fusion(suite, policy, artifacts, device=device)
    # A learned merge is recorded beside the metrics: the trial's exported policy holds it.
    record = {} if learned is policy else {LEARNED_FUSION: learned_fusion_record(learned)}
    model = start_model(suite, learned, artifacts, device=device)
    calib, calib_y = calibration_batch(suite)

    def task_losses(m):
        out = m(calib.to(device))
        return {t.name: task_loss(t, out[t.name], calib_y[t.name].to(device)) for t in suite.tasks}

    p, ft = policy.pruning, policy.finetune
    metrics = {}
    teacher = distill_teacher(suite, policy, artifacts, model.to(device))

    def after_step(step, m):
        check_finite(m, f"the model pruned in step {step} of {p.steps}", calib)
        if ft.epochs > 0:
            train(m, suite, TrainOptions(epochs=ft.epochs / p.steps, lr=ft.lr, batch_size=ft.batch_size,
                                         weighting=weighting_spec(policy), seed=policy.seed + step, device=device,
                                         precision=ft.precision),
                  guide=Guidance(teacher=teacher, distill=ft.distill.model_dump() if teacher is not None else None))
            # A short fine-tune moves the weights further than BatchNorm's running averages
            # (momentum 0.1, a few batches) follow; where a channel is nearly constant (variance
            # far below eps, as in EfficientNetV2's 1×1 late stages) eval-mode BatchNorm then
            # amplifies the mismatch block after block, and float32 rounding alone changes the
            # outputs (ONNX parity off by 88). Statistics re-estimated on the calibration batch.
            recalibrate_batchnorm(m, task_losses)
        metrics.clear()
        metrics.update(measure_model(without_masks(m), suite, artifacts, measure_spec))
        metrics.update(record)
        if step == p.steps and quantize.quantizes(policy.quantization):
            metrics.update(measure_quantized(without_masks(m), suite, policy, artifacts, measure_spec, metrics))
        if on_step:
            on_step(step, p.steps, dict(metrics))

    model.to(device)
    model = prune(model, p, example_inputs=suite.example_inputs(2).to(device), task_losses=task_losses,
                  after_step=after_step)
    return model, metrics
