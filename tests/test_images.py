"""The images suite: image files listed in a table (CSV / Parquet / Arrow) or sorted into
class folders, decoded once into the node's cache, read in batches with their transforms;
and every way a user can hand it bad input, each one line naming what to fix."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from spaces.errors import PrunefuseError

TASKS = ["shape:classification:shape", "bright:regression:bright"]


def write_images(folder: Path, n: int, *, seed: int = 0, layout: str = "table") -> None:
    """n RGB PNGs of varied sizes whose dominant channel is the class; a labels.csv beside them
    (layout "table"), or one sub-folder per class (layout "folder")."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = ["path,shape,bright"]
    for i in range(n):
        cls = i % 3
        a = (rng.random((14 + i % 5, 12 + i % 7, 3)) * 90).astype(np.uint8)
        a[..., cls] += 120
        rel = f"img/{i:03d}.png" if layout == "table" else f"{'abc'[cls]}/{i:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / rel)
        rows.append(f"{rel},{'abc'[cls]},{a.mean():.3f}")
    if layout == "table":
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A decoded-image cache of this module's own (the env is what every process reads)."""
    from mtl_models.suites.image_cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("image-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(CACHE_ENV)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="module")
def table(tmp_path_factory, cache):
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 60)
    return folder


def images(path, **options):
    from mtl_models import suites

    return suites.get("images", path=str(path), **{"tasks": TASKS, "size": 8, **options})


def all_rows(split):
    from mtl_models.suites.reading import first_rows

    return first_rows(split, len(split))


def test_table_suite_reads_decodes_and_splits_like_tabular(table, cache):
    from PIL import Image

    from mtl_models.suites.tabular import split_rows

    s = images(table / "labels.csv")
    assert s.input_shape == (3, 8, 8) and [t.name for t in s.tasks] == ["shape", "bright"]
    assert s.tasks[0].num_outputs == 3 and s.tasks[1].metric == "r2"
    parts = split_rows(60, 0, "")
    assert len(s.train) == len(parts["train"]) == 42 and len(s.val) == len(s.test) == 9
    # Row positions of each split are the tabular suite's, so labels follow the same rows.
    assert np.array_equal(s.val.positions, parts["val"])
    assert s.val.y["shape"].tolist() == [i % 3 for i in parts["val"]]
    # The stored pixels are Pillow's bilinear resize of the file, channels first.
    row = int(parts["val"][0])
    want = np.asarray(Image.open(table / f"img/{row:03d}.png").convert("RGB").resize((8, 8), Image.BILINEAR))
    assert np.array_equal(s.val.store.read(np.array([row]))[0], want.transpose(2, 0, 1))
    # Normalised by the training split's channel statistics.
    x, _ = all_rows(s.train)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.02
    spec = s.spec
    assert spec["data_sha256"] and spec["images_sha256"] and spec["size"] == 8 and spec["crop"] == 8
    # Built from its spec again: the decoded cache is reused, not rebuilt.
    stamp = (Path(s.train.store.folder) / "images.npy").stat().st_mtime_ns
    again = images(table / "labels.csv")
    assert again.train.store.folder == s.train.store.folder
    assert (Path(s.train.store.folder) / "images.npy").stat().st_mtime_ns == stamp
    torch.testing.assert_close(all_rows(again.test)[0], all_rows(s.test)[0])
    assert len(list(cache.glob("*/images.npy"))) == 1
    other = images(table / "labels.csv", seed=1)
    assert not np.array_equal(other.val.positions, s.val.positions)


def test_parquet_arrow_and_bytes_tables_give_the_same_images(table, tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.feather as feather

    df = pd.read_csv(table / "labels.csv")
    df.to_parquet(table / "labels.parquet")
    feather.write_feather(df, table / "labels.arrow")
    csv = images(table / "labels.csv")
    for name in ("labels.parquet", "labels.arrow"):
        s = images(table / name)
        torch.testing.assert_close(all_rows(s.val)[0], all_rows(csv.val)[0])
    # The images themselves in a Parquet column of bytes, streamed while decoding.
    blobs = [(table / p).read_bytes() for p in df["path"]]
    pa_table = pa.table({"png": pa.array(blobs, pa.binary()), "shape": df["shape"], "bright": df["bright"]})
    import pyarrow.parquet as pq

    pq.write_table(pa_table, tmp_path / "inline.parquet", row_group_size=16)
    inline = images(tmp_path / "inline.parquet", image_column="png")
    torch.testing.assert_close(all_rows(inline.val)[0], all_rows(csv.val)[0])
    assert inline.spec["images_sha256"] == csv.spec["images_sha256"]  # the same bytes


def test_class_folder_layout(tmp_path, cache):
    write_images(tmp_path / "root", 30, layout="folder")
    s = images(tmp_path / "root", tasks=None)
    assert [t.name for t in s.tasks] == ["class"] and s.tasks[0].num_outputs == 3
    assert s.spec["tasks"] == ["class:classification:class"]
    labels = torch.cat([s.split(k).y["class"] for k in ("train", "val", "test")])
    assert sorted(labels.tolist()) == sorted([0, 1, 2] * 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunefuseError, match="no CLASS/"):
        images(tmp_path / "empty", tasks=None)


def test_training_augments_from_the_seed_and_evaluation_does_not(table):
    from mtl_models.suites.reading import read, shuffled

    s = images(table / "labels.csv", size=10, crop=6, flip=True)
    assert s.input_shape == (3, 6, 6)

    def first_batch(seed):
        gen = torch.Generator().manual_seed(seed)
        return next(read(s.train, shuffled(s.train, batch_size=8, steps=1, generator=gen)))

    (rows_a, xa, _), (rows_b, xb, _), (rows_c, xc, _) = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(rows_a, rows_b) and torch.equal(xa, xb)
    assert not torch.equal(xc, xa)
    # An augmented row is one of the row's windows, possibly flipped; evaluation takes the centre.
    stored = torch.from_numpy(s.train.store.read(s.train.positions[rows_a.numpy()])).float() / 255
    mean, std = torch.tensor(s.train.view.mean).view(3, 1, 1), torch.tensor(s.train.view.std).view(3, 1, 1)
    for img, got in zip(stored, xa):
        windows = [(img[:, t:t + 6, l:l + 6] - mean) / std for t in range(5) for l in range(5)]
        assert any(torch.allclose(got, w, atol=1e-5) or torch.allclose(got, w.flip(-1), atol=1e-5) for w in windows)
    x1, _ = all_rows(s.val)
    x2, _ = all_rows(s.val)
    assert torch.equal(x1, x2)
    centre = torch.from_numpy(s.val.store.read(s.val.positions[:1])).float()[0, :, 2:8, 2:8] / 255
    torch.testing.assert_close(x1[0], (centre - mean) / std)


def test_loader_workers_change_nothing(table, monkeypatch):
    """The same seed trains the same model whether batches are read here or by loader workers."""
    from mtl_models.suites.reading import WORKERS_ENV
    from mtl_models.training.train import TrainOptions, evaluate, train

    s = images(table / "labels.csv", size=10, crop=8, flip=True)

    def trained(workers):
        monkeypatch.setenv(WORKERS_ENV, str(workers))
        torch.manual_seed(0)
        model = s.build_model(trunk="cnn", channels=[4, 8], fc=16)
        history = train(model, s, TrainOptions(epochs=2, lr=3e-3, batch_size=16, seed=5))
        return history, model.state_dict(), evaluate(model, s, "val")

    h0, w0, m0 = trained(0)
    h2, w2, m2 = trained(2)
    assert h0 == h2 and m0 == m2
    for k in w0:
        torch.testing.assert_close(w0[k], w2[k], rtol=0, atol=0)


@pytest.mark.parametrize("row, make, words", [
    (7, lambda d: os.remove(d / "img/007.png"), ["row 7", "img/007.png", "not found"]),
    (3, lambda d: (d / "img/003.png").write_bytes(b"not a png"), ["row 3", "cannot be read"]),
])
def test_a_bad_image_names_its_row(tmp_path, cache, row, make, words):
    write_images(tmp_path, 30)
    make(tmp_path)
    with pytest.raises(PrunefuseError) as err:
        images(tmp_path / "labels.csv")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not list(cache.glob("*.tmp-*"))  # a failed decode leaves nothing behind


def test_paths_that_leave_the_folder_are_refused(tmp_path, cache):
    write_images(tmp_path / "t", 24)
    (tmp_path / "outside.png").write_bytes((tmp_path / "t/img/000.png").read_bytes())
    lines = (tmp_path / "t/labels.csv").read_text().splitlines()
    for bad, words in (("../outside.png", ["row 5", "outside the table's folder"]),
                       (str(tmp_path / "outside.png"), ["row 5", "absolute path"]),
                       ("img/link.png", ["row 5", "outside the table's folder"])):
        os.symlink(tmp_path / "outside.png", tmp_path / "t/img/link.png") if bad == "img/link.png" else None
        edited = lines[:6] + [bad + "," + lines[6].split(",", 1)[1]] + lines[7:]
        (tmp_path / "t/labels.csv").write_text("\n".join(edited) + "\n")
        with pytest.raises(PrunefuseError) as err:
            images(tmp_path / "t/labels.csv")
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("options, words", [
    ({"size": 0}, ["size=0", "out of range"]),
    ({"size": "big"}, ["size='big'", "whole number"]),
    ({"size": 8, "crop": 9}, ["crop=9", "out of range"]),
    ({"flip": "sometimes"}, ["flip='sometimes'", "true or false"]),
    ({"image_column": "file"}, ["image column 'file' does not exist", "path, shape, bright"]),
    ({"tasks": ["shape:classification:colour"]}, ["label (task 'shape') column 'colour' does not exist"]),
    ({"tasks": ["x:classification:path"]}, ["'path' is both"]),
    ({"tasks": []}, ["--suite images needs at least one --task"]),
])
def test_bad_options_fail_in_one_line(table, options, words):
    with pytest.raises(PrunefuseError) as err:
        images(table / "labels.csv", **options)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_a_changed_table_or_image_is_refused_by_its_spec(tmp_path, cache):
    from mtl_models import suites

    write_images(tmp_path, 24)
    spec = images(tmp_path / "labels.csv").spec
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "img/004.png")).copy()
    img[0, 0] ^= 255
    Image.fromarray(img).save(tmp_path / "img/004.png")
    with pytest.raises(PrunefuseError, match="images of .* have changed since the policy was made"):
        suites.from_spec(spec)
    with open(tmp_path / "labels.csv", "a") as f:
        f.write("img/000.png,a,1.0\n")
    with pytest.raises(PrunefuseError, match="labels.csv' has changed since the policy was made"):
        suites.from_spec(spec)


def test_cli_refuses_bad_image_arguments_in_one_line(table, tmp_path, capsys):
    from test_byo import assert_one_line_error, cli_main

    base = ["search", "--storage", tmp_path, "--trials", "1"]
    cases = [
        (["--suite", "images"], ["--suite images needs --data"]),
        (["--suite", "images", "--data", table / "labels.csv", "--features", "a"], ["--features belongs"]),
        (["--suite", "multidigits", "--image-column", "p"], ["--image-column belongs to --suite images"]),
        (["--suite", "images", "--data", table / "labels.csv", "--task", "shape:classification:shape",
          "--suite-option", "size=-3"], ["size=-3"]),
        (["--suite", "images", "--data", table / "nope.csv", "--task", "shape:classification:shape"], ["not found"]),
    ]
    for args, words in cases:
        code, _, err = cli_main(capsys, *base, *args)
        assert_one_line_error(code, err, *words)
    assert not any(tmp_path.iterdir())
