"""A real head node with token authentication refuses a driver without its token: one line says why.

The head is `ray start --block` in its own session with its own temp dir and token (see
test_cluster.Cluster), on a free loopback port; the driver runs with a clean HOME and no
RAY_* variables, as on a fresh machine, and is killed with the head when the test ends.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from test_cluster import PRUNEFUSE, ROOT, Cluster

pytestmark = pytest.mark.cluster

SMALL = ["--suite-option", "train_pairs=300", "--suite-option", "val_pairs=100", "--suite-option", "test_pairs=100",
         "--trials", "1"]


@pytest.fixture(scope="module")
def token_head():
    c = Cluster()
    try:
        c.start_node("head", head=True)
        yield c
    finally:
        left = c.shutdown()
        shutil.rmtree(c.dir, ignore_errors=True)
        assert not left and not c.leftover_raylets()


def _driver_env(home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@pytest.mark.parametrize("token, says", [(None, "this driver has no token"),
                                         ("wrong", "is not the head's")])
def test_a_driver_refused_for_auth_gets_one_line(token_head, tmp_path, token, says):
    env = _driver_env(tmp_path / "home")
    if token:
        env["RAY_AUTH_TOKEN"] = uuid.uuid4().hex
    (tmp_path / "home").mkdir()
    proc = subprocess.run([PRUNEFUSE, "search", "--address", token_head.address, "--storage", str(tmp_path / "runs"),
                           *SMALL], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    code, err = proc.returncode, proc.stderr
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "refused this driver" in lines[0] and "token authentication" in lines[0] and says in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written before the connection
