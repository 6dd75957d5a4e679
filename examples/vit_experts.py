"""A worked example: experts you fine-tuned yourself, fused, pruned and reported by prunefuse.

Merging starts from checkpoints people already have: a pretrained backbone and one copy of it
fine-tuned per task, each saved the way its library saves it. This script makes such a set
in plain torch, with nothing from prunefuse, then prints the one command that searches them:

    python -m examples.vit_experts runs/vit_experts      # writes images, backbone and experts

    prunefuse search --suite images --data runs/vit_experts/labels.csv --image-column path \
        --task shape:classification:shape --task colour:classification:colour \
        --suite-option size=16 --suite-option normalize=false \
        --trunk timm:vit_tiny_patch16_224 --model-option patch_size=4 --model-option embed_dim=32 \
        --model-option depth=2 --model-option num_heads=2 \
        --base-checkpoint runs/vit_experts/backbone.safetensors \
        --experts shape=runs/vit_experts/shape.safetensors --experts colour=runs/vit_experts/colour.pt \
        --train-option epochs=2 --trials 12

What it writes into FOLDER:
  images/*.png, labels.csv   16×16 RGB images of a wide or a tall bar, reddish or bluish, on noise
  backbone.safetensors       a small timm ViT without its classifier (timm's own key names), briefly
                             pretrained on both tasks: the backbone the experts share
  shape.safetensors          the backbone fine-tuned on `shape`, with its classifier `head.*`
  colour.pt                  the backbone fine-tuned on `colour`, a torch state dict (`head.*` too)

prunefuse maps timm's names onto its trunk and each `head.*` onto that task's head, takes task
vectors against the backbone, measures each expert on its own task (the report's
individual-model reference; `delta_m` is Δm% against them), task arithmetic at λ = 0.3 and TIES
at its defaults on the same experts (reference points on the report), and searches merge
methods, coefficients, pruning and fine-tuning around them.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

TASKS = {"shape": ("wide", "tall"), "colour": ("red", "blue")}
SIZE = 16
# The ViT every model here is: prunefuse's --trunk timm:vit_tiny_patch16_224 with these options.
VIT = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)


def make_images(folder: Path, count: int = 400, seed: int = 0) -> Path:
    """PNG files and a labels.csv (path, shape, colour); returns the table's path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    rows = []
    for i in range(count):
        shape, colour = int(rng.integers(2)), int(rng.integers(2))
        cy, cx, long, short = rng.integers(5, SIZE - 5), rng.integers(5, SIZE - 5), rng.integers(3, 5), rng.integers(0, 2)
        half = (short, long) if shape == 0 else (long, short)   # (rows, columns) either side of the centre
        mask = (np.abs(yy - cy) <= half[0]) & (np.abs(xx - cx) <= half[1])
        pixels = rng.uniform(0, 90, size=(SIZE, SIZE, 3))
        tint = np.array([220, 60, 40]) if colour == 0 else np.array([40, 80, 220])
        pixels[mask] = tint + rng.normal(0, 20, size=(int(mask.sum()), 3))
        name = f"images/{i:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
        rows.append({"path": name, "shape": TASKS["shape"][shape], "colour": TASKS["colour"][colour]})
    table = folder / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", *TASKS])
        writer.writeheader()
        writer.writerows(rows)
    return table


def load_images(folder: Path):
    """(pixels (n, 3, 16, 16) in 0..1, {task: class ids}), classes in sorted order as prunefuse encodes them."""
    from PIL import Image

    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    x = torch.from_numpy(np.stack([np.asarray(Image.open(folder / r["path"]).convert("RGB")) for r in rows]))
    labels = {t: torch.tensor([sorted(names).index(r[t]) for r in rows]) for t, names in TASKS.items()}
    return x.permute(0, 3, 1, 2).float() / 255.0, labels


def vit(num_classes: int) -> nn.Module:
    """A small timm ViT with random weights (nothing downloaded)."""
    from mtl_models.models import imports  # imports timm beside a CPU-only torch (see its docstring)

    timm = imports.timm("the example")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=SIZE,
                             **VIT)


def fit(model: nn.Module, x, y, *, epochs: int, lr: float, seed: int) -> nn.Module:
    """Plain full-batch-ish Adam on cross-entropy: the user's own training loop."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def make_experts(folder: Path, *, pretrain_epochs: int = 3, expert_epochs: int = 4) -> dict[str, Path]:
    """backbone.safetensors, shape.safetensors, colour.pt in timm's key names; returns their paths."""
    from safetensors.torch import save_file

    x, labels = load_images(folder)
    # "Pretraining": both tasks at once through one 4-way classifier, then the classifier is dropped.
    joint = labels["shape"] * 2 + labels["colour"]
    backbone = fit(vit(4), x, joint, epochs=pretrain_epochs, lr=2e-3, seed=0)
    trunk = {k: v.contiguous() for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    paths = {"backbone": folder / "backbone.safetensors"}
    save_file(trunk, paths["backbone"])
    for k, task in enumerate(TASKS):
        expert = vit(len(TASKS[task]))
        expert.load_state_dict(trunk, strict=False)  # the backbone, with a fresh classifier `head.*`
        fit(expert, x, labels[task], epochs=expert_epochs, lr=1e-3, seed=1 + k)
        state = {n: v.contiguous() for n, v in expert.state_dict().items()}
        if task == "shape":
            paths[task] = folder / "shape.safetensors"
            save_file(state, paths[task])
        else:
            paths[task] = folder / "colour.pt"
            torch.save(state, paths[task])
    return paths


def search_command(folder: Path) -> list[str]:
    """The one `prunefuse search` line that fuses, prunes and reports them."""
    options = [a for k, v in VIT.items() for a in ("--model-option", f"{k}={v}")]
    return ["prunefuse", "search", "--suite", "images", "--data", str(folder / "labels.csv"), "--image-column", "path",
            "--task", "shape:classification:shape", "--task", "colour:classification:colour",
            "--suite-option", f"size={SIZE}", "--suite-option", "normalize=false",
            "--trunk", "timm:vit_tiny_patch16_224", *options,
            "--base-checkpoint", str(folder / "backbone.safetensors"),
            "--experts", f"shape={folder / 'shape.safetensors'}", "--experts", f"colour={folder / 'colour.pt'}"]


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:] or ["runs/vit_experts"])[0])
    make_images(folder)
    make_experts(folder)
    print("now search them:\n  " + " ".join(search_command(folder)) + " --train-option epochs=2 --trials 12")


if __name__ == "__main__":
    main()
