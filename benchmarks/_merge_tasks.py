"""Offline image tasks for the merging benchmark (benchmarks/merging.py), drawn procedurally.

Six families of 32×32 RGB images, each its own dataset with its own images (as the
literature's eight tasks are eight datasets), every draw a function of a numpy seed:

  digits       scikit-learn's bundled 8×8 digits, scaled 3×, at a random place and colour (10)
  shapes       disc, ring, square, square outline, triangle, cross; rotated, sized, placed (6)
  orientation  a grating in a round window, its angle in one of 8 bins of 22.5° (jittered) (8)
  count        1 to 6 dots (6)
  texture      checks, stripes (two slants), dots, noise, zig-zag: the whole image (6)
  hue          one object whose hue is in one of 8 bins of the colour wheel (8)

Every image has a random dark background with pixel noise and a bright foreground, so the
colours carry no label but `hue`'s. Digits and shapes sit near the centre (± 3-4 px), so that a
ViT this small (4×4 patches of 8 px) learns them in a short fine-tune (experts: digits ~75 %,
shapes ~90 %, the others 87-100 %). Digits' source glyphs are split 70/15/15 once, before any
drawing: no test image reuses a training or pretraining glyph.

Pretraining (`pretraining_set`): fresh draws of all six families, labelled with *generic*
labels only (which family, and a coarse attribute naming a group of two or more of its classes,
`coarse`), plus the 3×3 cell where the object's centre lies. The backbone learns what the
families look like and some of their structure, never the downstream classes: the role CLIP's
image-text pretraining plays in the literature's benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIDE = 32
CLASSES = {"digits": 10, "shapes": 6, "orientation": 8, "count": 6, "texture": 6, "hue": 8}
TASKS = tuple(CLASSES)
SPLITS = ("train", "val", "test")
_YY, _XX = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
IGNORE = -100  # a pretraining label an image does not have (a texture has no position)


@dataclass(frozen=True)
class TaskData:
    """One task's images (n, 3, 32, 32) float32 and labels (n,) int64, per split."""
    name: str
    classes: int
    x: dict
    y: dict


# --- drawing ------------------------------------------------------------------------------

def _background(rng) -> np.ndarray:
    base = rng.uniform(0.0, 0.35, size=(3, 1, 1)).astype(np.float32)
    return base + rng.normal(0.0, 0.06, size=(3, SIDE, SIDE)).astype(np.float32)


def _bright(rng) -> np.ndarray:
    return rng.uniform(0.55, 1.0, size=(3, 1, 1)).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    mask = np.clip(mask, 0.0, 1.0)[None]
    return img * (1.0 - mask) + colour * mask


def _rotated(cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = _XX - cx, _YY - cy
    return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(kind: int, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    u, v = _rotated(cx, cy, angle)
    r = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    width = max(1.5, size * 0.3)
    if kind == 0:    # disc
        return (r <= size).astype(np.float32)
    if kind == 1:    # ring
        return ((r <= size) & (r >= size - width)).astype(np.float32)
    if kind == 2:    # square
        return (box <= size * 0.85).astype(np.float32)
    if kind == 3:    # square outline
        return ((box <= size * 0.85) & (box >= size * 0.85 - width)).astype(np.float32)
    if kind == 4:    # triangle: three half-planes at 120°
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= (np.cos(a) * u + np.sin(a) * v) <= size * 0.5
        return inside.astype(np.float32)
    arm = width * 0.6  # 5: cross
    return (((np.abs(u) <= arm) & (np.abs(v) <= size)) | ((np.abs(v) <= arm) & (np.abs(u) <= size))).astype(np.float32)


def _centre(rng, margin: float) -> tuple[float, float]:
    return rng.uniform(margin, SIDE - 1 - margin), rng.uniform(margin, SIDE - 1 - margin)


def _cell(cx: float, cy: float) -> int:
    return int(cy // (SIDE / 3)) * 3 + int(cx // (SIDE / 3))


def draw_digits(label: int, rng, glyphs) -> tuple[np.ndarray, int]:
    """glyphs: (images 8×8 in [0, 1], labels) of this split's source digits."""
    images, labels = glyphs
    glyph = images[rng.choice(np.flatnonzero(labels == label))]
    scale = 3
    big = np.kron(glyph, np.ones((scale, scale), dtype=np.float32))
    h = big.shape[0]
    top, left = (int(v) for v in rng.integers((SIDE - h) // 2 - 3, (SIDE - h) // 2 + 4, size=2))  # centred ± 3 px
    mask = np.zeros((SIDE, SIDE), dtype=np.float32)
    mask[top:top + h, left:left + h] = big
    return _paint(_background(rng), mask, _bright(rng)), _cell(left + h / 2, top + h / 2)


def draw_shapes(label: int, rng, _=None) -> tuple[np.ndarray, int]:
    size = rng.uniform(7.0, 11.0)
    cx, cy = rng.uniform(SIDE / 2 - 4, SIDE / 2 + 3, size=2)  # centred ± 4 px
    mask = _shape_mask(label, cx, cy, size, rng.uniform(0, 2 * np.pi))
    return _paint(_background(rng), mask, _bright(rng)), _cell(cx, cy)


def draw_orientation(label: int, rng, _=None) -> tuple[np.ndarray, int]:
    bin_width = np.pi / CLASSES["orientation"]
    angle = (label + rng.uniform(0.1, 0.9)) * bin_width  # off the bin edges: labels stay decidable
    radius = rng.uniform(8.0, 13.0)
    cx, cy = _centre(rng, radius * 0.6)
    u, _v = _rotated(cx, cy, angle)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * u / rng.uniform(4.0, 8.0) + rng.uniform(0, 2 * np.pi))
    window = (np.hypot(_XX - cx, _YY - cy) <= radius).astype(np.float32)
    return _paint(_background(rng), wave * window, _bright(rng)), _cell(cx, cy)


def draw_count(label: int, rng, _=None) -> tuple[np.ndarray, int]:
    n, radius, mask, placed = label + 1, rng.uniform(2.0, 3.0), np.zeros((SIDE, SIDE), np.float32), []
    while len(placed) < n:  # dots kept apart, so that each is seen as one
        cx, cy = _centre(rng, radius + 1)
        if all(np.hypot(cx - px, cy - py) > 2 * radius + 2 for px, py in placed):
            placed.append((cx, cy))
            mask = np.maximum(mask, (np.hypot(_XX - cx, _YY - cy) <= radius).astype(np.float32))
    mx, my = np.mean(placed, axis=0)
    return _paint(_background(rng), mask, _bright(rng)), _cell(mx, my)


def draw_texture(label: int, rng, _=None) -> tuple[np.ndarray, int]:
    period = rng.uniform(4.0, 8.0)
    u, v = _rotated(rng.uniform(0, SIDE), rng.uniform(0, SIDE), rng.uniform(-0.25, 0.25))
    if label == 0:    # checks
        mask = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif label == 1:  # stripes, one slant
        mask = (np.floor((u + v) / period) % 2).astype(np.float32)
    elif label == 2:  # stripes, the other slant
        mask = (np.floor((u - v) / period) % 2).astype(np.float32)
    elif label == 3:  # dots on a grid
        mask = (np.hypot(u % period - period / 2, v % period - period / 2) <= period * 0.25).astype(np.float32)
    elif label == 4:  # blocky noise
        cells = rng.random((SIDE // 4 + 1, SIDE // 4 + 1)) < 0.5
        mask = np.kron(cells, np.ones((4, 4)))[:SIDE, :SIDE].astype(np.float32)
    else:             # zig-zag
        mask = (np.floor((v + np.abs((u % period) - period / 2)) / (period / 2)) % 2).astype(np.float32)
    return _paint(_background(rng), mask, _bright(rng)), IGNORE


def draw_hue(label: int, rng, _=None) -> tuple[np.ndarray, int]:
    hue = (label + rng.uniform(0.15, 0.85)) / CLASSES["hue"]
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6  # HSV -> RGB
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    size = rng.uniform(5.0, 9.0)
    cx, cy = _centre(rng, size + 1)
    mask = _shape_mask(int(rng.integers(0, 6)), cx, cy, size, rng.uniform(0, 2 * np.pi))
    grey = np.full((3, 1, 1), rng.uniform(0.0, 0.35), np.float32) + rng.normal(0, 0.06, (3, SIDE, SIDE)).astype(np.float32)
    return _paint(grey, mask, rgb.astype(np.float32).reshape(3, 1, 1)), _cell(cx, cy)


DRAW = {"digits": draw_digits, "shapes": draw_shapes, "orientation": draw_orientation, "count": draw_count,
        "texture": draw_texture, "hue": draw_hue}


def coarse(task: str, label: int) -> int:
    """The pretraining's attribute of a downstream class (0-3): a group of at least two classes,
    never one class. Digits: d < 5 and d odd ({0,2,4} {1,3} {6,8} {5,7,9}); the others: the
    class's pair of neighbours (shapes: round, square, spiky; orientation: a 45° sector; count:
    1-2, 3-4, 5-6 dots; texture: checks or one slant of stripes, the other slant or dots, noise or
    zig-zag; hue: a quarter of the wheel)."""
    if task == "digits":
        return 2 * int(label < 5) + label % 2
    return label // 2


# --- datasets -----------------------------------------------------------------------------

def _glyph_splits() -> dict:
    """The source digits split 70 / 15 / 15 once, the same for every seed: pretraining (shared by
    the seeds) draws from the training glyphs only, so no seed's test glyph was pretrained on."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    cut1, cut2 = int(0.7 * len(order)), int(0.85 * len(order))
    parts = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    return {s: (images[idx], labels[idx]) for s, idx in parts.items()}


def _draw_many(task: str, n: int, rng, glyphs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = rng.integers(0, CLASSES[task], size=n)
    drawn = [DRAW[task](int(y), rng, glyphs) for y in labels]
    x = np.clip(np.stack([d[0] for d in drawn]), 0.0, 1.0)
    return x.astype(np.float32), labels.astype(np.int64), np.array([d[1] for d in drawn], dtype=np.int64)


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(x) - 0.5) / 0.25  # roughly zero-mean, unit-scale pixels


def task_sets(seed: int, sizes: dict, tasks=TASKS) -> dict[str, TaskData]:
    """task -> its own train / val / test images, drawn from `seed` (sizes: split -> n per task)."""
    out = {}
    for i, task in enumerate(tasks):
        rng = np.random.default_rng([seed, 1, i])
        glyphs = _glyph_splits() if task == "digits" else {s: None for s in SPLITS}
        xs, ys = {}, {}
        for split in SPLITS:
            x, y, _ = _draw_many(task, sizes[split], rng, glyphs[split])
            xs[split], ys[split] = _as_tensor(x), torch.from_numpy(y)
        out[task] = TaskData(task, CLASSES[task], xs, ys)
    return out


def pretraining_set(seed: int, per_task: int, tasks=TASKS, *, grouped: bool = True
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images of every family (fresh draws; digits from the training glyphs only) and their
    generic labels: "kind" = family × coarse attribute (4 per family; `grouped=False`: the family
    alone, a backbone that knows less of the tasks), "cell" = 3×3 position."""
    xs, kinds, cells = [], [], []
    for i, task in enumerate(tasks):
        rng = np.random.default_rng([seed, 2, i])
        glyphs = _glyph_splits()["train"] if task == "digits" else None
        x, y, cell = _draw_many(task, per_task, rng, glyphs)
        xs.append(x)
        kinds.append(4 * i + np.array([coarse(task, int(v)) if grouped else 0 for v in y]))
        cells.append(cell)
    return _as_tensor(np.concatenate(xs)), {"kind": torch.from_numpy(np.concatenate(kinds)).long(),
                                            "cell": torch.from_numpy(np.concatenate(cells)).long()}
