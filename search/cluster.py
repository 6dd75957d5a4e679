"""Connecting to Ray: an embedded local instance, or an existing cluster by address."""
from __future__ import annotations

import os
from pathlib import Path

# What workers never need from the project folder when code ships through runtime_env.
RUNTIME_EXCLUDES = [".venv", ".venv/**", "runs", "runs/**", ".git", "**/__pycache__", "*.db", "data", "*.parquet", "*.csv"]


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def connect(address: str | None, *, num_cpus: int | None = None, log=print) -> None:
    """Start or join Ray. With an address, ship this project's code to workers via runtime_env
    (unless it is installed there already: PRUNEFUSE_INSTALLED=1 skips the upload)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    # Trials import plugin suites from the folder the search was started in.
    os.environ["PRUNEFUSE_PLUGIN_PATH"] = os.getcwd()
    if address is None:
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": {"PRUNEFUSE_PLUGIN_PATH": os.getcwd()}}, **kwargs)
        log(f"started an embedded local Ray with {int(ray.cluster_resources().get('CPU', 0))} CPUs")
        return
    if address != "auto":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    runtime_env = None
    if os.environ.get("PRUNEFUSE_INSTALLED") != "1":
        runtime_env = {"working_dir": str(project_root()), "excludes": RUNTIME_EXCLUDES}
    runtime_env = {**(runtime_env or {}), "env_vars": {"PRUNEFUSE_PLUGIN_PATH": os.getcwd()}}
    ray.init(address=address, runtime_env=runtime_env, **kwargs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log(f"connected to Ray at {address}: {len(nodes)} node(s), {int(ray.cluster_resources().get('CPU', 0))} CPUs, "
        f"{ray.cluster_resources().get('GPU', 0):g} GPUs")


def ray_map(fn, items, *, num_cpus: float = 1, num_gpus: float = 0):
    """map(fn, items) as parallel Ray tasks with the trials' resources."""
    import ray

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_call)
    return ray.get([remote.remote(fn, item) for item in items])


def _call(fn, item):
    import torch

    torch.set_num_threads(1)
    return fn(item)
