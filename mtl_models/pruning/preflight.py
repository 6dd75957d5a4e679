"""Fail fast: the hardest pruning a search may ask for, tried on a fresh (untrained) model
before anything is trained.

A model that pruning breaks (a hard-coded channel count, a buffer torch-pruning does not
resize, a module the checkpoint cannot rebuild) would otherwise fail every trial, after
minutes of base and expert training. Here it fails in seconds, in one line naming the layer.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from spaces.errors import PrunefuseError
from spaces.policy import Pruning

from mtl_models.models import checkpoint
from mtl_models.pruning import prune, without_masks


def check_pruning(suite, policies) -> None:
    """Prune a fresh model once per policy (`SearchSpace.hardest_pruning`), run a forward
    pass, save and reload it through `checkpoint`, and compare the outputs."""
    x = suite.example_inputs(2)
    for policy in policies:
        p = policy.pruning
        what = f"{p.mode} pruning at " + (f"global sparsity {p.global_sparsity:g}" if p.global_sparsity is not None
                                          else f"sparsity {max(p.sparsity.values(), default=0.0):g}") + \
            (f", round_to {p.round_to}" if p.round_to != 1 else "")
        torch.manual_seed(policy.seed)
        model = suite.build_model(**policy.model).eval()
        try:
            # one-shot, by magnitude: what the check needs is the pruned shapes, not the policy's criterion
            shapes = Pruning(mode=p.mode, sparsity=p.sparsity, global_sparsity=p.global_sparsity, round_to=p.round_to)
            model = without_masks(prune(model, shapes, example_inputs=x)).eval()
        except Exception as exc:  # noqa: BLE001 (any failure is the user's model's: say where)
            raise PrunefuseError(f"pruning check ({what}) failed before any training: {_reason(exc)}") from None
        expected = _forward(model, x, what)
        with tempfile.TemporaryDirectory(prefix="prunefuse-check-") as tmp:
            try:
                checkpoint.save(model, policy, {}, Path(tmp) / "model")
                reloaded, _ = checkpoint.load(Path(tmp) / "model", suite=suite)
            except Exception as exc:  # noqa: BLE001
                raise PrunefuseError(f"pruning check ({what}): the pruned model does not reload: "
                                     f"{_reason(exc)}") from None
            got = _forward(reloaded, x, f"{what}, reloaded")
        for task, out in expected.items():
            if task not in got or got[task].shape != out.shape or not torch.allclose(got[task], out, atol=1e-5,
                                                                                      rtol=1e-4):
                raise PrunefuseError(f"pruning check ({what}): the reloaded model's {task!r} outputs differ from "
                                     "the saved model's")


def _forward(model, x, what: str) -> dict:
    """The model's outputs; a failure names the innermost module that was running."""
    names = {m: n for n, m in model.named_modules()}
    running: list[str] = []

    def enter(module, inputs):
        running.append(names[module])

    def leave(module, inputs, output):
        running.pop()  # returns None: the output is left alone

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    try:
        with torch.no_grad():
            return {k: v.detach() for k, v in model(x).items()}
    except Exception as exc:  # noqa: BLE001
        where = f" in {running[-1]!r}" if running and running[-1] else ""
        raise PrunefuseError(f"pruning check ({what}): the pruned model's forward pass fails{where}: "
                             f"{_reason(exc)}") from None
    finally:
        for h in hooks:
            h.remove()


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, PrunefuseError) else f"{type(exc).__name__}: {text}"
