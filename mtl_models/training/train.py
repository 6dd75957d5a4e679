"""Training and evaluation loops shared by base, experts, references and fine-tunes."""
from __future__ import annotations

import math

import torch

from mtl_models.suites.base import Split, TaskSuite
from mtl_models.training.tasks import task_loss, task_metric


class Diverged(FloatingPointError):
    """A loss became NaN or infinite; the trial that hit it is failed with this reason."""


def train(model, suite: TaskSuite, *, epochs: float, lr: float, batch_size: int = 256,
          weighting: dict | None = None, tasks: list[str] | None = None, seed: int = 0,
          device: str = "cpu", weight_decay: float = 0.0, on_epoch=None,
          anchor: dict[str, torch.Tensor] | None = None, anchor_weight: float = 0.0,
          precision: str = "fp32", teacher=None, distill: dict | None = None) -> list[dict[str, float]]:
    """Train `model` in place on `suite.train` with Adam; returns each epoch's mean task losses.

    `tasks` restricts the loss to some tasks (an expert or a single-task reference);
    `weighting` is a weighting spec for `mtl_models.training.weighting.make_weighter`.
    `epochs` may be fractional (0.5 = half an epoch) so fine-tunes can be short.
    `anchor` maps other tasks to outputs on the training split (a reference model's); each
    adds `anchor_weight` × its mean squared deviation from them, over their variance.
    `precision` ("fp32", "bf16", "fp16"): the forward pass and losses run under autocast,
    weights and optimizer state stay fp32; fp16 scales the loss (a GradScaler) and needs CUDA.
    `teacher` (a frozen model) with `distill` ({weight, temperature}): each batch also learns
    the teacher's outputs on it, computed once with no grad (`mtl_models.training.distill`).
    """
    from mtl_models.training.device import autocast, check_precision, grad_scaler
    from mtl_models.training.distill import combined as distill_term
    from mtl_models.training.weighting import make_weighter

    check_precision(precision, device)  # fp16 on the CPU fails here, before any step

    tasks = tasks or suite.task_names
    weighter = make_weighter(weighting or {"method": "equal"}, tasks)
    shared = [p for p in model.trunk.parameters() if p.requires_grad]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if weighter.parameters():  # e.g. uncertainty's log-variances: their own group, at their own lr
        groups.append({"params": list(weighter.parameters()),
                       "lr": lr if weighter.param_lr is None else weighter.param_lr})
    opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    data: Split = suite.train
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total_steps = round(epochs * steps_per_epoch)
    if total_steps <= 0:  # epochs=0 (or too few to make one step) trains nothing
        model.eval()
        return []
    anchor = {t: y.to(device) for t, y in (anchor or {}).items() if anchor_weight > 0}
    # Each anchored output's deviation is measured in units of its own spread, so a regression
    # head in raw units and a classifier's logits weigh alike.
    anchor_scale = {t: float(y.var()) + 1e-8 for t, y in anchor.items()}
    # Per-task loss sums stay on the device (no sync per task per step); read once an epoch.
    history, sums, count, step = [], torch.zeros(len(tasks), device=device), 0, 0
    scaler = grad_scaler(precision, device)
    model.to(device).train()
    while step < total_steps:
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), batch_size):
            idx = order[start:start + batch_size]
            x = data.x[idx].to(device)
            with autocast(precision, device):
                out = model(x)
            # Losses in fp32: a low-precision output's loss (and its sum over tasks) is computed
            # from the upcast output, so small losses do not round to zero.
            out = {t: o.float() for t, o in out.items()}
            losses = {t: task_loss(suite.task(t), out[t], data.y[t][idx].to(device)) for t in tasks}
            total = weighter.combine(losses, shared_params=shared)
            if teacher is not None:
                with torch.no_grad(), autocast(precision, device):
                    taught = teacher(x)
                total = total + distill_term([suite.task(t) for t in tasks], out, taught,
                                             weight=distill["weight"], temperature=distill["temperature"])
            for t, target in anchor.items():
                total = total + anchor_weight * ((out[t] - target[idx.to(device)]) ** 2).mean() / anchor_scale[t]
            if not torch.isfinite(total):
                raise Diverged(f"training loss became {total.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
            sums += torch.stack([losses[t].detach() for t in tasks])
            count, step = count + 1, step + 1
            if step % steps_per_epoch == 0 or step == total_steps:
                means = dict(zip(tasks, (sums / count).tolist()))
                weighter.end_epoch(means)
                history.append(means)
                if on_epoch:
                    on_epoch(len(history), means)
                sums, count = torch.zeros(len(tasks), device=device), 0
            if step >= total_steps:
                break
    model.eval()
    return history


@torch.no_grad()
def predict(model, x: torch.Tensor, *, device: str = "cpu", batch_size: int = 1024) -> dict[str, torch.Tensor]:
    model.to(device).eval()
    chunks = [model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return {t: torch.cat([c[t] for c in chunks]).cpu() for t in chunks[0]}


def evaluate(model, suite: TaskSuite, split: str = "val", *, device: str = "cpu") -> dict[str, float]:
    """Each task's metric on one split: task name -> value."""
    data = suite.split(split)
    out = predict(model, data.x, device=device)
    return {t.name: task_metric(t, out[t.name], data.y[t.name]) for t in suite.tasks}
