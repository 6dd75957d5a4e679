"""Training and evaluation loops shared by base, experts, references and fine-tunes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtl_models.suites.base import TaskSuite
from mtl_models.training.tasks import task_loss, task_metric


class Diverged(FloatingPointError):
    """A loss became NaN or infinite; the trial that hit it is failed with this reason."""


@dataclass(frozen=True)
class TrainOptions:
    """How `train` trains: Adam at `lr` for `epochs` (fractional allowed: 0.5 = half an epoch)
    over batches of `batch_size`, shuffled (and augmented, where the split augments) from
    `seed`. `tasks` restricts the loss to some tasks (an expert, a single-task reference);
    `weighting` is a spec for `mtl_models.training.weighting.make_weighter`. `precision`
    ("fp32", "bf16", "fp16"): the forward pass and losses run under autocast, weights and
    optimizer state stay fp32; fp16 scales the loss (a GradScaler) and needs CUDA."""

    epochs: float
    lr: float
    batch_size: int = 256
    seed: int = 0
    tasks: tuple[str, ...] | None = None
    weighting: dict | None = None
    weight_decay: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"


@dataclass(frozen=True)
class Guidance:
    """What else a batch learns besides its labels.

    `anchor` maps other tasks to outputs on every training row (a reference model's, in row
    order); each adds `anchor_weight` × its mean squared deviation from them, over their
    variance. `teacher` (a frozen model) with `distill` ({weight, temperature}): each batch
    also learns the teacher's outputs on it, computed with no grad (`mtl_models.training.distill`)."""

    anchor: dict | None = None
    anchor_weight: float = 0.0
    teacher: object = None
    distill: dict | None = None


def train(model, suite: TaskSuite, options: TrainOptions, *, guide: Guidance | None = None,
          on_epoch=None) -> list[dict[str, float]]:
    """Train `model` in place on `suite.train`, read in batches (`mtl_models.suites.reading`);
    returns each epoch's mean task losses. `on_epoch(epoch, means)` follows every epoch."""
    from mtl_models.suites.reading import read, shuffled
    from mtl_models.training.device import autocast, check_precision, grad_scaler
    from mtl_models.training.distill import combined as distill_term
    from mtl_models.training.weighting import make_weighter

    o, guide = options, guide or Guidance()
    device, precision = o.device, o.precision
    check_precision(precision, device)  # fp16 on the CPU fails here, before any step

    tasks = list(o.tasks or suite.task_names)
    weighter = make_weighter(o.weighting or {"method": "equal"}, tasks)
    shared = [p for p in model.trunk.parameters() if p.requires_grad]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if weighter.parameters():  # e.g. uncertainty's log-variances: their own group, at their own lr
        groups.append({"params": list(weighter.parameters()),
                       "lr": o.lr if weighter.param_lr is None else weighter.param_lr})
    opt = torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    data = suite.train
    gen = torch.Generator().manual_seed(o.seed)
    steps_per_epoch = math.ceil(len(data) / o.batch_size)
    total_steps = round(o.epochs * steps_per_epoch)
    if total_steps <= 0:  # epochs=0 (or too few to make one step) trains nothing
        model.eval()
        return []
    anchor = {t: y.to(device) for t, y in (guide.anchor or {}).items() if guide.anchor_weight > 0}
    # Each anchored output's deviation is measured in units of its own spread, so a regression
    # head in raw units and a classifier's logits weigh alike.
    anchor_scale = {t: float(y.var()) + 1e-8 for t, y in anchor.items()}
    teacher, distill = guide.teacher, guide.distill
    # Per-task loss sums stay on the device (no sync per task per step); read once an epoch.
    history, sums, count, step = [], torch.zeros(len(tasks), device=device), 0, 0
    scaler = grad_scaler(precision, device)
    model.to(device).train()
    requests = shuffled(data, batch_size=o.batch_size, steps=total_steps, generator=gen)
    for idx, x, y in read(data, requests, pin=device.startswith("cuda")):
        x = x.to(device)
        with autocast(precision, device):
            out = model(x)
        # Losses in fp32: a low-precision output's loss (and its sum over tasks) is computed
        # from the upcast output, so small losses do not round to zero.
        out = {t: v.float() for t, v in out.items()}
        losses = {t: task_loss(suite.task(t), out[t], y[t].to(device)) for t in tasks}
        total = weighter.combine(losses, shared_params=shared)
        if teacher is not None:
            with torch.no_grad(), autocast(precision, device):
                taught = teacher(x)
            total = total + distill_term([suite.task(t) for t in tasks], out, taught,
                                         weight=distill["weight"], temperature=distill["temperature"])
        for t, target in anchor.items():
            total = total + guide.anchor_weight * ((out[t] - target[idx.to(device)]) ** 2).mean() / anchor_scale[t]
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
    model.eval()
    return history


def predict(model, split, *, device: str = "cpu", batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The model's outputs on every row of a split (a `DataSplit`, or a tensor of inputs), in order."""
    from mtl_models.suites.base import Split
    from mtl_models.suites.reading import predict_split

    if isinstance(split, torch.Tensor):
        split = Split(split, {})
    return predict_split(model, split, device=device, batch_size=batch_size)


def evaluate(model, suite: TaskSuite, split: str = "val", *, device: str = "cpu") -> dict[str, float]:
    """Each task's metric on one split: task name -> value."""
    data = suite.split(split)
    out = predict(model, data, device=device)
    return {t.name: task_metric(t, out[t.name], data.y[t.name]) for t in suite.tasks}
