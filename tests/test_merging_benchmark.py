"""The merging benchmark (benchmarks/merging.py): its datasets, its per-task forward for
AdaMerging, and a smoke run of the whole script."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _benchmark_module(name: str):
    """benchmarks/NAME.py by its path: putting benchmarks/ on sys.path would let its search.py
    shadow the `search` package for every test collected after this one."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mm = _benchmark_module("_merge_models")
mt = _benchmark_module("_merge_tasks")

SIZES = {"train": 24, "val": 12, "test": 12}


def test_each_task_is_its_own_seeded_dataset():
    a, b, other = mt.task_sets(0, SIZES), mt.task_sets(0, SIZES), mt.task_sets(1, SIZES)
    assert list(a) == list(mt.TASKS) and len(a) >= 4
    for task, td in a.items():
        for split in mt.SPLITS:
            torch.testing.assert_close(td.x[split], b[task].x[split])  # same seed, same images
            assert td.x[split].shape == (SIZES[split], 3, mt.SIDE, mt.SIDE)
            assert 0 <= int(td.y[split].min()) and int(td.y[split].max()) < td.classes
        assert not torch.equal(td.x["train"], other[task].x["train"])  # another seed draws others
        # No test image is also a training image, nor another task's.
        flat = {s: td.x[s].flatten(1) for s in mt.SPLITS}
        assert torch.cdist(flat["test"], flat["train"]).min() > 0
    tasks = list(a)
    for i, t in enumerate(tasks):
        for u in tasks[i + 1:]:
            assert torch.cdist(a[t].x["test"].flatten(1), a[u].x["test"].flatten(1)).min() > 0


def test_pretraining_labels_are_generic_not_the_tasks_classes():
    x, labels = mt.pretraining_set(0, 40)
    assert x.shape == (40 * len(mt.TASKS), 3, mt.SIDE, mt.SIDE)
    kinds = labels["kind"]
    assert int(kinds.max()) < 4 * len(mt.TASKS)
    # Each family's attribute names a group of classes, never one class: the pretraining cannot
    # name a downstream class (several classes share every group), yet it sees what sets groups apart.
    for task, classes in mt.CLASSES.items():
        groups = {}
        for c in range(classes):
            groups.setdefault(mt.coarse(task, c), []).append(c)
        assert len(groups) >= 3 and all(len(v) >= 2 for v in groups.values()), (task, groups)
        assert all(0 <= g < 4 for g in groups)


def test_tagged_inputs_give_each_head_its_own_tasks_rows():
    torch.manual_seed(0)
    vit = mm.ViT(embed_dim=32, depth=1, num_heads=2)
    model = mm.build(vit, {"a": 3, "b": 5}, seed=0).eval()
    tagged = mm.with_trunk(model, mm.trunk_state(model), cls=mm.TaggedInputs)
    xa, xb = torch.randn(4, 3, 32, 32), torch.randn(6, 3, 32, 32)
    batch = mm.tag({"a": xa, "b": xb})
    order = [0, 4, 1, 5, 2, 6, 3, 7, 8, 9]  # the tasks' rows interleaved, each task's kept in order
    batch = batch[order]
    with torch.no_grad():
        out = tagged(batch)
        want_a, want_b = model(xa)["a"], model(xb)["b"]
    assert out["a"].shape == (4, 3) and out["b"].shape == (6, 5)
    torch.testing.assert_close(out["a"], want_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"], want_b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_quick_run_prints_the_tables_and_goals():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "merging.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| task_arithmetic |", "| ties |", "| tsv |", "| iso_cts |", "| adamerging (layer-wise) |",
                "| search (TPE over every method) |", "| pretrained trunk (zero-shot) |"):
        assert row in out, out[-3000:]
    assert "after prune + fine-tune" in out and "### Goals" in out


def test_prototype_heads_read_the_features_direction_and_experts_move_only_the_trunk():
    data = mt.task_sets(0, {"train": 60, "val": 12, "test": 12}, tasks=("shapes", "hue"))
    model = mm.build(mm.ViT(embed_dim=32, depth=1, num_heads=2), {t: d.classes for t, d in data.items()}, seed=0)
    mm.prototype_heads(model, data, shots=4, kappa=20.0)
    head = model.heads["hue"]
    assert isinstance(head, mm.PrototypeHead) and head.linear.weight.shape == (data["hue"].classes, 32)
    torch.testing.assert_close(head.linear.weight.norm(dim=1), torch.ones(data["hue"].classes))
    feats = mm.features(model.trunk, data["hue"].x["val"])
    with torch.no_grad():
        torch.testing.assert_close(head(3.0 * feats), head(feats))  # blind to the feature's scale, as CLIP's are
    # Each prototype is its class's mean unit feature: the class's own images score highest on it on average.
    y = data["hue"].y["train"]
    rows = torch.cat([torch.nonzero(y == c).flatten()[:4] for c in range(data["hue"].classes)])
    with torch.no_grad():
        logits = head(mm.features(model.trunk, data["hue"].x["train"][rows]))
    means = torch.stack([logits[y[rows] == c].mean(0) for c in range(data["hue"].classes)])
    assert torch.equal(means.argmax(1), torch.arange(data["hue"].classes))
    trunk = mm.finetune_expert(model, "hue", data["hue"], steps=3, lr=1e-3, batch=8, seed=0)
    assert all(k.startswith("trunk.") for k in trunk)
    assert any(not torch.equal(trunk[k], v) for k, v in mm.trunk_state(model).items())  # the trunk moved
