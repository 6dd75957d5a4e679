"""SearchConfig: everything a search was asked to do, saved as `prunefuse.json` in the experiment.

Saving it lets `--resume`, `report` and `export` work from the experiment directory alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator

from spaces.errors import PrunefuseError
from spaces.files import check_plain_name, is_uri, join, read_text, write_text
from spaces.policy import Strict
from spaces.vocabulary import CONFIG_FILE, SCALAR_METRICS, TASK_METRIC

from .samplers import SAMPLERS

OBJECTIVE_NAMES = tuple(SCALAR_METRICS)


def parse_objectives(text: str) -> list[tuple[str, str]]:
    """`score:max,params:min` -> [("score", "max"), ("params", "min")]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, sense = part.partition(":")
        if name not in OBJECTIVE_NAMES and not name.startswith(TASK_METRIC):
            raise PrunefuseError(f"unknown objective {name!r}; expected one of: {', '.join(OBJECTIVE_NAMES)} or metric/<task>")
        if sense not in ("max", "min"):
            raise PrunefuseError(f"objective {part!r} needs a sense: {name}:max or {name}:min")
        out.append((name, sense))
    if len(out) < 1:
        raise PrunefuseError("--objectives needs at least one NAME:max|min")
    return out


# The mean task metric (the first scalar metric), size and latency.
DEFAULT_OBJECTIVES = [(name, SCALAR_METRICS[name]) for name in (next(iter(SCALAR_METRICS)), "params", "latency_ms")]


def default_objectives(space: dict) -> list[tuple[str, str]]:
    """DEFAULT_OBJECTIVES, with size counted as `nonzero_params` where the space may prune
    unstructured: masks leave every parameter stored, so `params` would not move and the front
    would be chosen on score and latency noise alone."""
    mode = (space.get("pruning") or {}).get("mode", "structured") if isinstance(space, dict) else "structured"
    modes = mode if isinstance(mode, list) else [mode]
    if "unstructured" not in modes:
        return list(DEFAULT_OBJECTIVES)
    return [("nonzero_params", SCALAR_METRICS["nonzero_params"]) if name == "params" else (name, sense)
            for name, sense in DEFAULT_OBJECTIVES]


# The flag a user sets each field with: the one statement of that map. The CLI's parser adds
# these flags (`search.cli`), and errors name what the user typed.
FLAGS = {"name": "--name", "storage": "--storage", "objectives": "--objectives", "trials": "--trials",
         "time_budget_s": "--time-budget", "sampler": "--sampler", "seed": "--seed",
         "cpus_per_trial": "--cpus-per-trial", "gpus_per_trial": "--gpus-per-trial",
         "max_concurrent": "--max-concurrent", "retries": "--retries", "train": "--train-option",
         "measure": "--measure-option", "max_task_drop": "--max-task-drop", "address": "--address",
         "base_checkpoint": "--base-checkpoint", "experts": "--experts", "suite": "--suite",
         "model": "--model-option", "space": "--space",
         "tracking": "--tracking", "early_stop": "--early-stop", "early_stop_keep": "--early-stop-keep",
         "warm_start": "--warm-start", "references": "--references"}
# Fields whose flag's value is the field's value as typed (the others the CLI builds from
# several flags or parses: suite, model, space, objectives, trials, train, measure, name).
SETTINGS = ("storage", "time_budget_s", "sampler", "seed", "cpus_per_trial", "gpus_per_trial", "max_concurrent",
            "retries", "tracking", "references", "max_task_drop", "early_stop", "early_stop_keep", "warm_start",
            "address", "base_checkpoint")


class SearchConfig(Strict):
    """What a search was asked to do. Frozen and validated where it is built, so the CLI and
    `run_search` called from Python get the same checks; change one with `replace`."""
    name: str
    storage: str = "runs"
    suite: dict[str, Any] = {"name": "multidigits"}          # name + options
    model: dict[str, Any] = {"trunk": "mlp"}
    space: dict[str, Any] = {}                                # a SpaceSpec as plain data
    objectives: list[tuple[str, Literal["max", "min"]]] = None   # None: default_objectives(space)
    trials: Optional[StrictInt] = Field(48, ge=1)
    time_budget_s: Optional[float] = Field(None, gt=0)      # finite: NaN would mean "forever"
    sampler: str = "tpe"
    seed: StrictInt = 0
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_concurrent: Optional[StrictInt] = Field(None, ge=1)
    retries: StrictInt = Field(0, ge=0)                      # a failing trial is retried this many times
    train: dict[str, Any] = {}                                # mtl_models.artifacts.TrainSpec fields
    measure: dict[str, Any] = {}                              # mtl_models.pipeline.MeasureSpec fields
    references: bool = False                                  # train single-task references for Δm
    max_task_drop: Optional[float] = Field(None, ge=0)       # points vs dense base; infeasible trials kept off the front
    early_stop: Optional[Literal["asha", "pareto"]] = None   # stop weak trials between pruning steps
    early_stop_keep: float = Field(0.5, gt=0, le=1)          # pareto: the fraction of each rung kept by rank
    warm_start: Optional[str] = None                          # an earlier experiment whose trials seed the study
    address: Optional[str] = None
    base_checkpoint: Optional[str] = None
    experts: Optional[dict[str, str]] = None                  # task -> a user's fine-tuned expert (--experts)
    tracking: Optional[str] = None                            # "mlflow" or "mlflow=URI" (search.tracking)

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise PrunefuseError(_message(exc)) from None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v):
        return check_plain_name(v)

    @field_validator("storage")
    @classmethod
    def _storage_given(cls, v):
        if not v.strip():
            raise ValueError("expected a folder or URI")
        return v

    @field_validator("suite")
    @classmethod
    def _suite_named(cls, v):
        if not isinstance(v.get("name"), str) or not v["name"]:
            raise ValueError("the suite needs a 'name'")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v):
        if not v:
            raise ValueError("needs at least one NAME:max|min")
        names = [name for name, _ in v]
        for name in names:
            if name not in OBJECTIVE_NAMES and \
                    not (name.startswith(TASK_METRIC) and len(name) > len(TASK_METRIC)):
                raise ValueError(f"unknown objective {name!r}; expected one of: {', '.join(OBJECTIVE_NAMES)} "
                                 f"or metric/<task>")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given more than once; each objective once")
        return v

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v):
        SAMPLERS.method(v)  # an unknown name: one line listing the registered ones
        return v

    @field_validator("tracking")
    @classmethod
    def _known_tracker(cls, v):
        if v is not None:
            from .tracking import parse

            parse(v)
        return v

    @field_validator("train", "measure")
    @classmethod
    def _spec_options(cls, v, info):
        _check_spec_options(v, info.field_name)
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_objectives(cls, data):
        if isinstance(data, dict) and data.get("objectives") is None:
            data = {**data, "objectives": default_objectives(data.get("space") or {})}
        return data

    @model_validator(mode="after")
    def _ends(self):
        if self.trials is None and self.time_budget_s is None:
            raise ValueError("a search needs --trials N or --time-budget S (it would never end)")
        return self

    @property
    def path(self) -> str:
        return join(self.storage, self.name)

    def replace(self, **changes) -> "SearchConfig":
        """A copy with `changes`, validated like a new one."""
        return SearchConfig(**{**self.model_dump(), **changes})

    def save(self) -> None:
        write_text(join(self.path, CONFIG_FILE), json.dumps(self.model_dump(mode="json"), indent=1))

    @classmethod
    def load(cls, experiment: str) -> "SearchConfig":
        source = join(experiment, CONFIG_FILE)
        text = read_text(source, what="experiment")
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a {type(data).__name__}, not a mapping")
            # Where it was found now wins over where it was first written (a moved folder, or a
            # relative --storage resumed from another working directory).
            where = str(experiment).rstrip("/")
            parent, _, base = where.rpartition("/") if is_uri(where) else (str(Path(where).parent), "", Path(where).name)
            if base == data.get("name") and parent:
                data["storage"] = parent
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise PrunefuseError(f"{source} is not a prunefuse experiment file "
                                 f"({str(exc).splitlines()[0][:160]})") from None


def _check_spec_options(values: dict, what: str) -> None:
    """--train-option / --measure-option: known keys, types and ranges (TrainSpec / MeasureSpec)."""
    from dataclasses import fields

    from mtl_models.artifacts import TrainSpec
    from mtl_models.pipeline import MeasureSpec

    spec = TrainSpec if what == "train" else MeasureSpec
    per_job = ("device",) if what == "train" else ("device", "precision")  # set per job, not by flags
    valid = [f.name for f in fields(spec) if f.name not in per_job]
    for key in values:
        if key not in valid:
            raise PrunefuseError(f"--{what}-option {key!r} is not known; valid: {', '.join(valid)}")
    spec(**values)


def _message(exc: ValidationError) -> str:
    """One line from SearchConfig's first problem, named by the flag that sets the field."""
    first = exc.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"search config: {field!r} is not a setting (check its spelling)"
    if not field:
        return msg
    if first["type"] == "value_error" and field in ("train", "measure", "sampler"):
        return msg
    if first["type"] == "value_error" and field == "objectives":
        return f"--objectives: {msg}"
    flag = FLAGS.get(field, field)
    value = first.get("input")
    shown = f" {value!r}" if not isinstance(value, (dict, list)) else ""
    if first["type"] == "finite_number":
        msg = "expected a finite number"
    return f"{flag}{shown}: {msg}"
