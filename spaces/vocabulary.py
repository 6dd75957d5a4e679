"""The words every package shares: metric names, experiment file names, the suite spec.

One home for each name, so a producer and its readers cannot drift apart. Imports nothing
(no torch, no ray, no pandas): a trial, the CLI and the report all read it for free.
"""
from __future__ import annotations

# --- metrics a measured model reports (mtl_models.pipeline.measure_model produces them) ---

# Scalar metrics and which way is better ("max" / "min"); objectives, constraints, export
# selectors and the report take their names from here.
SCALAR_METRICS = {
    "score": "max",             # mean oriented task score (spaces.scores): 0 = the dense base, higher is better
    "test_score": "max",        # the same on the test split, against the dense base's test metrics
    "delta_m": "max",           # Δm% against the reference (higher: better than it): the single-task
                                # references (--references), a user's experts (--experts), else the dense base
    "params": "min",            # parameters as stored
    "nonzero_params": "min",
    "bytes": "min",             # storage, dense or sparse, whichever is smaller
    "macs": "min",
    "latency_ms": "min",        # the inference form's median latency
}
MEAN_SCORE = "score"            # the default objective, the ASHA metric, export's sort key
# Facts recorded beside the metrics: how they were measured.
# On CUDA also: the GPU's name, the trial's peak CUDA memory (MiB; 0 on the CPU) and, where the
# policy fine-tunes in bf16 / fp16, the latency in that precision (mtl_models.training.device).
# Latency is timed alone on its machine (mtl_models.measuring.timing_lock): the wait for that, and the
# timed section's wall-clock bounds.
MEASUREMENT_FACTS = ("latency_batch", "threads", "device", "device_name", "cuda_peak_mb", "latency_ms_half",
                     "half_precision", "lock_wait_s", "timed_from", "timed_to")
# Which runtime timed latency_ms (mtl_models.deployment.deploy); an int8 policy's method and its fp32 model's figures.
MEASUREMENT_FACTS += ("latency_backend", "quantization", "fp32_score", "fp32_bytes", "fp32_latency_ms")
# A trial that learned its merge coefficients (fusion method `adamerging`) reports the fusion
# section it learned under this key (JSON text); the report puts it in the trial's policy.
LEARNED_FUSION = "fusion_learned"
TASK_METRIC = "metric/"         # metric/<task>: the task's validation metric
TASK_TEST_METRIC = "test/"      # test/<task>: the same on the test split


def task_metric(task: str) -> str:
    """`metric/<task>`: the key of a task's validation metric in a trial's results."""
    return f"{TASK_METRIC}{task}"


def test_metric(task: str) -> str:
    """`test/<task>`: the key of the same metric on the test split."""
    return f"{TASK_TEST_METRIC}{task}"


def is_recorded_metric(key: str) -> bool:
    """True for every key of a trial's results that the report and export keep."""
    return (key in SCALAR_METRICS or key in MEASUREMENT_FACTS
            or str(key).startswith((TASK_METRIC, TASK_TEST_METRIC)))


# --- task metrics and the task kinds that use them ---

# A task's metric name -> which way is better. `mtl_models.training.tasks` implements each (same
# names); a `Task` takes its sense from here, so a suite cannot state it wrongly.
TASK_METRICS = {
    "accuracy": "max",           # classification: fraction of rows whose argmax is right
    "rounded_accuracy": "max",   # regression on integer targets: the rounded prediction is right
    "r2": "max",
    "mae": "min",
    "label_accuracy": "max",     # multilabel: mean over labels of the per-label accuracy
    "macro_f1": "max",           # multilabel: mean over labels of F1
    "miou": "max",               # segmentation: mean over classes of intersection / union
    "pixel_accuracy": "max",     # segmentation: fraction of labelled pixels right
    "abs_err": "min",            # depth: mean |pred − true| over valid pixels (LibMTL's NYUv2)
    "rel_err": "min",            # depth: mean |pred − true| / true over valid pixels
    "mean_angle_err": "min",     # normals: mean angle (degrees) between predicted and true normals
}

# kind -> the metrics a task of that kind may be scored by (the first is its default).
TASK_KINDS = {
    "classification": ("accuracy",),
    "regression": ("r2", "mae", "rounded_accuracy"),
    "multilabel": ("label_accuracy", "macro_f1"),
    "segmentation": ("miou", "pixel_accuracy"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("mean_angle_err",),
}
DENSE_KINDS = ("segmentation", "depth", "normals")   # heads that emit a map per input


# --- what a policy file says it is ---

POLICY_SCHEMA = "prunefuse.policy/1"   # a policy's `schema:` (spaces.policy.Policy)


# --- the files of an experiment folder ---

CONFIG_FILE = "prunefuse.json"        # the SearchConfig: what the search was asked to do
DENSE_FILE = "dense.json"             # the dense base measured like a trial
CONTROL_FILE = "control.json"         # the equal-budget dense control: the base fine-tuned as trials are
RECIPES_FILE = "recipes.json"         # with --experts: task arithmetic (λ 0.3) and TIES (defaults) on them, measured once
FINISHED_FILE = "finished.json"       # written when fit() returns; absent while running or after a crash
REMEASURED_FILE = "remeasured.json"   # `report --remeasure`'s latencies of the front
STUDY_DB = "optuna.db"                # the Optuna study (SQLite)
FINAL_FILE = "final.json"             # inside trial_<id>/: the trial's final result, written before Tune sees it
SUGGESTED_FILE = "suggested.json"     # inside trial_<id>/: the Optuna parameters proposed (a lost study is rebuilt)
CARRIED_FILE = "carried.json"         # inside trial_<id>/: a trial carried over by --warm-start (from where)
POLICY_FILE = "policy.yaml"           # inside trial_<id>/ (the trial's policy) and the experiment (the knee's)
REPORT_FILE = "report.html"           # the Pareto report


# --- where Ray workers import plugin suites from ---

# The driver's working folder, handed to every trial's process: a plugin suite
# (`package.module:function`) is imported from the folder the search was started in.
PLUGIN_PATH_ENV = "PRUNEFUSE_PLUGIN_PATH"


# --- the suite spec: {"name": ..., **options}, which rebuilds a suite ---

def suite_spec(name: str, options: dict) -> dict:
    """The plain data that rebuilds a suite: `mtl_models.suites.from_spec(spec)`."""
    return {"name": name, **options}


def split_suite_spec(spec: dict) -> tuple[str, dict]:
    """(name, options) of a suite spec."""
    return spec["name"], {k: v for k, v in spec.items() if k != "name"}
