"""Re-time the front in one process: at the end of every search, and `report --remeasure`.

Trials running side by side disturb each other's latency, and a trial timed early in a
search saw another machine load than one timed late. This rebuilds each front policy (the
same `apply_policy` a trial ran, reusing the cached base) and times the front and the dense
base in turns, round after round, under the machine-wide timing lock, with the search's
measurement settings (int8 or ONNX Runtime models one at a time). Results go to
EXPERIMENT/remeasured.json, which the report loader overlays on `latency_ms` (keeping the
search's value as `latency_ms_search`, which the report shows beside it).
"""
from __future__ import annotations

import json

from spaces import Policy

from spaces.vocabulary import REMEASURED_FILE


# remeasured.json's key for the dense base, re-timed when `backend` is not the search's.
DENSE_KEY = "dense"


def remeasure_front(experiment, *, backend: str | None = None, log=print) -> tuple[str, list[str]]:
    """Re-time the front (in `backend`, default the search's); returns (how latency was measured,
    for the report; one line per front model whose rebuild does not match its trial's params /
    per-task metrics). In another backend than the search's, the dense base is re-timed too."""
    import torch

    from mtl_models.pipeline import MeasureSpec, apply_policy, measure_model, measure_quantized
    from reports import experiment as exp_io
    from reports import select

    from mtl_models.apply import metric_scales, mismatch, rebuild
    from .config import SearchConfig
    from spaces.files import join, write_text
    from .shared_artifacts import artifact_cache

    cfg = SearchConfig.load(str(experiment))
    df = exp_io.load_experiment(experiment)
    front = select.front(df, exp_io.objectives(experiment), experiment)
    searched = cfg.measure.get("latency_backend", "torch")
    measure = {**cfg.measure, "latency_backend": backend or searched}
    spec = MeasureSpec(**measure)
    torch.set_num_threads(spec.threads)
    timings, mismatched, models, suite, art = {}, [], {}, None, None
    for _, row in front.iterrows():
        policy = Policy.from_dict(row["policy"], source=f"trial {row['trial_id']}")
        suite, art = rebuild(policy, cache=artifact_cache(cfg), log=lambda *a: None)
        model, metrics = apply_policy(suite, policy, art, measure_spec=MeasureSpec(**{**measure, "runs": 1}))
        problem = mismatch(metrics, row.to_dict(), scales=metric_scales(suite, art))
        if problem:
            mismatched.append(f"trial {row['trial_id']}: {problem}")
        if policy.quantization.method != "none" or spec.latency_backend != "torch":
            # an int8 graph or an ONNX Runtime session: timed on its own, as its trial was
            timings[row["trial_id"]] = (measure_quantized(model, suite, policy, art, spec, metrics) if
                                        policy.quantization.method != "none" else
                                        measure_model(model, suite, art, spec))["latency_ms"]
        else:
            models[row["trial_id"]] = model
    if suite is not None:
        dense = suite.build_model(**cfg.model)
        dense.load_state_dict(art.base)
        if models:
            # The front and the dense base timed in turns, round after round, in this one process: a
            # slow phase of a shared machine hits them all alike, so their ratios hold.
            models[DENSE_KEY] = dense
            timings.update(_interleaved(models, suite, spec))
        else:
            from .shared_artifacts import measure_dense

            timings[DENSE_KEY] = measure_dense(cfg.replace(measure=measure), suite, art)["latency_ms"]
    for _, row in front.iterrows():
        searched_ms = row.get("latency_ms_search", row["latency_ms"])  # the loader overlays earlier re-timings
        log(f"  {row['trial_id']}: {searched_ms:.3f} ms in the search, {timings[row['trial_id']]:.3f} ms alone")
    if DENSE_KEY in timings:
        log(f"  dense base: {timings[DENSE_KEY]:.3f} ms")
    if spec.latency_backend == searched:
        # Trials an earlier re-timing moved off the front keep that figure: dropped, they would
        # fall back to their search-time latency and could climb back onto the front on it.
        timings = {**exp_io.remeasured(experiment), **timings}
    write_text(join(str(experiment), REMEASURED_FILE), json.dumps(timings, indent=1))
    other = ("measured during the search" if spec.latency_backend == searched else
             f"measured during the search in {searched}")
    how = "interleaved with the dense base" if models else "one model at a time"
    return (f"front and dense base re-measured in one process, {how}, in {spec.latency_backend} ({spec.threads} "
            f"thread(s), batch {spec.latency_batch}); other trials: {other}"), mismatched


def _interleaved(models: dict, suite, spec) -> dict[str, float]:
    """name -> median latency (ms) of each model's inference form, timed in turns under the
    machine-wide timing lock (no trial times or trains beside it on this machine)."""
    from mtl_models.measuring import measure
    from mtl_models.measuring.timing_lock import timed_alone

    rounds = 5
    with timed_alone():
        return measure.interleaved_latency_ms(models, suite.example_inputs(spec.latency_batch), rounds=rounds,
                                              threads=spec.threads, warmup=spec.warmup,
                                              runs=max(3, spec.runs // rounds))
