"""Placing a library checkpoint's tensors onto a multi-task model's `trunk.*` and `heads.<task>.*`.

A checkpoint names its tensors the way its library does: timm's ViT has `blocks.0.attn.qkv.weight`
and a classifier `head.weight`; a `BertForSequenceClassification` has `bert.encoder...` and
`classifier.weight`; prunefuse's own model has `trunk.*` and `heads.<task>.*`. The trunk is
found by aligning names: the checkpoint prefix (`""`, `bert.`, `module.`) and the trunk prefix
(`""`, or the attribute a trunk keeps its library module in) under which the most names agree.
A head is the rest under one of `HEAD_PREFIXES` whose names and shapes are a task head's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spaces.errors import PrunefuseError

TRUNK, HEADS = "trunk.", "heads."
# Where libraries keep a classifier: timm (`head.`, `head.fc.` in its conv nets), Hugging Face
# (`classifier.`, `score.`), torchvision (`fc.`).
HEAD_PREFIXES = ("head.", "head.fc.", "classifier.", "score.", "fc.")


@dataclass
class Placement:
    """Where a checkpoint's tensors go. `state` uses the model's names."""
    state: dict[str, torch.Tensor]
    prefix: str                                   # checkpoint prefix stripped for the trunk
    trunk_prefix: str = ""                        # where the trunk keeps the library module ("model.")
    heads: list[str] = field(default_factory=list)        # tasks whose head the checkpoint held
    unplaced: list[str] = field(default_factory=list)     # checkpoint names with no place, as saved
    misfit: list[str] = field(default_factory=list)       # "name (shape) for key (shape)" of head-like tensors

    def trunk_complete(self, model_state) -> bool:
        return all(k in self.state for k in model_state if k.startswith(TRUNK))


def _prefixes(names, depth: int) -> set[str]:
    """"" and every dotted prefix of `names` up to `depth` components ("bert.", "module.bert.")."""
    out = {""}
    for n in names:
        parts = n.split(".")[:-1]
        for d in range(1, min(depth, len(parts)) + 1):
            out.add(".".join(parts[:d]) + ".")
    return out


def align_trunk(names, trunk_keys) -> tuple[str, str, int]:
    """(checkpoint prefix, trunk prefix, how many names agree) that place the most names."""
    names, trunk_keys = list(names), set(trunk_keys)
    best = ("", "", 0)
    for q in sorted(_prefixes(trunk_keys, 2), key=len):
        for p in sorted(_prefixes(names, 2), key=len):
            hits = sum(1 for n in names if n.startswith(p) and q + n[len(p):] in trunk_keys)
            if hits > best[2]:
                best = (p, q, hits)
    return best


def place(state: dict, model_state: dict, *, tasks, head_task: str | None = None) -> Placement:
    """Map a checkpoint (`state`, names as saved) onto a model's names (`model_state`: its state
    dict). `head_task`: an expert's task, whose head may be under a library name; without it
    only prunefuse's own `heads.<task>.*` are placed."""
    trunk = {k[len(TRUNK):]: v for k, v in model_state.items() if k.startswith(TRUNK)}
    p, q, _ = align_trunk(state, trunk)
    placed = Placement({}, p, q)
    used = set()
    for key in trunk:
        name = p + key[len(q):]
        if key.startswith(q) and name in state:
            placed.state[TRUNK + key] = state[name]
            used.add(name)
    for task in [head_task] if head_task else tasks:   # an expert brings its own task's head only
        prefixes = [f"{HEADS}{task}."] + (list(HEAD_PREFIXES) if task == head_task else [])
        for prefix in prefixes:
            head = _head_under(state, prefix, model_state, task, used)
            if head is None:
                continue
            fits, misfit = head
            if misfit:
                placed.misfit.append(misfit)
                continue
            placed.state.update(fits)
            used.update(prefix + k[len(f"{HEADS}{task}."):] for k in fits)
            placed.heads.append(task)
            break
    # A whole multi-task model's other heads (an expert saved by prunefuse) are known, not unplaced.
    others = tuple(f"{HEADS}{t}." for t in tasks if t != head_task) if head_task else ()
    placed.unplaced = [n for n in state if n not in used and not n.startswith(others)]
    return placed


def _head_under(state, prefix, model_state, task, used):
    """(tensors by the model's names, None) when the names under `prefix` are exactly task
    `task`'s head's with its shapes; (None, why) when they are its names with other shapes;
    None when they are not its names."""
    own = f"{HEADS}{task}."
    wanted = [k[len(own):] for k in model_state if k.startswith(own)]   # in the model's order
    found = {n[len(prefix):] for n in state if n.startswith(prefix) and n not in used}
    if not wanted or found != set(wanted):
        return None
    for rel in wanted:
        have, need = tuple(state[prefix + rel].shape), tuple(model_state[own + rel].shape)
        if have != need:
            return None, f"{prefix + rel} {have} for {own + rel} {need}"
    return {own + rel: state[prefix + rel] for rel in wanted}, None


def first_trunk_problem(placed: Placement, model_state: dict, state: dict) -> str | None:
    """The first trunk key the checkpoint does not fill, or fills with another shape; None when all fit."""
    for key, value in model_state.items():
        if not key.startswith(TRUNK):
            continue
        if key not in placed.state:
            return f"no tensor for {key!r} (shape {tuple(value.shape)})"
        have = placed.state[key]
        if not torch.is_tensor(have):
            return f"{key!r} holds a {type(have).__name__}, not a tensor"
        if tuple(have.shape) != tuple(value.shape):
            name = placed.prefix + key[len(TRUNK):]
            return f"{name!r} has shape {tuple(have.shape)}, the trunk's {key!r} needs {tuple(value.shape)}"
    return None


def trunk_modules(placed: Placement, model_state: dict) -> set[str]:
    """The top-level module names of the trunk, as the checkpoint names them ("blocks", "encoder")."""
    inner = [k[len(TRUNK):] for k in model_state if k.startswith(TRUNK + placed.trunk_prefix)]
    return {k[len(placed.trunk_prefix):].split(".")[0] for k in inner}


def describe(names, state, limit: int = 4) -> str:
    """`head.weight (1000, 64), head.bias (1000,)` (and how many more)."""
    shown = ", ".join(f"{n} {tuple(state[n].shape)}" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite(state: dict, what: str) -> None:
    """NaN or inf weights would fail much later (in training or merging) as a cryptic error."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise PrunefuseError(f"{what}: {key} holds NaN or inf values; it is not a trained model")
