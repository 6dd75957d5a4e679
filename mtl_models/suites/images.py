"""images: PNG / JPEG files listed in a table (or sorted into class folders), with labels.

    prunefuse search --suite images --data labels.csv --image-column path \
        --task shape:classification:shape --task area:regression:area --suite-option size=64

The table is CSV, Parquet or Arrow (`mtl_models.suites.image_table`); its image column holds
paths relative to the table's folder (or, in Parquet / Arrow, the encoded images themselves).
`--data` may also be a folder `root/CLASS/*.png`: one task `class:classification:class`
unless `--task` says otherwise. Tasks, splits (seeded 70 / 15 / 15), label checks and their
one-line errors are the tabular suite's (`mtl_models.suites.tabular`); a missing, escaping or
unreadable image is a one-line error naming its row, before anything trains.

Images are decoded once per machine into a uint8 cache (`mtl_models.suites.image_cache`) and
read batch by batch from there (`image_split.ImageSplit`). Options (`--suite-option`):

  size=32         every image is resized to size×size (bilinear) when decoded
  crop=size       inputs are crop×crop: a random window in training, the centre one otherwise
  flip=false      training images are flipped left-right at random
  normalize=true  (x - mean) / std per channel, with the training split's statistics
                  (false: pixels in 0..1)

Augmentation is drawn from the training loop's seeded generator, so a policy (which records
these options) re-applies to the same model. The table's SHA-256 (`data_sha256`) and that of
the images' bytes (`images_sha256`) are recorded too: a policy applied after either changed
is refused in one line.
"""
from __future__ import annotations

import os

from spaces.errors import PrunefuseError
from spaces.knobs import coerce_number

from .base import TaskSuite

MAX_SIZE = 4096
FOLDER_TASK = "class:classification:class"


def make_images(*, path: str, tasks: list | None = None, image_column: str = "path", size: int = 32,
                crop: int | None = None, flip: bool = False, normalize: bool = True, seed: int = 0,
                data_sha256: str | None = None, images_sha256: str | None = None) -> TaskSuite:
    from . import image_cache
    from .image_split import ImageSplit, View
    from .image_table import read_table
    from .tabular import check_label_columns, checked_digest, encode_labels, parse_tasks, split_rows

    size = coerce_number("images", "size", size, int, low=2, high=MAX_SIZE)
    crop = size if crop is None else coerce_number("images", "crop", crop, int, low=1, high=size)
    flip, normalize = _flag("flip", flip), _flag("normalize", normalize)
    seed = coerce_number("images", "seed", seed, int, low=0)
    path = os.path.abspath(str(path))
    if not tasks and os.path.isdir(path):
        tasks = [FOLDER_TASK]
    tasks = [tasks] if isinstance(tasks, str) else [str(t) for t in tasks or []]
    parsed = parse_tasks(tasks, "images")
    label_columns = list(dict.fromkeys(c for _, _, cols in parsed for c in cols))
    table = read_table(path, str(image_column), label_columns)
    digest = checked_digest(path, data_sha256, table.digest)
    check_label_columns(table.labels, parsed, taken=(table.column,), taken_as="the image column")
    parts = split_rows(len(table), seed, path)
    suite_tasks, labels = encode_labels(table.labels, parsed, parts["train"])
    store = image_cache.prepare(table, size)  # the one heavy step, after every check
    if images_sha256 is not None and images_sha256 != store.images_sha256:
        raise PrunefuseError(f"the images of {path!r} have changed since the policy was made (sha256 of their "
                             f"bytes {store.images_sha256[:12]}..., the policy expects {str(images_sha256)[:12]}...)")
    stats = store.channel_stats(parts["train"]) if normalize else ((0.0,) * 3, (1.0,) * 3)
    view = View(size=size, crop=crop, flip=flip, mean=stats[0], std=stats[1])
    recipe = (path, table.column, tuple(label_columns), size)
    splits = {k: ImageSplit(store, idx, {n: y[idx] for n, y in labels.items()}, view, augment=(k == "train"),
                            recipe=recipe) for k, idx in parts.items()}
    options = dict(path=path, image_column=table.column, tasks=tasks, size=size, crop=crop, flip=flip,
                   normalize=normalize, seed=seed, data_sha256=digest, images_sha256=store.images_sha256)
    return TaskSuite("images", options, suite_tasks, splits["train"], splits["val"], splits["test"],
                     input_shape=(3, crop, crop))


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise PrunefuseError(f"images {name}={value!r}: expected true or false")
