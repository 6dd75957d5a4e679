"""What a search trains once and every trial starts from.

The dense base model; when fusion is searched, one expert per task fine-tuned from the
base (trunk + that task's head, on that task's loss); and, for Δm, one single-task
reference model per task. Cached under `cache_dir/<content hash>/` so a second search
with the same suite, model and training config reuses them. Weights are stored with
`torch.save` of plain state dicts and read back with `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spaces.errors import PrunefuseError
from spaces.knobs import coerce_number

from mtl_models.models.weights import load_weights
from mtl_models.training.device import PRECISIONS, job_device
from mtl_models.training.train import Guidance, TrainOptions, evaluate, train


@dataclass(frozen=True)
class TrainSpec:
    """How the shared artifacts are trained; part of their cache key."""
    epochs: float = 15.0
    lr: float = 1e-3
    batch_size: int = 256
    expert_epochs: float = 3.0
    # Experts fine-tune from a converged base; a smaller lr keeps their task vectors small
    # enough to merge (None: the base's lr).
    expert_lr: float | None = None
    # While an expert fine-tunes on its task, this weighs a loss that keeps the other tasks'
    # predictions where the base had them (0: a plain fine-tune). Such experts' task vectors
    # add up instead of interfering: merging them works (benchmarks/fusion.py).
    expert_preserve: float = 1.0
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast while training (mtl_models.training.device)

    def __post_init__(self):
        # Typed and checked here, so a CLI's `epochs=2` and a policy's `epochs: 2.0` share one
        # cache key, and `epochs=abc` is one clear line.
        rules = {"epochs": (float, 0.0, False), "lr": (float, 0.0, True), "batch_size": (int, 1, False),
                 "expert_epochs": (float, 0.0, False), "expert_preserve": (float, 0.0, False),
                 "seed": (int, None, False)}
        for name, (cast, low, low_open) in rules.items():
            value = coerce_number("training", name, getattr(self, name), cast, low=low, low_open=low_open)
            object.__setattr__(self, name, value)
        if self.precision not in PRECISIONS:
            raise PrunefuseError(f"training precision {self.precision!r} is not one of: {', '.join(PRECISIONS)}")
        if self.expert_lr is not None:
            object.__setattr__(self, "expert_lr",
                               coerce_number("training", "expert_lr", self.expert_lr, float, low=0.0, low_open=True))


@dataclass
class Artifacts:
    key: str
    suite: dict                       # the suite spec they were trained on
    model: dict                       # the model spec
    base: dict[str, torch.Tensor]     # dense base state dict
    dense_metrics: dict[str, dict[str, float]]           # split -> task -> metric
    experts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    references: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> task -> metric
    # The trunk a user's experts (--experts) were fine-tuned from: their task vectors are taken
    # against it. Empty: prunefuse's own experts, fine-tuned from the base's trunk.
    backbone: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> task -> its expert's metric


def cache_key(suite_spec: dict, model_spec: dict, spec: TrainSpec, kind: str) -> str:
    # TrainSpec normalises its types, so a CLI's `epochs=2` and a policy's `epochs: 2.0` share a key.
    train_spec = dict(spec.__dict__)
    if train_spec["precision"] == "fp32":
        del train_spec["precision"]  # fp32 is how every base was trained before precision was a choice
    blob = json.dumps({"suite": suite_spec, "model": model_spec, "train": train_spec, "kind": kind},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _metrics(model, suite):
    return {split: evaluate(model, suite, split) for split in ("val", "test")}


def train_base(suite, model_spec: dict, spec: TrainSpec, *, device: str = "cpu", base_state=None):
    """The dense multi-task model (or a user's checkpoint, checked against the model)."""
    torch.manual_seed(spec.seed)
    model = suite.build_model(**model_spec)
    if base_state is not None and set(base_state) >= set(model.state_dict()):
        load_checked(model, base_state, source="base checkpoint")  # a whole multi-task model: used as it is
    else:
        if base_state is not None:  # a backbone alone: its trunk, fine-tuned with fresh heads on the suite's tasks
            model.load_state_dict(base_state, strict=False)
        train(model, suite, TrainOptions(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed,
                                         device=device, precision=spec.precision))
    model.cpu()
    return {k: v.clone() for k, v in model.state_dict().items()}, _metrics(model, suite)


def train_expert(suite, model_spec, spec: TrainSpec, base: dict, task: str, *, device: str = "cpu"):
    """Fine-tune the base on one task's loss: that task's expert (trunk + its head).

    With `expert_preserve` > 0 the other heads stay frozen and the other tasks' predictions
    are anchored to the base's, so the trunk changes only in ways this task needs: task
    vectors that add up when merged, rather than each costing the other tasks."""
    from mtl_models.training.train import predict

    torch.manual_seed(spec.seed)
    model = suite.build_model(**model_spec)
    model.load_state_dict(base)
    anchor = None
    if spec.expert_preserve > 0:
        others = [t for t in suite.task_names if t != task]
        anchor = {t: y for t, y in predict(model, suite.train, device=device).items() if t in others}
        for t in others:
            model.heads[t].requires_grad_(False)
    train(model, suite, TrainOptions(epochs=spec.expert_epochs, lr=spec.expert_lr or spec.lr,
                                     batch_size=spec.batch_size, tasks=(task,), seed=spec.seed + 1, device=device,
                                     precision=spec.precision),
          guide=Guidance(anchor=anchor, anchor_weight=spec.expert_preserve))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_reference(suite, model_spec, spec: TrainSpec, task: str, *, device: str = "cpu"):
    """A single-task model with the same trunk, trained from scratch; returns its metric per split."""
    torch.manual_seed(spec.seed)
    model = suite.build_model(**model_spec)
    train(model, suite, TrainOptions(epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size, tasks=(task,),
                                     seed=spec.seed, device=device, precision=spec.precision))
    return {split: evaluate(model, suite, split)[task] for split in ("val", "test")}


def load_checked(model, state: dict, *, source: str) -> None:
    """load_state_dict with an error naming the first missing / unexpected / mis-shaped key."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise PrunefuseError(f"{source}: missing key {key!r} that the model needs")
        if not isinstance(state[key], torch.Tensor):
            raise PrunefuseError(f"{source}: key {key!r} holds a {type(state[key]).__name__}, not a tensor")
        if tuple(state[key].shape) != tuple(value.shape):
            raise PrunefuseError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, "
                                 f"the model expects {tuple(value.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise PrunefuseError(f"{source}: unexpected key {extra[0]!r} that the model does not have")
    model.load_state_dict(state)


def prepare(suite, model_spec: dict, spec: TrainSpec, *, cache_dir, experts: bool = False,
            references: bool = False, base_state=None, map_fn=map, base_map_fn=None, device: str = "cpu",
            log=print, user_experts: dict | None = None) -> Artifacts:
    """Train (or load from cache) everything trials share.

    map_fn(fn, items) runs the per-task trainings; the search passes one that fans them
    out as Ray tasks, plain `map` trains them here one after another. base_map_fn, when
    given, runs the base's training the same way (a Ray task on a cluster or a GPU);
    otherwise the base trains here, on `device`.
    """
    suite_spec = suite.spec
    base_kind = "checkpoint:" + _state_digest(base_state) if base_state is not None else "trained"
    key = cache_key(suite_spec, model_spec, spec, base_kind)
    folder = Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)

    base_file, meta_file = folder / "base.pt", folder / "meta.json"
    if base_file.exists() and meta_file.exists():
        base = _load(base_file)
        meta = json.loads(meta_file.read_text())
        log(f"reusing the dense base from {folder}")
    else:
        if base_state is not None:
            heads = {k.split(".")[1] for k in base_state if k.startswith("heads.")}
            log("loading the base checkpoint ..." if heads >= set(suite.task_names) else
                "fine-tuning the backbone of the base checkpoint, with fresh heads, on the suite's tasks ...")
            base, dense = train_base(suite, model_spec, spec, device=device, base_state=base_state)
        elif base_map_fn is not None:
            log("training the dense base model as a Ray task ...")
            [(base, dense)] = list(base_map_fn(_BaseJob(suite, model_spec, spec), [None]))
        else:
            log("training the dense base model ...")
            base, dense = train_base(suite, model_spec, spec, device=device)
        meta = {"dense_metrics": dense}
        _save(base, base_file)
        _write_json(meta_file, meta)
    art = Artifacts(key, suite_spec, dict(model_spec), base, meta["dense_metrics"])

    if user_experts:  # a user's experts replace prunefuse's (and their metrics are the references)
        _add_user_experts(art, folder, suite, spec, base_state, user_experts, device=device, log=log)
        return art
    if experts:
        todo = [t for t in suite.task_names if not (folder / f"expert_{t}.pt").exists()]
        if todo:
            log(f"fine-tuning {len(todo)} task expert(s) ...")
            fn = _ExpertJob(suite, model_spec, spec, base)
            for task, state in zip(todo, map_fn(fn, todo)):
                _save(state, folder / f"expert_{task}.pt")
        art.experts = {t: _load(folder / f"expert_{t}.pt") for t in suite.task_names}

    if references:
        ref_file = folder / "references.json"
        if not ref_file.exists():
            log(f"training {len(suite.tasks)} single-task reference model(s) ...")
            fn = _ReferenceJob(suite, model_spec, spec)
            refs = dict(zip(suite.task_names, map_fn(fn, suite.task_names)))
            _write_json(ref_file, {split: {t: refs[t][split] for t in refs} for split in ("val", "test")})
        art.references = json.loads(ref_file.read_text())
    return art


def _add_user_experts(art: Artifacts, folder: Path, suite, spec: TrainSpec, backbone: dict, user_experts: dict,
                      *, device: str, log) -> None:
    """Each task's expert as a whole model state: the base with the expert's trunk and its own
    head (fitted on its frozen trunk, once, when the expert came without one); measured once
    on its task: the individual-model reference that Δm (`delta_m`) is then taken against."""
    flat = {f"{t}/{k}": v for t in sorted(user_experts) for k, v in user_experts[t].items()}
    sub = folder / f"user-experts-{_state_digest(flat)}"   # beside the base they were checked against
    sub.mkdir(exist_ok=True)
    art.backbone = {k: v for k, v in backbone.items() if k.startswith("trunk.")}
    for task in suite.task_names:
        file = sub / f"expert_{task}.pt"
        if not file.exists():
            state = {**art.base, **user_experts[task]}
            if not any(k.startswith(f"heads.{task}.") for k in user_experts[task]):
                log(f"expert for {task!r} came without its head: fitting one on its frozen trunk ...")
                state = fit_expert_head(suite, art.model, spec, state, task, device=device)
            _save(state, file)
        art.experts[task] = _load(file)
    metrics_file = sub / "expert_metrics.json"
    if not metrics_file.exists():
        _write_json(metrics_file, expert_metrics(suite, art.model, art.experts))
    art.expert_metrics = json.loads(metrics_file.read_text())
    art.references = art.expert_metrics


def fit_expert_head(suite, model_spec, spec: TrainSpec, state: dict, task: str, *, device: str = "cpu") -> dict:
    """A head for `task` on an expert's frozen trunk (a linear probe); the trunk comes back unchanged."""
    torch.manual_seed(spec.seed)
    model = suite.build_model(**model_spec)
    model.load_state_dict(state)
    model.requires_grad_(False)
    model.heads[task].requires_grad_(True)
    train(model, suite, TrainOptions(epochs=spec.expert_epochs, lr=spec.expert_lr or spec.lr, batch_size=spec.batch_size,
                                     tasks=(task,), seed=spec.seed + 1, device=device, precision=spec.precision))
    fitted = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Training mode moved BatchNorm statistics of the frozen trunk: the expert's own are put back.
    return {**fitted, **{k: v for k, v in state.items() if not k.startswith(f"heads.{task}.")}}


def expert_metrics(suite, model_spec: dict, experts: dict) -> dict[str, dict[str, float]]:
    """split -> task -> the metric of that task's expert on it (its own model, its own head)."""
    out = {"val": {}, "test": {}}
    for task, state in experts.items():
        model = suite.build_model(**model_spec)
        model.load_state_dict(state)
        for split in out:
            out[split][task] = evaluate(model, suite, split)[task]
    return out


class _BaseJob:
    """Picklable base-training job (on the task's GPU when it has one)."""
    def __init__(self, suite, model_spec, spec):
        self.suite, self.model_spec, self.spec = suite, model_spec, spec

    def __call__(self, _item):
        return train_base(self.suite, self.model_spec, self.spec, device=job_device())


class _ExpertJob:
    """Picklable per-task job (Ray tasks need a top-level callable)."""
    def __init__(self, suite, model_spec, spec, base):
        self.suite, self.model_spec, self.spec, self.base = suite, model_spec, spec, base

    def __call__(self, task):
        return train_expert(self.suite, self.model_spec, self.spec, self.base, task, device=job_device())


class _ReferenceJob:
    def __init__(self, suite, model_spec, spec):
        self.suite, self.model_spec, self.spec = suite, model_spec, spec

    def __call__(self, task):
        return train_reference(self.suite, self.model_spec, self.spec, task, device=job_device())


def _state_digest(state) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _save(state, path: Path) -> None:
    # A unique temporary name: two searches sharing the cache never write into each other's file.
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        import io

        buffer = io.BytesIO()  # serialised here, written by Python: a full disk is an OSError naming the file
        torch.save(state, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names no file: name it
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def _load(path: Path) -> dict:
    try:
        return load_weights(path)
    except Exception as exc:
        raise PrunefuseError(f"cached artifact {str(path)!r} is unreadable ({str(exc).splitlines()[0][:120]}); "
                             f"delete its folder to retrain it") from None


def _write_json(path: Path, data) -> None:
    from spaces.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1))
