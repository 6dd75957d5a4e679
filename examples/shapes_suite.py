"""A worked plugin suite: your own tasks, data and model, searched by prunefuse.

Run from the folder that holds `examples/` (the repository root):

    prunefuse search --suite examples.shapes_suite:make_suite --trials 8
    prunefuse search --suite examples.shapes_suite:make_suite --trunk cnn --model-option width=32 \
        --suite-option train_size=1000

A plugin is any importable `module:function` that returns a `TaskSuite`. prunefuse imports
the module from the current working directory (Ray workers get that folder through
PRUNEFUSE_PLUGIN_PATH), calls the function with the `--suite-option KEY=VALUE` options,
and records "examples.shapes_suite:make_suite" plus the options in every exported policy,
so `prunefuse apply policy.yaml` rebuilds the same suite and model later (run it from the
same folder).

The data: 16×16 grey images of one random shape (circle, square or triangle) at a random
place and size, with noise. Two tasks of different kinds share one trunk:
  shape  3-way classification (accuracy)
  size   regression of the shape's half-extent in pixels (R²)

The model: `ShapesNet`, a user model class following prunefuse's MTLModel contract:
  * `model.trunk`  the shared part (an nn.Module); its nn.Linear / nn.Conv2d layers are the
                   prunable ones, named by their path (`trunk.conv1`, `trunk.fc`), which is
                   how a policy's per-layer sparsity refers to them;
  * `model.heads`  an nn.ModuleDict, task name -> head module, one per task of the suite;
  * `forward(x)`   returns a dict {task name: output}; a classification head emits one logit
                   per class, a regression head one value per row.
The suite hands it to prunefuse as `TaskSuite.model_factory(suite, trunk=..., **options)`;
`--trunk` and `--model-option KEY=VALUE` arrive there as keyword arguments.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from mtl_models.suites import Split, Task, TaskSuite
from spaces.errors import PrunefuseError

SIDE = 16
SHAPES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 2.5, 6.5   # half-extent in pixels
MID_SIZE = (MIN_SIZE + MAX_SIZE) / 2

TASKS = (
    Task("shape", "classification", len(SHAPES)),
    # Labels are stored as (size - MID_SIZE) / 2 px, so an untrained head starts near the
    # mean and the MSE sits near the cross-entropy's scale; R² is computed after multiplying
    # back by `unit` (and is blind to the shift), so it is the R² of the size in pixels.
    Task("size", "regression", 1, metric="r2", unit=2.0),
)


# --- the data -------------------------------------------------------------------------

def draw_shapes(n: int, rng: np.random.Generator, noise: float = 0.1):
    """n images (n, 1, SIDE, SIDE) float32, their shape ids (n,) and sizes (n,) in pixels."""
    kind = rng.integers(0, len(SHAPES), size=n)
    size = rng.uniform(MIN_SIZE, MAX_SIZE, size=n)
    # Keep the whole shape on the canvas: the centre is at least `size` from every edge.
    cx = rng.uniform(size, SIDE - 1 - size)
    cy = rng.uniform(size, SIDE - 1 - size)
    brightness = rng.uniform(0.6, 1.0, size=n)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    r = size[:, None, None]
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)          # about a circle's area
    triangle = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2 * 1.2)  # apex up
    mask = np.select([kind[:, None, None] == 0, kind[:, None, None] == 1], [circle, square], triangle)
    images = mask * brightness[:, None, None] + rng.normal(0.0, noise, size=mask.shape)
    return images[:, None].astype(np.float32), kind.astype(np.int64), size.astype(np.float32)


def _split(n: int, rng: np.random.Generator, noise: float) -> Split:
    x, kind, size = draw_shapes(n, rng, noise)
    return Split(torch.from_numpy(x), {"shape": torch.from_numpy(kind),
                                       "size": torch.from_numpy((size - MID_SIZE) / TASKS[1].unit)})


# --- the model ------------------------------------------------------------------------

class ShapesNet(nn.Module):
    """The user's own multi-task model: a shared `trunk`, `heads` per task, dict forward.

    trunk="cnn": two conv blocks then one fc layer; trunk="mlp": two fc layers on the
    flattened image. `width` is the fc width, `channels` the conv blocks' channels.
    """

    def __init__(self, tasks, *, trunk: str = "mlp", width: int = 64, channels: int = 8):
        super().__init__()
        if trunk == "cnn":
            self.trunk = nn.Sequential(OrderedDict([
                ("conv1", nn.Conv2d(1, channels, 3, padding=1)), ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),                                   # 16 -> 8
                ("conv2", nn.Conv2d(channels, 2 * channels, 3, padding=1)), ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),                                   # 8 -> 4
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(2 * channels * 4 * 4, width)), ("relu_fc", nn.ReLU()),
            ]))
        elif trunk == "mlp":
            self.trunk = nn.Sequential(OrderedDict([
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(SIDE * SIDE, width)), ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(width, width)), ("relu2", nn.ReLU()),
            ]))
        else:
            raise PrunefuseError(f"the shapes suite's model has trunks 'mlp' and 'cnn'; got --trunk {trunk!r}")
        self.heads = nn.ModuleDict({t.name: nn.Linear(width, t.num_outputs) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(x)
        return {name: head(shared) for name, head in self.heads.items()}


def build_shapes_model(suite: TaskSuite, *, trunk: str = "mlp", width: int = 64, channels: int = 8) -> ShapesNet:
    """TaskSuite.model_factory: called as factory(suite, trunk=..., **--model-option values)."""
    for name, value in (("width", width), ("channels", channels)):
        if not isinstance(value, int) or value < 1:
            raise PrunefuseError(f"shapes model option {name}={value!r}; expected a positive integer")
    return ShapesNet(suite.tasks, trunk=trunk, width=width, channels=channels)


# --- the suite: what `--suite examples.shapes_suite:make_suite` calls ------------------

def make_suite(*, seed: int = 0, train_size: int = 3000, val_size: int = 600, test_size: int = 600,
               noise: float = 0.1) -> TaskSuite:
    """The shapes suite. Every option is a `--suite-option KEY=VALUE` and is recorded in the
    policy; the same options (and seed) rebuild exactly the same splits."""
    for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 10:
            raise PrunefuseError(f"shapes suite option {name}={value!r}; expected an integer >= 10")
    if not 0.0 <= noise <= 1.0:
        raise PrunefuseError(f"shapes suite option noise={noise!r}; expected 0 <= noise <= 1")
    rng = np.random.default_rng(seed)
    train, val, test = (_split(n, rng, noise) for n in (train_size, val_size, test_size))
    options = dict(seed=seed, train_size=train_size, val_size=val_size, test_size=test_size, noise=noise)
    return TaskSuite(name="shapes", options=options, tasks=TASKS, train=train, val=val, test=test,
                     input_shape=(1, SIDE, SIDE), model_factory=build_shapes_model)


if __name__ == "__main__":
    # A quick look: class balance and one image of each shape as text.
    suite = make_suite(train_size=60, val_size=10, test_size=10)
    for k, name in enumerate(SHAPES):
        i = int((suite.train.y["shape"] == k).nonzero()[0])
        print(f"{name} (size {float(suite.train.y['size'][i]) * TASKS[1].unit + MID_SIZE:.1f} px)")
        for row in suite.train.x[i, 0]:
            print("".join("#" if v > 0.4 else "." for v in row.tolist()))
    model = suite.build_model(trunk="cnn")
    print({t: tuple(v.shape) for t, v in model(suite.example_inputs(4)).items()})
