"""The merging benchmark's models and training (benchmarks/merging.py): a timm ViT trunk with one
linear head per task, pretraining, heads, experts, evaluation, the post-prune fine-tune.

The recipe follows the literature's (Ilharco et al. 2023; FusionBench): one backbone is
pretrained; each task's head is built from the pretrained features without training (class
prototypes compared by cosine, the role CLIP's zero-shot text heads play) and kept frozen while
the whole trunk is fine-tuned on that task alone with a small learning rate. Every expert thus
shares its head with the pretrained model, and a merged trunk is read by each task's head.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from mtl_models.models import MTLModel, library_trunk

TIMM_VIT = "timm:vit_tiny_patch16_224"  # timm's VisionTransformer class; its size comes from `ViT`


@dataclass(frozen=True)
class ViT:
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 8
    img_size: int = 32

    def options(self) -> dict:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    patch_size=self.patch_size, img_size=self.img_size)


class TaggedInputs(MTLModel):
    """The same modules as `MTLModel`; its forward takes images of several tasks in one batch,
    each carrying its task's index as a 4th constant channel, and gives each head only the
    rows of its own task. `fusion.learn_coefficients` draws its unlabeled batches from such a
    tensor, so each head's entropy is taken on its own task's inputs, as in AdaMerging."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        task = x[:, 3, 0, 0].round().long()
        features = self.trunk(x[:, :3])
        return {t: head(features[task == i]) for i, (t, head) in enumerate(self.heads.items())}


def tag(images: dict[str, torch.Tensor]) -> torch.Tensor:
    """task -> (n, 3, H, W) images => (Σn, 4, H, W), channel 3 the task's index (`TaggedInputs`)."""
    out = []
    for i, x in enumerate(images.values()):
        out.append(torch.cat([x, torch.full_like(x[:, :1], float(i))], dim=1))
    return torch.cat(out)


def build(vit: ViT, classes: dict[str, int], *, seed: int) -> MTLModel:
    torch.manual_seed(seed)
    trunk, width = library_trunk(TIMM_VIT, input_shape=(3, vit.img_size, vit.img_size), **vit.options())
    return MTLModel(trunk, {t: nn.Linear(width, n) for t, n in classes.items()})


def trunk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's entries of the model's state dict (model-named: `trunk.…`), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("trunk.")}


def with_trunk(model: MTLModel, state: dict, cls=MTLModel) -> MTLModel:
    """A copy of `model` (as `cls`) whose trunk holds `state`."""
    out = cls(copy.deepcopy(model.trunk), copy.deepcopy(dict(model.heads)))
    out.load_state_dict(state, strict=False)
    return out.eval()


# --- training -----------------------------------------------------------------------------

def _schedule(opt, steps: int, warmup: float = 0.1):
    """Linear warm-up, then cosine decay to zero (the literature's fine-tuning schedule)."""
    first = max(1, int(warmup * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / first if s < first else 0.5 * (1 + math.cos(math.pi * (s - first) / max(1, steps - first))))


def fit(params, loss_fn, *, steps: int, lr: float, seed: int, weight_decay: float = 0.05) -> None:
    """AdamW on `params` for `steps` steps; loss_fn(step, generator) -> scalar loss."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _schedule(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        loss = loss_fn(step, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()


def _batch(n: int, size: int, gen) -> torch.Tensor:
    return torch.randint(n, (size,), generator=gen)


def pretrain(vit: ViT, x: torch.Tensor, labels: dict[str, torch.Tensor], *, steps: int, lr: float, batch: int,
             seed: int) -> dict[str, torch.Tensor]:
    """The backbone: trained on the generic pretraining labels (one head each, dropped after)."""
    classes = {name: int(y.max()) + 1 for name, y in labels.items()}
    model = build(vit, classes, seed=seed).train()

    def loss(step, gen):
        idx = _batch(len(x), batch, gen)
        out = model(x[idx])
        return sum(nn.functional.cross_entropy(out[n], y[idx], ignore_index=-100) for n, y in labels.items())

    fit(model.parameters(), loss, steps=steps, lr=lr, seed=seed)
    return trunk_state(model)


@torch.no_grad()
def features(trunk: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    trunk.eval()
    return torch.cat([trunk(x[i:i + batch]) for i in range(0, len(x), batch)])


class PrototypeHead(nn.Module):
    """A zero-shot-style head: `kappa` × the cosine between the trunk's feature and each class's
    prototype (a unit row of `linear.weight`), as CLIP compares an image with its class names'
    embeddings. Reading only the feature's direction, it is blind to its scale."""

    def __init__(self, prototypes: torch.Tensor, kappa: float):
        super().__init__()
        self.linear = nn.Linear(prototypes.shape[1], prototypes.shape[0], bias=False)
        self.kappa = kappa
        with torch.no_grad():
            self.linear.weight.copy_(nn.functional.normalize(prototypes, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kappa * self.linear(nn.functional.normalize(x, dim=-1))


def prototype_heads(model: MTLModel, data: dict, *, shots: int, kappa: float) -> None:
    """Each task's head (in place): the mean unit feature of `shots` training images per class,
    from the pretrained trunk; nothing is trained (the role of CLIP's zero-shot heads)."""
    for task, td in data.items():
        y = td.y["train"]
        rows = torch.cat([torch.nonzero(y == c).flatten()[:shots] for c in range(td.classes)])
        unit = nn.functional.normalize(features(model.trunk, td.x["train"][rows]), dim=1)
        prototypes = torch.stack([unit[y[rows] == c].mean(0) for c in range(td.classes)])
        model.heads[task] = PrototypeHead(prototypes, kappa)


def finetune_expert(model: MTLModel, task: str, td, *, steps: int, lr: float, batch: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """The whole trunk fine-tuned on one task, its head frozen as the literature's zero-shot
    heads are; returns the expert's trunk state dict."""
    expert = copy.deepcopy(model).train()
    head = expert.heads[task]
    expert.heads.requires_grad_(False)
    x, y = td.x["train"], td.y["train"]

    def loss(step, gen):
        idx = _batch(len(x), batch, gen)
        return nn.functional.cross_entropy(head(expert.trunk(x[idx])), y[idx])

    fit(expert.trunk.parameters(), loss, steps=steps, lr=lr, seed=seed, weight_decay=0.1)
    return trunk_state(expert)


def finetune_multitask(model: MTLModel, data: dict, *, steps: int, lr: float, batch: int, seed: int) -> None:
    """The cycle's fine-tune after pruning (in place): every step a batch of each task's
    training images (labels used, as the project's cycle does), the tasks' losses summed;
    trunk and heads trained."""
    model.train()

    def loss(step, gen):
        total = 0.0
        for task, td in data.items():
            idx = _batch(len(td.x["train"]), batch, gen)
            total = total + nn.functional.cross_entropy(model.heads[task](model.trunk(td.x["train"][idx])),
                                                        td.y["train"][idx])
        return total

    fit(model.parameters(), loss, steps=steps, lr=lr, seed=seed)
    model.eval()


@torch.no_grad()
def accuracy(model: MTLModel, data: dict, split: str) -> dict[str, float]:
    """task -> accuracy of its head on its own `split` images."""
    model.eval()
    out = {}
    for task, td in data.items():
        feats = features(model.trunk, td.x[split])
        out[task] = float((model.heads[task](feats).argmax(1) == td.y[split]).float().mean())
    return out
