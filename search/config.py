"""SearchConfig: everything a search was asked to do, saved as `prunefuse.json` in the experiment.

Saving it lets `--resume`, `report` and `export` work from the experiment directory alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from spaces.errors import PrunefuseError
from spaces.files import atomic_write_text

from reports.layout import CONFIG_FILE
OBJECTIVE_NAMES = ("accuracy", "test_accuracy", "delta_m", "params", "nonzero_params", "bytes", "macs", "latency_ms")
SAMPLERS = ("tpe", "nsga2", "random")  # the names `--sampler` takes


def parse_objectives(text: str) -> list[tuple[str, str]]:
    """`accuracy:max,params:min` -> [("accuracy", "max"), ("params", "min")]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, sense = part.partition(":")
        if name not in OBJECTIVE_NAMES and not name.startswith("metric/"):
            raise PrunefuseError(f"unknown objective {name!r}; expected one of: {', '.join(OBJECTIVE_NAMES)} or metric/<task>")
        if sense not in ("max", "min"):
            raise PrunefuseError(f"objective {part!r} needs a sense: {name}:max or {name}:min")
        out.append((name, sense))
    if len(out) < 1:
        raise PrunefuseError("--objectives needs at least one NAME:max|min")
    return out


@dataclass
class SearchConfig:
    name: str
    storage: str = "runs"
    suite: dict = field(default_factory=lambda: {"name": "multidigits"})   # name + options
    model: dict = field(default_factory=lambda: {"trunk": "mlp"})
    space: dict = field(default_factory=dict)               # a SpaceSpec as plain data
    objectives: list = field(default_factory=lambda: [("accuracy", "max"), ("params", "min"), ("latency_ms", "min")])
    trials: Optional[int] = 48
    time_budget_s: Optional[float] = None
    sampler: str = "tpe"
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: Optional[int] = None
    retries: int = 0                                         # a failing trial is retried this many times
    train: dict = field(default_factory=dict)               # mtl_models.artifacts.TrainSpec fields
    measure: dict = field(default_factory=dict)             # mtl_models.pipeline.MeasureSpec fields
    references: bool = False                                 # train single-task references for Δm
    max_task_drop: Optional[float] = None                    # points vs dense base; infeasible trials kept off the front
    asha: bool = False                                       # early-stop bad trials on accuracy
    address: Optional[str] = None
    base_checkpoint: Optional[str] = None

    @property
    def path(self) -> str:
        return join(self.storage, self.name)

    def save(self) -> None:
        write_text(join(self.path, CONFIG_FILE), json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, experiment: str) -> "SearchConfig":
        text = read_text(join(experiment, CONFIG_FILE), what="experiment")
        try:
            data = json.loads(text)
            data["objectives"] = [tuple(o) for o in data["objectives"]]
            cfg = cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise PrunefuseError(f"{join(experiment, CONFIG_FILE)} is not a prunefuse experiment file "
                                 f"({str(exc).splitlines()[0][:120]})") from None
        # Where it was found now wins over where it was first written (a moved folder, or a
        # relative --storage resumed from another working directory).
        where = str(experiment).rstrip("/")
        parent, _, base = where.rpartition("/") if is_uri(where) else (str(Path(where).parent), "", Path(where).name)
        if base == cfg.name and parent:
            cfg.storage = parent
        return cfg


# --- paths that may be local folders or pyarrow filesystem URIs (s3://, gs://, ...) ---

def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def write_text(path: str, text: str) -> None:
    if not is_uri(path):
        atomic_write_text(path, text)
        return
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    parent = inner.rsplit("/", 1)[0]
    if parent:
        try:
            filesystem.create_dir(parent, recursive=True)  # a local file:// URI needs its folders
        except Exception:
            pass
    with filesystem.open_output_stream(inner) as f:
        f.write(text.encode())


def read_text(path: str, *, what: str = "file") -> str:
    if not is_uri(path):
        p = Path(path)
        if not p.is_file():
            where = p.parent if what == "experiment" else p
            raise PrunefuseError(f"{what} {str(where)!r} not found (no {p.name} there)")
        return p.read_text()
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    try:
        with filesystem.open_input_stream(inner) as f:
            return f.read().decode()
    except FileNotFoundError:
        raise PrunefuseError(f"{what} {path!r} not found") from None
