"""`apply -o EXISTING` replaces a saved model atomically: a process SIGKILLed at any moment of
`checkpoint.save` leaves the old or the new model at the path, and the next run tidies up."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, run_cli

# Saves the model twice (the second replaces the first), SIGKILLing itself just before its
# K-th filesystem step (a write's fsync, a rename, an exchange, a removal): every point a
# real kill could land between two steps.
SAVER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from mtl_models.models import checkpoint
    from mtl_models import suites
    from spaces import Policy
    suite = suites.get("multidigits", train_pairs=50, val_pairs=20, test_pairs=20)
    model = suite.build_model(trunk="mlp", width=32, depth=2)
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": {"name": suite.name, **suite.options},
                               "model": {"trunk": "mlp", "width": 32, "depth": 2}})
    checkpoint.save(model, policy, {"i": 0}, sys.argv[1])
    kill_at, steps = int(sys.argv[2]), [0]

    def step(fn):
        def run(*args, **kwargs):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return run

    os.fsync, shutil.rmtree, Path.rename = step(os.fsync), step(shutil.rmtree), step(Path.rename)
    checkpoint._exchange = step(checkpoint._exchange)
    checkpoint.save(model, policy, {"i": 1}, sys.argv[1])
    print("steps", steps[0])
""")


def _complete(folder) -> bool:
    names = {p.name for p in folder.iterdir()}
    if names != {"model.pt", "policy.yaml", "metrics.json"}:
        return False
    torch.load(folder / "model.pt", weights_only=True)
    return isinstance(json.loads((folder / "metrics.json").read_text())["i"], int)


@pytest.mark.slow  # a fresh interpreter per kill point (~7 of them)
def test_a_killed_save_leaves_the_old_or_the_new_model(tmp_path):
    from mtl_models.models import checkpoint

    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    out = tmp_path / "model"
    seen = set()
    for kill_at in range(1, 8):
        proc = subprocess.run([sys.executable, str(script), str(out), str(kill_at), str(ROOT)],
                              capture_output=True, text=True, timeout=120)
        assert out.is_dir() and _complete(out), f"killed before step {kill_at}: no complete model at the path"
        seen.add(json.loads((out / "metrics.json").read_text())["i"])
        checkpoint.check_target(out)  # what the next run does first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "saver.py"], f"step {kill_at}: leftovers"
        if proc.returncode == 0:  # past the last step: the save ran through
            assert "steps" in proc.stdout and json.loads((out / "metrics.json").read_text())["i"] == 1
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        shutil.rmtree(out)
    else:
        raise AssertionError("the save never ran through: more steps than expected")
    assert seen == {0, 1}  # kills before the swap kept the old model, after it the new one


def test_the_next_apply_restores_a_model_left_aside(tmp_path, tiny_suite):
    """Where two renames were needed (no atomic exchange), a kill between them leaves the old
    model aside as .model.old: the next `apply` puts it back (here one that then stops on a
    policy that does not fit, before any training) and removes the leftovers."""
    from mtl_models.models import checkpoint
    from spaces import Policy

    model = tiny_suite.build_model(trunk="mlp", width=32, depth=2)
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": {"name": tiny_suite.name, **tiny_suite.options},
                               "model": {"trunk": "mlp", "width": 32, "depth": 2}})
    checkpoint.save(model, policy, {"i": 1}, tmp_path / "model")
    (tmp_path / "model").rename(tmp_path / ".model.old")          # killed between the renames
    (tmp_path / ".model.abc123").mkdir()                           # and a staging folder half written
    (tmp_path / ".model.abc123" / "model.pt").write_bytes(b"half")
    bad = policy.to_dict()
    bad["pruning"] = {"sparsity": {"trunk.nope": 0.5}}
    Policy.from_dict(bad).to_yaml(tmp_path / "bad.yaml")
    code, out, err = run_cli("apply", tmp_path / "bad.yaml", "-o", tmp_path / "model", cwd=tmp_path)
    assert code == 2 and "trunk.nope" in err and len(err.strip().splitlines()) == 1, err
    assert _complete(tmp_path / "model") and json.loads((tmp_path / "model" / "metrics.json").read_text())["i"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "model"]
