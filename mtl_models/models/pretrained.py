"""A user's pretrained backbone (`--base-checkpoint`) and fine-tuned experts (`--experts TASK=PATH`).

Both are read from local files (`weights.read_weights`) and placed onto the model by name
(`keymap.place`). Everything that does not fit is said in one line before anything trains:
- the backbone must fill every trunk tensor with the trunk's shapes; library tensors with no
  place in the model (an ImageNet classifier) are named in one notice and left out, and the
  heads then start fresh (the dense base is the backbone fine-tuned on the suite's tasks);
- an expert must be a copy of the backbone: the same trunk tensors with the same shapes and
  nothing the backbone did not have; the first differing key is named. Its head is optional.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spaces.errors import PrunefuseError

from mtl_models.models import keymap
from mtl_models.models.weights import read_weights


@dataclass
class Backbone:
    """A placed `--base-checkpoint`: `state` holds model names (trunk, and heads where it had them)."""
    path: str
    state: dict[str, torch.Tensor]
    config: dict | None        # a Hugging Face folder's config.json
    complete: bool             # a whole multi-task model (no training) or a trunk only (heads start fresh)
    left_out: list[str]        # library names with no place in the model, relative to the trunk prefix

    @property
    def trunk(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state.items() if k.startswith(keymap.TRUNK)}


def load_backbone(path: str, model, tasks, *, log=print) -> Backbone:
    what = "base checkpoint"
    weights = read_weights(path, what=what)
    own = model.state_dict()
    placed = keymap.place(weights.state, own, tasks=tasks)
    problem = keymap.first_trunk_problem(placed, own, weights.state)
    if problem:
        raise PrunefuseError(f"{what} {path!r} does not fit the trunk: {problem} "
                             f"({len(weights.state)} tensors read, names like {_examples(weights.state)})")
    keymap.check_finite(placed.state, f"{what} {path!r}")
    complete = all(k in placed.state for k in own)
    if placed.unplaced or placed.misfit:
        fresh = "" if complete else "; the heads start fresh"
        misfit = f"; shapes that do not fit: {', '.join(placed.misfit)}" if placed.misfit else ""
        log(f"{what} {path!r}: left out (no place in the model): "
            f"{keymap.describe(placed.unplaced, weights.state) or 'none'}{misfit}{fresh}")
    left_out = [n.removeprefix(placed.prefix) for n in placed.unplaced]
    return Backbone(str(path), placed.state, weights.config, complete, left_out)


def load_expert(path: str, model, tasks, task: str, backbone: Backbone, *, log=print) -> dict[str, torch.Tensor]:
    """The expert's trunk (and its head, when it has one that fits task `task`), by model names.

    Tensors of modules the trunk has no part of (a library's pooler, which the backbone file
    may lack) are left out with a notice; a tensor inside the trunk's modules that the trunk
    lacks (a deeper expert's extra block) makes it another architecture."""
    what = f"expert for task {task!r}"
    weights = read_weights(path, what=what)
    own = model.state_dict()
    placed = keymap.place(weights.state, own, tasks=tasks, head_task=task)
    problem = keymap.first_trunk_problem(placed, own, weights.state)
    if problem is None:
        extra = [n for n in placed.unplaced if n.removeprefix(placed.prefix) not in backbone.left_out]
        modules = keymap.trunk_modules(placed, own)
        inside = [n for n in extra if n.startswith(placed.prefix) and n[len(placed.prefix):].split(".")[0] in modules]
        if inside:
            problem = f"{inside[0]!r} {tuple(weights.state[inside[0]].shape)} is not in the backbone's trunk"
        elif extra:
            log(f"{what} {path!r}: left out (no place in the model): {keymap.describe(extra, weights.state)}")
    if problem is None and placed.misfit:
        problem = f"its head does not fit task {task!r}: {placed.misfit[0]}"
    if problem:
        raise PrunefuseError(f"{what} {path!r} is not a copy of the backbone {backbone.path!r} fine-tuned on "
                             f"{task!r}: {problem}")
    keymap.check_finite(placed.state, f"{what} {path!r}")
    return placed.state


def _examples(state, n: int = 3) -> str:
    return ", ".join(repr(k) for k in list(state)[:n])


@dataclass
class UserWeights:
    """What `--base-checkpoint` and `--experts` bring, placed onto the model."""
    base: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]] | None = None


def load_user_weights(model, *, base: str | None, experts: dict[str, str] | None = None,
                      recorded: dict[str, str] | None = None, log=print) -> UserWeights | None:
    """The backbone and the experts, checked before anything trains: one expert per task and a
    backbone beside them; with `recorded` (path -> SHA-256, a policy's), every file unchanged."""
    from mtl_models.models.weights import checkpoint_sha256

    tasks = list(model.heads)
    if experts:
        check_expert_tasks(experts, tasks, base)
    if base is None:
        return None
    for what, path in [("base checkpoint", base), *((f"expert for task {t!r}", p) for t, p in (experts or {}).items())]:
        expected = (recorded or {}).get(path)
        if expected is not None and (found := checkpoint_sha256(path, what=what)) != expected:
            raise PrunefuseError(f"{what} {path!r} has changed since the policy was made (sha256 {found[:12]}..., "
                                 f"the policy expects {expected[:12]}...); nothing was applied")
    backbone = load_backbone(base, model, tasks, log=log)
    placed = {t: load_expert(p, model, tasks, t, backbone, log=log) for t, p in experts.items()} if experts else None
    return UserWeights(backbone.state, placed)


def check_expert_tasks(experts: dict[str, str], tasks, base: str | None) -> None:
    """One expert per task of the suite, and the backbone they were fine-tuned from."""
    if base is None:
        raise PrunefuseError("--experts needs --base-checkpoint: the backbone the experts were fine-tuned from "
                             "(their task vectors are taken against it)")
    unknown = [t for t in experts if t not in tasks]
    if unknown:
        raise PrunefuseError(f"--experts {unknown[0]}=...: the suite has no task {unknown[0]!r}; its tasks: "
                             f"{', '.join(tasks)}")
    missing = [t for t in tasks if t not in experts]
    if missing:
        raise PrunefuseError(f"--experts has no expert for task {missing[0]!r}; give one per task "
                             f"(--experts {missing[0]}=PATH)")


# config.json entries that describe the saved file rather than the model.
_CONFIG_NOISE = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")


def model_spec_from_checkpoint(model_spec: dict, base_checkpoint: str | None) -> dict:
    """`--trunk hf:TYPE` with a Hugging Face folder as `--base-checkpoint`: the trunk is built from
    the folder's config.json (the spec's `config`; other model options override its entries)."""
    import json
    import os

    trunk = str(model_spec.get("trunk", ""))
    if not trunk.startswith("hf:") or "config" in model_spec or not base_checkpoint \
            or not os.path.isfile(os.path.join(base_checkpoint, "config.json")):
        return model_spec
    path = os.path.join(base_checkpoint, "config.json")
    try:
        config = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as exc:
        raise PrunefuseError(f"base checkpoint {path!r} is not JSON ({str(exc)[:120]})") from None
    if not isinstance(config, dict):
        raise PrunefuseError(f"base checkpoint {path!r} holds a {type(config).__name__}, not a mapping")
    return {**model_spec, "config": {k: v for k, v in config.items() if k not in _CONFIG_NOISE}}
