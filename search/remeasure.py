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


def remeasure_front(experiment, *, log=print) -> tuple[str, list[str]]:
    """Re-time the front; returns (how latency was measured, for the report; one line per
    front model whose rebuild does not match its trial's params / per-task metrics)."""
    import torch

    from mtl_models.pipeline import MeasureSpec, apply_policy, measure_model
    from reports import experiment as exp_io
    from reports import select

    from .apply import mismatch, rebuild
    from .config import SearchConfig, join, write_text
    from .shared_artifacts import artifact_cache

    cfg = SearchConfig.load(str(experiment))
    df = exp_io.load_experiment(experiment)
    front = select.front(df, exp_io.objectives(experiment), experiment)
    spec = MeasureSpec(**cfg.measure)
    torch.set_num_threads(spec.threads)
    timings, mismatched = {}, []
    for _, row in front.iterrows():
        policy = Policy.from_dict(row["policy"], source=f"trial {row['trial_id']}")
        suite, art = rebuild(policy, cache=artifact_cache(cfg), log=lambda *a: None)
        model, metrics = apply_policy(suite, policy, art, measure_spec=MeasureSpec(**{**cfg.measure, "runs": 1}))
        problem = mismatch(metrics, {k: row[k] for k in row.index if k == "params" or k.startswith(("metric/", "test/"))})
        if problem:
            mismatched.append(f"trial {row['trial_id']}: {problem}")
        timings[row["trial_id"]] = measure_model(model, suite, art, spec)["latency_ms"]
        log(f"  {row['trial_id']}: {row['latency_ms']:.3f} ms in the search, {timings[row['trial_id']]:.3f} ms alone"
            + (f"; rebuilt model does not match: {problem}" if problem else ""))
    write_text(join(str(experiment), REMEASURED_FILE), json.dumps(timings, indent=1))
    return (f"front re-measured one model at a time ({spec.threads} thread(s), batch {spec.latency_batch}, "
            f"median of {spec.runs}); other trials: measured during the search"), mismatched
