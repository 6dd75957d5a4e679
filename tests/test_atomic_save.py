"""`apply -o EXISTING` replaces a saved model atomically: a process SIGKILLed at any moment of
`checkpoint.save` leaves the old or the new model at the path, and the next run tidies up."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import torch

from conftest import ROOT, run_cli

SAVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from mtl_models import checkpoint, suites
    from spaces import Policy
    suite = suites.get("multidigits", train_pairs=50, val_pairs=20, test_pairs=20)
    model = suite.build_model(trunk="mlp", width=32, depth=2)
    policy = Policy.from_dict({"schema": "prunefuse.policy/1", "suite": {"name": suite.name, **suite.options}, "model": {"trunk": "mlp", "width": 32, "depth": 2}})
    i = 0
    while True:
        checkpoint.save(model, policy, {"i": i}, sys.argv[1])
        print(i, flush=True)
        i += 1
""")


def _complete(folder) -> bool:
    names = {p.name for p in folder.iterdir()}
    if names != {"model.pt", "policy.yaml", "metrics.json"}:
        return False
    torch.load(folder / "model.pt", weights_only=True)
    return isinstance(json.loads((folder / "metrics.json").read_text())["i"], int)


def test_a_killed_save_leaves_the_old_or_the_new_model(tmp_path):
    from mtl_models import checkpoint

    out = tmp_path / "model"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random(0)
    for round_ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(ROOT)], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        if round_ == 0:
            proc.stdout.readline()  # the first save completes: every later kill replaces a model
        else:
            time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert out.is_dir() and _complete(out), f"round {round_}: no complete model at the path"
        checkpoint.check_target(out)  # what the next run does first
        leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("model", "saver.py")]
        assert not leftovers, leftovers


def test_the_next_apply_restores_a_model_left_aside(tmp_path, tiny_suite):
    """Where two renames were needed (no atomic exchange), a kill between them leaves the old
    model aside as .model.old: the next `apply` puts it back (here one that then stops on a
    policy that does not fit, before any training) and removes the leftovers."""
    from mtl_models import checkpoint
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
