"""A real Ray cluster on this machine: search across nodes, faults, a dying node, a dying driver.

Every Ray node here is `ray start --block` in its own session, with its own --temp-dir and
its own auth token, so nothing touches another Ray on the machine (never `ray stop`); every
process a test starts is killed by session id when the test (or the module) ends, also on
failure. Faults come from a real plugin suite (tests/plugins/faulty_suite.py), not mocks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.cluster

PLUGIN = "tests.plugins.faulty_suite:make_suite"
# One suite / model / training config for every search here, so the shared artifacts are
# trained once (by the first search, as a Ray task on the cluster) and reused after.
SUITE = ["--suite", PLUGIN, "--suite-option", "raise_at=[0.5]", "--suite-option", "nan_at=[0.75]",
         "--suite-option", "oom_at=[0.9]", "--suite-option", "train_delay=0.3",
         "--model-option", "width=64", "--model-option", "depth=2",
         "--train-option", "epochs=2", "--measure-option", "runs=5"]
# trunk.fc1 at 0.5 raises, at 0.75 gives NaN, at 0.9 runs out of memory (torch.OutOfMemoryError);
# 0.0 / 0.25 work (0.25 sleeps 0.3 s a training step).
FAULT_SPACE = {"pruning": {"importance": "l2", "steps": 1, "sparsity": [0.0, 0.25, 0.5, 0.75, 0.9]},
               "fusion": {"method": "none"}, "finetune": {"epochs": 1}}
SLOW_SPACE = {"pruning": {"importance": "l2", "steps": 1, "sparsity": [0.25]},
              "fusion": {"method": "none"}, "finetune": {"epochs": 2}}     # ~3 s a trial, never fails
TRIALS = 10
PRUNEFUSE = str(Path(sys.executable).parent / "prunefuse")
RAY = str(Path(sys.executable).parent / "ray")


# --- processes: everything started in its own session, killed by session id ---

def _sessions() -> dict[int, list[int]]:
    """session id -> live (non-zombie) pids, from /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, sid = fields[0], int(fields[3])
        if state not in ("Z", "X"):
            out.setdefault(sid, []).append(int(entry))
    return out


def alive_in_session(sid: int) -> list[int]:
    return _sessions().get(sid, [])


def kill_session(sid: int, timeout: float = 20.0) -> list[int]:
    """SIGKILL every process of session `sid` (the process group first); returns any still alive."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.time() + timeout
    while True:
        pids = alive_in_session(sid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids or time.time() > deadline:
            return pids
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Ray nodes on this machine, each `ray start --block` in its own session."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pfray", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_USAGE_STATS_ENABLED="0")
        self.nodes: dict[str, subprocess.Popen] = {}

    def start_node(self, name: str, *, head: bool = False, timeout: float = 90.0) -> subprocess.Popen:
        args = [RAY, "start", "--block", "--num-cpus=1", f"--temp-dir={self.dir / name}", "--disable-usage-stats"]
        args += ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        log = open(self.dir / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.nodes[name] = proc
        deadline = time.time() + timeout
        while "Ray runtime started" not in (self.dir / f"{name}.log").read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{(self.dir / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.3)
        return proc

    def raylet_pid(self, name: str) -> int | None:
        for pid in alive_in_session(self.nodes[name].pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if cmd.endswith(b"raylet/raylet"):
                return pid
        return None

    def kill_node(self, name: str) -> list[int]:
        return kill_session(self.nodes[name].pid)

    def shutdown(self) -> list[int]:
        left = []
        for name, proc in self.nodes.items():
            left += kill_session(proc.pid)
            proc.wait(timeout=10)
        return left

    def leftover_raylets(self) -> list[int]:
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"raylet" in cmd and str(self.dir).encode() in cmd and state not in ("Z", "X"):
                found.append(int(entry))
        return found


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start_node("head", head=True)
        c.start_node("worker")
        yield c
    finally:
        left = c.shutdown()
        raylets = c.leftover_raylets()
        shutil.rmtree(c.dir, ignore_errors=True)
        assert not left and not raylets, f"processes left after the cluster was stopped: {left} {raylets}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    (root / "faults.yaml").write_text(yaml.safe_dump(FAULT_SPACE))
    (root / "slow.yaml").write_text(yaml.safe_dump(SLOW_SPACE))
    return root


def start_cli(*args, env=None, log=None) -> subprocess.Popen:
    """The real console script, from the repository root (the plugin is imported from there),
    in its own session: killing that session is killing the driver and its embedded Ray."""
    return subprocess.Popen([PRUNEFUSE, *map(str, args)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_cli(*args, env=None, timeout=300) -> tuple[int, str]:
    proc = start_cli(*args, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        left = kill_session(proc.pid)  # a driver that exited leaves nothing; one that hung is stopped
    assert not left, f"processes of the CLI's session survived: {left}"
    return proc.returncode, out


def load(exp):
    from reports import load_experiment

    return load_experiment(exp)


def finished_results(exp: Path) -> dict[str, dict]:
    """trial id -> final result, as the storage shows it right now."""
    out = {}
    for f in exp.glob("trial_*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if rows and rows[-1].get("final"):
            out[f.parent.name.removeprefix("trial_")] = rows[-1]
    return out


@pytest.fixture(scope="module")
def fault_search(cluster, workdir):
    """10 trials on the 2-node cluster; the random sampler with seed 1 proposes policies that
    raise, go NaN and run out of memory among them (3, 1 and 1 of them; 5 work)."""
    code, out = run_cli("search", "--address", cluster.address, *SUITE, "--space", workdir / "faults.yaml",
                        "--trials", TRIALS, "--sampler", "random", "--seed", 1, "--storage", workdir / "runs",
                        "--name", "faults", "--no-report", env=cluster.env)
    assert code == 0, out[-4000:]
    return workdir / "runs" / "faults", out


def test_search_runs_on_both_nodes_and_records_failed_trials(fault_search):
    exp, out = fault_search
    assert "connected to Ray at" in out and "2 node(s)" in out, out[-3000:]
    assert "training the dense base model as a Ray task" in out
    df = load(exp)
    assert len(df) == TRIALS
    fc1 = df["policy/pruning/sparsity/trunk.fc1"]
    raised, nan, oom = df[fc1 == 0.5], df[fc1 == 0.75], df[fc1 == 0.9]
    assert len(raised) and len(nan) and len(oom), "seed 1 no longer proposes every fault; pick another seed"
    assert (raised["status"] == "failed").all() and raised["error"].str.contains("injected fault").all()
    assert (nan["status"] == "failed").all() and nan["error"].str.contains("NaN").all()
    # The reason says where: the pruned model's output of a named task (before any fine-tune).
    assert nan["error"].str.contains("pruned in step 1 of 1 outputs .* for task '", regex=True).all(), \
        nan["error"].tolist()
    assert (oom["status"] == "failed").all() and oom["error"].str.contains("OutOfMemoryError").all()
    ok = df[fc1 < 0.5]
    assert (ok["status"] == "finished").all() and len(ok) == TRIALS - len(raised) - len(nan) - len(oom)
    assert ok["node_id"].nunique() == 2, "trials should have run on both nodes"
    assert (ok["device"] == "cpu").all() and ok["score"].notna().all()
    assert "failed: RuntimeError: injected fault" in out  # one line per failed trial, with its reason


def test_study_is_in_sqlite_with_finished_and_failed_trials(fault_search):
    import optuna

    exp, _ = fault_search
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = [t.state for t in study.trials]
    df = load(exp)
    assert states.count(optuna.trial.TrialState.COMPLETE) == (df["status"] == "finished").sum()
    assert states.count(optuna.trial.TrialState.FAIL) == (df["status"] == "failed").sum()
    assert len(study.directions) == 3


def test_report_and_export_work_with_failed_trials(fault_search, tmp_path):
    exp, _ = fault_search
    code, out = run_cli("report", exp, "-o", tmp_path / "report.html")
    assert code == 0, out[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000
    code, out = run_cli("export", exp, "--knee", "-o", tmp_path / "knee.yaml")
    assert code == 0, out[-3000:]
    policy = yaml.safe_load((tmp_path / "knee.yaml").read_text())
    assert policy["pruning"]["sparsity"]["trunk.fc1"] < 0.5  # a finished trial, not a failed one


def test_trials_of_a_dying_node_are_retried_elsewhere(cluster, workdir, fault_search):
    cluster.start_node("victim")
    log = open(workdir / "victim-search.log", "w+")
    proc = start_cli("search", "--address", cluster.address, *SUITE, "--space", workdir / "slow.yaml",
                     "--trials", 6, "--retries", 2, "--storage", workdir / "runs", "--name", "node-death",
                     "--no-report", env=cluster.env, log=log)
    try:
        deadline, busy_since = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            raylet = cluster.raylet_pid("victim")
            busy = raylet and any(_is_training_child(pid, raylet) for pid in alive_in_session(cluster.nodes["victim"].pid))
            busy_since = (busy_since or time.time()) if busy else None
            if busy_since and time.time() - busy_since > 1.0:
                break
            time.sleep(0.2)
        assert busy_since, "no trial ever ran on the third node"
        assert not cluster.kill_node("victim"), "the killed node's processes survived"
        proc.wait(timeout=240)
    finally:
        kill_session(proc.pid)
    log.seek(0)
    out = log.read()
    assert proc.returncode == 0, out[-4000:]
    assert "3 node(s)" in out and "reusing the dense base" in out  # the artifacts of the first search
    assert "failed, retrying" in out, out[-3000:]
    df = load(workdir / "runs" / "node-death")
    assert len(df) == 6 and (df["status"] == "finished").all(), df[["trial_id", "status", "error"]]


def _is_training_child(pid: int, raylet: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    ppid = int(stat[stat.rindex(")") + 2:].split()[1])
    return ppid == raylet and b"ImplicitFunc.train" in cmd


def test_killed_driver_resumes_keeping_finished_trials(workdir):
    """Embedded Ray: SIGKILL the driver's whole session (its Ray dies with it), then resume."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    storage, trials = workdir / "runs", 8
    exp = storage / "killed"
    log = open(workdir / "killed.log", "w+")
    proc = start_cli("search", *SUITE, "--space", workdir / "slow.yaml", "--trials", trials, "--storage", storage,
                     "--name", "killed", "--no-report", env=env, log=log)
    try:
        deadline = time.time() + 240
        while len(finished_results(exp)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        before = finished_results(exp)
        assert len(before) >= 3 and proc.poll() is None, "the search ended before it could be killed"
    finally:
        left = kill_session(proc.pid)
    assert not left, f"the killed driver's Ray survived: {left}"
    assert len(before) < trials, "every trial had finished before the kill"

    # --no-report: the end-of-search report re-times the front, which would overlay latency_ms
    code, out = run_cli("search", "--resume", "killed", "--storage", storage, "--no-report", env=env)
    assert code == 0, out[-4000:]
    assert "started an embedded local Ray" in out and "resuming search 'killed'" in out
    assert "reusing the dense base" in out
    df = load(exp)
    finished = df[df["status"] == "finished"]
    assert len(finished) == trials and len(df) == trials, df[["trial_id", "status"]]
    for trial_id, result in before.items():
        row = df[df["trial_id"] == trial_id]
        assert len(row) == 1, f"trial {trial_id} finished before the kill and is gone"
        for key in ("score", "params", "latency_ms", "node_id"):
            assert row.iloc[0][key] == result[key], (trial_id, key)

    import optuna

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{exp / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == trials
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.slow
def test_a_cluster_that_goes_away_ends_in_one_line_and_resumes_keeping_what_finished(workdir):
    """The whole cluster killed mid-search: the driver says so in one last line (what is kept,
    how to resume) within seconds, not Ray's messages after minutes; --resume on another
    cluster keeps every trial that had finished and runs the rest."""
    gone, storage, exp = Cluster(), workdir / "runs", workdir / "runs" / "vanish"
    log = open(workdir / "vanish.log", "w+")
    try:
        gone.start_node("head", head=True)
        gone.start_node("worker")
        proc = start_cli("search", "--address", "auto", *SUITE, "--space", workdir / "slow.yaml", "--trials", 8,
                         "--storage", storage, "--name", "vanish", "--no-report", log=log,
                         env={**gone.env, "RAY_ADDRESS": gone.address, "PRUNEFUSE_CLUSTER_LOST_S": "5"})
        try:
            deadline = time.time() + 300
            while len(list(exp.glob("trial_*/final.json"))) < 2 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert proc.poll() is None, "the search ended before its cluster could go away"
            assert not gone.shutdown(), "the cluster's processes survived"
            killed_at = time.time()
            proc.wait(timeout=120)
            took = time.time() - killed_at
        finally:
            kill_session(proc.pid)
    finally:
        gone.shutdown()
        shutil.rmtree(gone.dir, ignore_errors=True)
    log.seek(0)
    out = log.read()
    # which cluster "auto" joined, before anything trained
    said = f":{gone.port} (--address auto): 2 node(s), 2 CPUs, 0 GPUs"   # the head's IP, as Ray names it
    assert said in out, out[:3000]
    joined = out.index(said)
    assert joined < out.index("training the dense base"), out[:2000]
    last = out.strip().splitlines()[-1]
    assert proc.returncode == 3 and took < 60, (proc.returncode, took, out[-3000:])
    assert last.startswith("prunefuse: error: the Ray cluster at ") and "went away" in last, out[-3000:]
    assert "prunefuse search --resume vanish" in last and "--address auto" in last and "are kept" in last
    assert "Traceback" not in out
    kept = {f.parent.name.removeprefix("trial_"): json.loads(f.read_text()) for f in exp.glob("trial_*/final.json")}
    assert f"the {len(kept)} trial(s) that finished are kept" in last and len(kept) >= 2

    again = Cluster()
    try:
        again.start_node("head", head=True)
        code, out = run_cli("search", "--resume", "vanish", "--storage", storage, "--address", again.address,
                            "--no-report", env=again.env)
    finally:
        again.shutdown()
        shutil.rmtree(again.dir, ignore_errors=True)
    assert code == 0, out[-4000:]
    df = load(exp)
    assert len(df) == 8 and (df["status"] == "finished").all(), df[["trial_id", "status", "error"]]
    for trial_id, final in kept.items():
        assert df.loc[df["trial_id"] == trial_id, "params"].item() == final["params"]
