"""A model's training flags, put back as they were: the one place that saves and restores them."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode for a forward that only looks (BatchNorm statistics untouched, dropout off),
    then each module's own flag back (a model may hold frozen submodules in eval mode)."""
    with kept_modes(model):
        model.eval()
        yield model


@contextlib.contextmanager
def kept_modes(model):
    """Whatever the block does to train/eval flags, every module's own flag is back after it."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def hooked_forward(model, example_inputs, handles: list) -> None:
    """One forward that only looks (`eval_mode`, no grad) for the hooks behind `handles`, which
    are removed after it, whatever happens."""
    try:
        with eval_mode(model), torch.no_grad():
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()
