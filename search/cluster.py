"""Connecting to Ray: an embedded local instance, or an existing cluster by address.

Workers need prunefuse's code. Against a cluster it travels through Ray's runtime_env: this
source tree as `working_dir` (minus .venv, runs, data and what .gitignore lists), and a
plugin suite's top-level module from the folder the search runs in as `py_modules`. Where
prunefuse is installed on every node (`pip install prunefuse` in the nodes' image), set
PRUNEFUSE_INSTALLED=1 and nothing is uploaded; an installed (non-source) copy never
uploads itself. Third-party packages (torch, ray, ...) must be installed on the nodes.
"""
from __future__ import annotations

import os
from pathlib import Path

from spaces.errors import PrunefuseError
from spaces.vocabulary import PLUGIN_PATH_ENV

# What workers never need from the project folder when code ships through runtime_env.
RUNTIME_EXCLUDES = [".venv", ".venv/**", "runs", "runs/**", ".git", "**/__pycache__", "*.db", "data", "*.parquet",
                    "*.csv", ".hypothesis", ".pytest_cache", "*.egg-info", "test-artifacts", "build", "*.pt"]


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def ships_source() -> bool:
    """True when workers get this source tree through runtime_env (a source checkout, not an install)."""
    return os.environ.get("PRUNEFUSE_INSTALLED") != "1" and (project_root() / "pyproject.toml").is_file()


def plugin_module_path(suite_name: str | None, cwd: str | None = None) -> str | None:
    """The folder or .py file of a `package.module:function` suite's top-level module when it lives
    in `cwd` but outside the shipped source tree (so it must travel as a py_module)."""
    if not suite_name or ":" not in suite_name:
        return None
    top = suite_name.partition(":")[0].split(".")[0]
    base = Path(cwd or os.getcwd()).resolve()
    for candidate in (base / top, base / f"{top}.py"):
        if candidate.exists():
            if ships_source() and candidate.resolve().is_relative_to(project_root()):
                return None  # inside working_dir already
            return str(candidate)
    return None


def runtime_env_for(address: str | None, suite_name: str | None = None) -> dict:
    """What Ray needs to run a trial on any node."""
    env: dict = {"env_vars": {PLUGIN_PATH_ENV: os.getcwd()}}
    if address is None:
        return env  # embedded: workers run on this machine with this interpreter and folder
    if ships_source():
        env["working_dir"] = str(project_root())
        env["excludes"] = list(RUNTIME_EXCLUDES)
    plugin = plugin_module_path(suite_name)
    if plugin:
        env["py_modules"] = [plugin]
    return env


# What Ray's native client logs (to the process's stderr, not in the exception it raises) when
# the head refuses a driver's token: ray.init itself only says "Failed to connect".
AUTH_REFUSALS = ("InvalidAuthToken", "Unauthenticated")


def auth_refused(address: str, *, missing: bool) -> str:
    """One line: why the head refused this driver, and what fixes it (README: Running on a Ray cluster)."""
    have = ("this driver has no token" if missing else
            "this driver's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not the head's")
    return (f"the Ray cluster at {address} refused this driver: it uses token authentication and {have}; "
            f"give the driver the head's token (RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) from the head, "
            f"with RAY_AUTH_MODE=token), or start every node with RAY_AUTH_MODE=disabled on a trusted network")


class _native_stderr_kept:
    """Copies what native code writes to file descriptor 2 while the block runs (and still
    passes it on afterwards), so a refusal that Ray only logs can be recognised."""

    def __enter__(self):
        import sys
        import tempfile

        self.text = ""
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        self.text = data.decode(errors="replace")
        if exc[0] is None and data:
            os.write(2, data)  # connected: whatever Ray said goes where it would have gone
        return False


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def connect(address: str | None, *, num_cpus: int | None = None, suite_name: str | None = None, log=print) -> None:
    """Start an embedded Ray (address None) or join the cluster at `address` ("auto" or HOST:PORT)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Trials import plugin suites from the folder the search was started in.
    os.environ[PLUGIN_PATH_ENV] = os.getcwd()
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR",
                  runtime_env=runtime_env_for(address, suite_name))
    if address is None:
        # "local": always a fresh instance of our own, never someone's `ray start` cluster on this
        # machine (ray.init() without an address would join the latest one, or RAY_ADDRESS).
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
        log(f"started an embedded local Ray with {int(ray.cluster_resources().get('CPU', 0))} CPUs")
        return
    if address != "auto":
        _check_reachable(address)
    if address != "auto" and _token_available():
        # Ray >= 2.5x clusters use token auth; a driver given an explicit address must say so.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.exceptions import AuthenticationError

    try:
        with _native_stderr_kept() as native:
            ray.init(address=address, **kwargs)
    except AuthenticationError:
        raise PrunefuseError(auth_refused(address, missing=True)) from None
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        if any(word in native.text for word in AUTH_REFUSALS):
            raise PrunefuseError(auth_refused(address, missing=not _token_available())) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunefuseError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    how = "installed package" if "working_dir" not in kwargs["runtime_env"] else f"working_dir {project_root()}"
    joined = gcs_address()  # what "auto" (or a name) resolved to: the cluster actually joined
    given = "" if joined == address else f" (--address {address})"
    log(f"connected to Ray at {joined}{given}: {len(nodes)} node(s), "
        f"{int(ray.cluster_resources().get('CPU', 0))} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
        f"code via {how}")


def gcs_address() -> str:
    """HOST:PORT of the head this driver is connected to."""
    import ray

    return ray.get_runtime_context().gcs_address


# How long the head may be unreachable before the search says the cluster went away (Ray's
# own driver retries for minutes and then ends in its own messages, without a word on what
# was kept). A restarting head within this time is not lost.
CLUSTER_LOST_S = float(os.environ.get("PRUNEFUSE_CLUSTER_LOST_S", "15"))


class cluster_watch:
    """While the block runs, check every second that the head's GCS port still answers; when it
    has not for CLUSTER_LOST_S, print `lost_line()` as the search's last line and end the
    process (exit code 3): the driver cannot go on, and Ray's shutdown would wait on the dead
    head. Everything a trial finished is on disk already (final.json), so --resume keeps it."""

    def __init__(self, address: str | None, lost_line):
        self.address, self.lost_line = address, lost_line

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        if self.address is not None:
            self._thread = threading.Thread(target=self._watch, args=(gcs_address(),), daemon=True,
                                            name="prunefuse-cluster-watch")
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        return False

    def _watch(self, gcs: str) -> None:
        import sys
        import time

        host, _, port = gcs.rpartition(":")
        last_seen = time.monotonic()
        while not self._stop.wait(1.0):
            if _answers(host, int(port)):
                last_seen = time.monotonic()
            elif time.monotonic() - last_seen > CLUSTER_LOST_S and not self._stop.is_set():
                sys.stdout.flush()
                print(f"prunefuse: error: {self.lost_line(gcs)}", file=sys.stderr, flush=True)
                os._exit(3)


def _answers(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def check_fits(address: str | None, cpus: float, gpus: float, log=print) -> None:
    """A trial asking for more than any node has would wait forever: say so now. An error on an
    embedded Ray; on a cluster a warning (an autoscaler may still add such a node)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        return
    biggest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    message = (f"no node can run a trial: each asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), the largest node has "
               f"{biggest.get('CPU', 0):g} CPU(s) and {biggest.get('GPU', 0):g} GPU(s); lower --cpus-per-trial / "
               f"--gpus-per-trial")
    if address is None:
        raise PrunefuseError(message)
    log(f"warning: {message} (or let the cluster's autoscaler add such a node)")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, where Ray itself would retry for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PrunefuseError(f"--address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise PrunefuseError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); is a head node "
                             f"started there (`ray start --head --port={port}`)?") from None


def ray_map(fn, items, *, num_cpus: float = 1, num_gpus: float = 0):
    """map(fn, items) as parallel Ray tasks with the trials' resources."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(_call)
    threads = max(1, int(num_cpus))
    return ray.get([remote.remote(fn, item, threads) for item in items])


def _call(fn, item, threads: int = 1):
    import torch

    torch.set_num_threads(threads)
    return fn(item)
