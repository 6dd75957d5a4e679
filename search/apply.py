"""`prunefuse apply`: rebuild the compressed model a policy describes, verify, save."""
from __future__ import annotations

import torch

from spaces import Policy


def rebuild(policy: Policy, *, cache: str, log=print):
    """(suite, artifacts) a policy starts from: its suite, and the base (trained, reused from
    `cache`, or the user's checkpoint) with experts when it fuses. Checks fit before training."""
    from mtl_models import artifacts, suites
    from mtl_models.pipeline import check_fits

    from .shared_artifacts import load_base_checkpoint

    suite = suites.from_spec(policy.suite)
    model = suite.build_model(**policy.model)  # checks the model spec against the suite
    check_fits(suite, policy, model=model)  # another suite, tasks, layers or method: fail before training
    base = policy.base.model_dump()
    checkpoint_path = base.pop("checkpoint")
    base_state = load_base_checkpoint(checkpoint_path, model) if checkpoint_path else None
    art = artifacts.prepare(suite, policy.model, artifacts.TrainSpec(**base), cache_dir=cache,
                            experts=policy.fusion is not None, base_state=base_state, log=log)
    return suite, art


def apply_and_save(policy: Policy, output: str, *, cache: str, threads: int = 1, log=print):
    from mtl_models import checkpoint
    from mtl_models.pipeline import MeasureSpec, apply_policy

    torch.set_num_threads(threads)
    suite, art = rebuild(policy, cache=cache, log=log)
    measured = (policy.provenance or {}).get("metrics", {})
    spec = MeasureSpec(latency_batch=int(measured.get("latency_batch", 256)), threads=threads)
    model, metrics = apply_policy(suite, policy, art, measure_spec=spec)
    folder = checkpoint.save(model, policy, metrics, output)
    log(f"saved {folder}/model.pt (weights only) and policy.yaml")
    _print_comparison(metrics, measured, log)
    return model, metrics


def _print_comparison(metrics: dict, measured: dict, log) -> None:
    keys = [k for k in metrics if k == "accuracy" or k.startswith(("metric/", "test/"))] + \
           ["params", "macs", "latency_ms"]
    log(f"{'metric':<16}{'applied':>14}{'in search':>14}")
    for k in keys:
        then = measured.get(k)
        fmt = (lambda v: f"{v:,.0f}") if k in ("params", "macs") else (lambda v: f"{v:.4f}")
        log(f"{k:<16}{fmt(metrics[k]):>14}{(fmt(then) if then is not None else '-'):>14}")
