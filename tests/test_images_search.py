"""An image folder end to end with augmentation: search → knee policy → apply rebuilds the
trial's model exactly (the random crops and flips of every fine-tune are drawn from the
policy's seed, so the same batches come back)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from test_images import write_images

SPACE = ("fusion: {method: none}\npruning: {importance: taylor, sparsity: {low: 0.0, high: 0.8}}\n"
         "finetune: {epochs: 1, batch_size: 16}\n")


@pytest.mark.slow
def test_image_folder_search_with_augmentation_reapplies_exactly(tmp_path):
    from spaces import Policy

    write_images(tmp_path / "shapes", 90, layout="folder")
    (tmp_path / "space.yaml").write_text(SPACE)
    storage, exp = tmp_path / "runs", tmp_path / "runs" / "img"
    env = {"PRUNEFUSE_DATA_CACHE": str(tmp_path / "cache")}
    code, out, err = run_cli("search", "--suite", "images", "--data", tmp_path / "shapes",
                             "--suite-option", "size=12", "--suite-option", "crop=10", "--suite-option", "flip=true",
                             "--trunk", "cnn", "--model-option", "channels=[4,8]", "--model-option", "fc=16",
                             "--train-option", "epochs=3", "--train-option", "batch_size=16", "--trials", "4",
                             "--cpus-per-trial", "1", "--space", tmp_path / "space.yaml", "--storage", storage,
                             "--name", "img", env=env, timeout=1200)
    assert code == 0, err[-3000:]
    policy = Policy.from_yaml(exp / "policy.yaml")
    assert policy.suite["name"] == "images" and policy.suite["crop"] == 10 and policy.suite["flip"] is True
    assert policy.suite["images_sha256"] and policy.suite["data_sha256"]
    assert len(list((tmp_path / "cache").glob("*/images.npy"))) == 1  # decoded once for every trial
    code, out, err = run_cli("apply", exp / "policy.yaml", "-o", tmp_path / "model", "--cache", storage / "_artifacts",
                             env=env, timeout=600)
    assert code == 0, err[-3000:]
    applied = json.loads((tmp_path / "model" / "metrics.json").read_text())
    measured = policy.provenance["metrics"]
    for key in ("score", "metric/class", "test/class", "params", "macs"):
        assert applied[key] == pytest.approx(measured[key], abs=1e-9), key
