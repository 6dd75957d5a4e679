"""`prunefuse report --remeasure`: re-time the front's models one at a time.

Trials running side by side disturb each other's latency; this rebuilds each front policy
(the same `apply_policy` a trial ran, reusing the cached base) and times it alone, with the
search's measurement settings. Results go to EXPERIMENT/remeasured.json, which the report
loader overlays on `latency_ms` (keeping the search's value as `latency_ms_search`).
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

    from .apply import mismatch, rebuild
    from .config import SearchConfig, join, write_text
    from .shared_artifacts import artifact_cache

    cfg = SearchConfig.load(str(experiment))
    df = exp_io.load_experiment(experiment)
    front = select.front(df, exp_io.objectives(experiment), experiment)
    searched = cfg.measure.get("latency_backend", "torch")
    measure = {**cfg.measure, "latency_backend": backend or searched}
    spec = MeasureSpec(**measure)
    torch.set_num_threads(spec.threads)
    timings, mismatched = {}, []
    for _, row in front.iterrows():
        policy = Policy.from_dict(row["policy"], source=f"trial {row['trial_id']}")
        suite, art = rebuild(policy, cache=artifact_cache(cfg), log=lambda *a: None)
        model, metrics = apply_policy(suite, policy, art, measure_spec=MeasureSpec(**{**measure, "runs": 1}))
        problem = mismatch(metrics, {k: row[k] for k in row.index if k == "params" or k.startswith(("metric/", "test/"))})
        if problem:
            mismatched.append(f"trial {row['trial_id']}: {problem}")
        timings[row["trial_id"]] = (measure_quantized(model, suite, policy, art, spec, metrics) if
                                    policy.quantization.method != "none" else
                                    measure_model(model, suite, art, spec))["latency_ms"]
        log(f"  {row['trial_id']}: {row['latency_ms']:.3f} ms in the search, {timings[row['trial_id']]:.3f} ms alone"
            + (f"; rebuilt model does not match: {problem}" if problem else ""))
    if spec.latency_backend != searched and len(front):
        from .shared_artifacts import measure_dense

        timings[DENSE_KEY] = measure_dense(cfg.replace(measure=measure), suite, art)["latency_ms"]
        log(f"  dense base: {timings[DENSE_KEY]:.3f} ms in {spec.latency_backend}")
    write_text(join(str(experiment), REMEASURED_FILE), json.dumps(timings, indent=1))
    other = ("measured during the search" if spec.latency_backend == searched else
             f"measured during the search in {searched}")
    return (f"front re-measured one model at a time in {spec.latency_backend} ({spec.threads} thread(s), batch "
            f"{spec.latency_batch}, median of {spec.runs}); other trials: {other}"), mismatched
