"""`scenes`: a built-in, offline dense-prediction suite in the spirit of NYUv2.

Each image is a small seeded 3-D scene: a textured floor running to a horizon (sky above),
and 2–4 objects (spheres, tilted boxes, pyramids) at random depths, drawn far to near so
nearer ones occlude. Objects shrink with depth (a pinhole camera), carry a random colour and
texture (stripes, checks or noise) and are shaded by one light, so shape, size, shading and
height in the image are the cues; colour says nothing about the class. Per image:

  semantic  segmentation, 4 classes (floor, sphere, box, pyramid); the sky is IGNORE_INDEX
  depth     distance per pixel (2–9 units); 0 (unknown) in the sky, as NYUv2's missing depth
  normals   unit surface normal per pixel (camera frame, z towards the camera); 0 in the sky

Images are (3, size, size) float32. Generation is numpy only, seeded by `seed`: the same
options give the same data everywhere.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import SUITES, Split, Task, TaskSuite

CLASSES = ("floor", "sphere", "box", "pyramid")
DEPTH_UNIT = 4.0     # depth labels are stored divided by this (losses on one scale with the others)
FOCAL = 26.0          # pixels per unit at distance 1: a radius-1 object at depth 4 spans ~13 px
FLOOR_NORMAL = np.array([0.0, -0.8, 0.6])   # tilted up towards the camera (image y grows downwards)


def _texture(rng, yy, xx) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and frequency
        a, f = rng.uniform(0, np.pi), rng.uniform(0.5, 1.5)
        return 0.75 + 0.25 * np.sign(np.sin(f * (np.cos(a) * xx + np.sin(a) * yy)))
    if kind == 1:  # checks
        s = rng.integers(2, 5)
        return 0.7 + 0.3 * (((xx // s) + (yy // s)) % 2)
    return 0.7 + 0.3 * rng.random(xx.shape)


def _scene(rng, size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    light = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.9, -0.3), 0.8])
    light /= np.linalg.norm(light)
    horizon = int(rng.integers(size // 8, size // 3))
    # Floor: depth grows towards the horizon (a plane seen from above it); sky has no depth.
    rows = np.clip(yy - horizon + 1, 1, None)
    depth = np.where(yy >= horizon, np.clip(2.0 + 7.0 * (horizon + 2) / (rows + 2), 2.0, 9.0), 0.0)
    normals = np.where((yy >= horizon)[None], FLOOR_NORMAL[:, None, None] / np.linalg.norm(FLOOR_NORMAL), 0.0)
    seg = np.where(yy >= horizon, 0, -1)
    colour = rng.uniform(0.2, 0.9, 3)[:, None, None] * _texture(rng, yy, xx)[None]
    sky = np.array([0.55, 0.7, 0.95])[:, None, None] * (0.9 + 0.1 * yy / size)[None]
    img = np.where((yy >= horizon)[None], colour * (0.5 + 0.5 * max(0.0, FLOOR_NORMAL @ light)), sky)

    objects = [(rng.uniform(2.6, 8.0), rng.integers(1, 4)) for _ in range(rng.integers(2, 5))]
    for z, cls in sorted(objects, reverse=True):  # far first: nearer objects paint over them
        r = FOCAL * rng.uniform(0.55, 1.0) / z     # radius in pixels
        cx = rng.uniform(0, size)
        cy = rng.uniform(horizon, size) if rng.random() < 0.8 else rng.uniform(0, size)
        dx, dy = (xx - cx) / r, (yy - cy) / r
        if cls == 1:      # sphere
            inside = dx ** 2 + dy ** 2 < 1.0
            nz = np.sqrt(np.clip(1.0 - dx ** 2 - dy ** 2, 0.0, 1.0))
            n = np.stack([dx, dy, nz])
            d = z - nz * r * z / FOCAL
        elif cls == 2:    # box face, tilted
            inside = (np.abs(dx) < 0.85) & (np.abs(dy) < 0.85)
            t = rng.uniform(-0.6, 0.6, 2)
            n = np.broadcast_to(np.array([t[0], t[1], 1.0])[:, None, None], (3, size, size))
            d = z + (t[0] * dx + t[1] * dy) * r * z / FOCAL
        else:             # pyramid: an upright triangle, two faces lit differently
            inside = (dy < 0.9) & (dy > -1.0) & (np.abs(dx) < (dy + 1.0) / 1.9 * 1.0)
            side = np.sign(dx)
            n = np.stack([0.7 * side, np.full_like(dx, -0.3), np.ones_like(dx)])
            d = z - (1.0 - np.abs(dx)) * 0.3 * r * z / FOCAL
        n = n / np.linalg.norm(n, axis=0, keepdims=True).clip(1e-9)
        shade = 0.35 + 0.65 * np.clip(np.einsum("chw,c->hw", n, light), 0.0, 1.0)
        look = rng.uniform(0.15, 1.0, 3)[:, None, None] * _texture(rng, yy, xx)[None] * shade[None]
        img = np.where(inside[None], look, img)
        depth = np.where(inside, d, depth)
        normals = np.where(inside[None], n, normals)
        seg = np.where(inside, cls, seg)
    img = img + rng.normal(0.0, 0.03, img.shape)
    return img.astype(np.float32), seg.astype(np.int64), depth.astype(np.float32), normals.astype(np.float32)


def generate(n: int, *, seed: int, size: int = 32) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    parts = [_scene(rng, size) for _ in range(n)]
    x = np.stack([p[0] for p in parts])
    return x, {"semantic": np.stack([p[1] for p in parts]), "depth": np.stack([p[2] for p in parts]),
               "normals": np.stack([p[3] for p in parts])}


def _split(x, y, mean, std) -> Split:
    y = {**y, "depth": y["depth"] / DEPTH_UNIT}
    return Split(torch.from_numpy((x - mean) / std), {t: torch.from_numpy(v) for t, v in y.items()})


@SUITES.register("scenes")
def make_scenes(*, seed: int = 0, train_images: int = 1500, val_images: int = 300, test_images: int = 300,
                size: int = 32) -> TaskSuite:
    """The scenes suite; splits come from disjoint seeds, so sizes change nothing else."""
    from spaces.knobs import coerce_number

    counts = {k: coerce_number("suite 'scenes'", k, v, int, low=1)
              for k, v in (("train_images", train_images), ("val_images", val_images), ("test_images", test_images))}
    size = coerce_number("suite 'scenes'", "size", size, int, low=8)
    seed = coerce_number("suite 'scenes'", "seed", seed, int)
    raw = {name: generate(counts[f"{name}_images"], seed=seed * 3 + i, size=size)
           for i, name in enumerate(("train", "val", "test"))}
    mean = raw["train"][0].mean(axis=(0, 2, 3), keepdims=True)[0]
    std = raw["train"][0].std(axis=(0, 2, 3), keepdims=True)[0] + 1e-6
    splits = {name: _split(x, y, mean, std) for name, (x, y) in raw.items()}
    tasks = (Task("semantic", "segmentation", len(CLASSES)), Task("depth", "depth", 1, unit=DEPTH_UNIT), Task("normals", "normals", 3))
    options = {"seed": seed, **counts, "size": size}
    return TaskSuite("scenes", options, tasks, splits["train"], splits["val"], splits["test"], (3, size, size))
