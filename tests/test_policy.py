import pathlib
import subprocess
import sys

import pytest

from spaces import Policy, PrunefuseError


def _data(**changes):
    data = {"schema": "prunefuse.policy/1", "suite": {"name": "multidigits", "seed": 0},
            "model": {"trunk": "mlp", "width": 64},
            "weighting": {"method": "static", "weights": {"left": 0.5, "right": 0.3, "sum": 0.2}},
            "fusion": {"method": "ties", "coefficients": {"left": 0.9, "right": 0.7, "sum": 0.4},
                       "params": {"density": 0.2}},
            "pruning": {"mode": "structured", "importance": "multitask_taylor", "steps": 3,
                        "sparsity": {"trunk.fc1": 0.25, "trunk.fc2": 0.6}},
            "finetune": {"epochs": 2, "lr": 0.001}, "seed": 3}
    data.update(changes)
    return data


def test_yaml_round_trip_is_exact(tmp_path):
    p = Policy.from_dict(_data())
    text = p.to_yaml(tmp_path / "p.yaml")
    assert text.splitlines()[0] == "schema: prunefuse.policy/1"
    q = Policy.from_yaml(tmp_path / "p.yaml")
    assert q == p
    assert q.to_yaml() == text


def test_policy_is_frozen():
    p = Policy.from_dict(_data())
    with pytest.raises(Exception):
        p.seed = 4


@pytest.mark.parametrize("change, words", [
    ({"prunning": {}}, "prunning: unknown key"),
    ({"pruning": {"sparsity": {"trunk.fc1": 1.2}}}, "sparsity of trunk.fc1 is 1.2"),
    ({"pruning": {"steps": 0}}, "pruning.steps"),
    ({"finetune": {"lr": -1}}, "finetune.lr"),
    ({"weighting": {"method": "static", "weights": {"left": -1}}}, "weights.left: Input should be greater than or equal to 0"),
    ({"schema": "prunefuse.policy/9"}, "expected 'prunefuse.policy/1'"),
    ({"model": {"width": 3}}, "model needs a 'trunk'"),
    ({"pruning": {"mode": "unstructured", "round_to": 8}}, "round_to=8 rounds kept channels; it needs mode 'structured'"),
    ({"pruning": {"round_to": 0}}, "pruning.round_to"),
])
def test_bad_policies_name_the_problem(change, words):
    with pytest.raises(PrunefuseError, match=words.replace("(", r"\(").replace(".", r"\.")) as info:
        Policy.from_dict(_data(**change), source="p.yaml")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("p.yaml")


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: prunefuse.policy/1\nsuite: {name: multidigits\n")
    with pytest.raises(PrunefuseError, match="malformed YAML at line"):
        Policy.from_yaml(bad)
    with pytest.raises(PrunefuseError, match="not found"):
        Policy.from_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PrunefuseError, match="expected a mapping"):
        Policy.from_yaml(tmp_path / "list.yaml")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """The write that could break atomicity is the rename over the old file: it fails here,
    after the new text was written beside it, and the old file and folder stay as they were."""
    import os

    target = tmp_path / "p.yaml"
    target.write_text("old")
    written = []

    def explode(src, dst):
        written.append(pathlib.Path(src).read_text())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(OSError):
        Policy.from_dict(_data()).to_yaml(target)
    assert written and "schema: prunefuse.policy/1" in written[0]  # it failed at the rename, not before
    assert target.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["p.yaml"]


def test_spaces_imports_neither_torch_nor_ray():
    code = "import sys, spaces, reports.pareto; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
