"""AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning"): task-arithmetic coefficients learned by gradient descent on unlabeled inputs.

The merged trunk is theta_0 + sum_t lambda_t tau_t, with one lambda per task (task-wise) or
per task and layer group (layer-wise: the shape of the policy's coefficients says which).
Starting from `init`, Adam takes `steps` steps of size `lr` on batches of training inputs
(labels are never read), minimising for each head:
  - a class-logit head (classification, segmentation): the entropy of its predictions, as
    in the paper (confident predictions on a task's inputs go with right ones);
  - any other head: the mean squared distance to its own expert's outputs on the same inputs.
Each lambda is kept in [0, 1] (the paper's clamp). Once learned, the coefficients are
plain task-arithmetic coefficients: a policy holding them with `steps: 0` merges the same
trunk again without learning (`mtl_models.pipeline.learn_fusion` writes it so).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from spaces.knobs import Knob

from .linear import summed
from .merge import layer_group
from .registry import register

# Heads whose outputs are class logits over dim 1: trained on their predictions' entropy.
ENTROPY_KINDS = ("classification", "segmentation")
BATCH = 128  # unlabeled inputs per step
COEFFICIENT_RANGE = (0.0, 1.0)


@register("adamerging", knobs={"steps": Knob(0, 200, integer=True), "lr": Knob(1e-3, 0.1, log=True),
                               "init": Knob(0.1, 1.0)}, needs=("data",))
def adamerging(deltas: Mapping[str, Tensor], key: str, *, steps: int = 100, lr: float = 0.01,
               init: float = 0.3) -> Tensor:
    """The merge with coefficients already learned (or given): task arithmetic. The learning
    itself needs a model and inputs: `learn_coefficients`."""
    return summed(deltas)


def entropy(logits: Tensor) -> Tensor:
    """Mean entropy of the softmax over dim 1 (classes), over every other dim."""
    logp = logits.float().log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def _output_loss(kind: str, merged: Tensor, expert: Tensor | None) -> Tensor:
    if kind in ENTROPY_KINDS:
        return entropy(merged)
    return (merged.float() - expert.float()).pow(2).mean()


def learn_coefficients(model: torch.nn.Module, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]],
                       *, inputs: Tensor, kinds: Mapping[str, str], layerwise: bool, steps: int, lr: float,
                       init: float, seed: int, buffers=(), device: str = "cpu") -> dict:
    """task -> lambda (or task -> {layer group: lambda}) minimising the unsupervised loss.

    model: the multi-task model holding everything but the merged keys (heads from their
      experts); base / experts: the state dicts of the keys to merge (the trunk's), model-named.
    kinds: head (task) -> its task kind. buffers: keys copied from the base, never merged.
    """
    keys = [k for k, v in base.items() if v.is_floating_point() and k not in set(buffers)]
    tasks = list(experts)
    groups = list(dict.fromkeys(layer_group(k) for k in keys))
    theta0 = {k: base[k].to(device=device, dtype=torch.float32) for k in keys}
    taus = {k: torch.stack([experts[t][k].to(device=device, dtype=torch.float32) - theta0[k] for t in tasks])
            for k in keys}  # (T, *shape) per key
    column = {k: groups.index(layer_group(k)) for k in keys}
    lam = torch.full((len(tasks), len(groups) if layerwise else 1), float(init), device=device, requires_grad=True)
    model = model.to(device).eval()  # BatchNorm on the base's statistics, no dropout
    for p in model.parameters():
        p.requires_grad_(False)

    def trunk(weights: Tensor) -> dict[str, Tensor]:  # weights: (T, groups) -> merged params
        return {k: theta0[k] + torch.tensordot(weights[:, column[k] if layerwise else 0], taus[k], dims=1)
                for k in keys}

    experts_needed = any(kind not in ENTROPY_KINDS for kind in kinds.values())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([lam], lr=lr)
    for _ in range(steps):
        batch = inputs[torch.randint(len(inputs), (min(BATCH, len(inputs)),), generator=gen)].to(device)
        targets = _expert_outputs(model, trunk, tasks, lam.shape, batch, kinds) if experts_needed else {}
        out = functional_call(model, trunk(lam), (batch,), strict=False)
        loss = sum(_output_loss(kinds[t], out[t], targets.get(t)) for t in tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(*COEFFICIENT_RANGE)
    learned = lam.detach().cpu().tolist()
    if layerwise:
        return {t: dict(zip(groups, row)) for t, row in zip(tasks, learned)}
    return {t: row[0] for t, row in zip(tasks, learned)}


def _expert_outputs(model, trunk: Callable, tasks: list[str], shape, batch: Tensor, kinds) -> dict[str, Tensor]:
    """Each non-entropy head's output with its own expert's trunk (lambda one-hot on its task)."""
    out = {}
    with torch.no_grad():
        for i, t in enumerate(tasks):
            if kinds[t] in ENTROPY_KINDS:
                continue
            one_hot = torch.zeros(shape)
            one_hot[i] = 1.0
            out[t] = functional_call(model, trunk(one_hot.to(batch.device)), (batch,), strict=False)[t]
    return out
