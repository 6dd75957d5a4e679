"""SearchSpace: what a search may decide, and the define-by-run `suggest(trial) -> Policy`.

A space spec (YAML, validated, unknown keys rejected) says for each knob whether it is
fixed (a scalar), a choice (a list) or a range ({low, high, log}). The space is completed
by what only the model and suite know (prunable layer names, task names) and by each
method's own knobs, which `mtl_models` declares beside the methods as `spaces.knobs.Knob`.
Define-by-run keeps conditional knobs natural: TIES's density is asked for only when the
trial picked TIES.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le

from pydantic import ValidationError

from .errors import PrunefuseError
from .files import read_yaml, validation_message
from .knobs import Knob
from .policy import Distill, Finetune, Fusion, Policy, Pruning, Quantization, Strict, Weighting
from .vocabulary import POLICY_SCHEMA


class Range(Strict):
    low: float
    high: float
    log: bool = False


Choice = Union[Range, list, float, int, str, bool, None]


class PruningSpace(Strict):
    mode: Choice = "structured"
    importance: Choice = ["l2", "multitask_taylor"]
    aggregate: Choice = "max"
    steps: Choice = 1
    scope: Choice = "layerwise"            # layerwise: one sparsity per layer; global: one ranking
    sparsity: Choice = Range(low=0.0, high=0.9)
    round_to: Choice = 1                   # structured: kept widths rounded to a multiple of this


class WeightingSpace(Strict):
    method: Choice = "static"
    weight: Choice = Range(low=0.05, high=1.0)  # each task's static weight (normalised when applied)


class FusionSpace(Strict):
    # "none" keeps the jointly trained base; a method merges per-task experts first.
    method: Choice = ["none", "task_arithmetic", "ties"]
    coefficient: Choice = Range(low=0.0, high=1.5)
    layerwise: bool = False                # one coefficient per task and layer group (AdaMerging-style)
    finetune_epochs: Choice = 0.0


class FinetuneSpace(Strict):
    epochs: Choice = 2.0
    lr: Choice = 1e-3
    batch_size: Choice = 256
    precision: Choice = "fp32"             # fp32 | bf16 | fp16 (fp16: CUDA only)
    distill: Optional["DistillSpace"] = None  # knowledge distillation (None: labels only)


class DistillSpace(Strict):
    weight: Choice = 1.0                   # a range with low 0 lets the search turn it off
    temperature: Choice = 2.0
    teacher: Choice = "dense"              # dense | fused


class QuantizationSpace(Strict):
    method: Choice = "none"                # none | dynamic_int8 | static_int8 (ONNX Runtime; needs
                                           # --latency-backend onnxruntime, where the int8 graph runs)
    calibration_samples: Choice = 512      # static_int8: training rows calibrating activation ranges


class SpaceSpec(Strict):
    pruning: PruningSpace = PruningSpace()
    weighting: WeightingSpace = WeightingSpace()
    fusion: FusionSpace = FusionSpace()
    finetune: FinetuneSpace = FinetuneSpace()
    quantization: QuantizationSpace = QuantizationSpace()

    @classmethod
    def from_yaml(cls, path) -> "SpaceSpec":
        data = read_yaml(path, "space file") or {}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PrunefuseError(validation_message(str(path), exc)) from None


# Knobs drawn as whole numbers when given as a range.
INTEGER_KNOBS = {"pruning.steps", "pruning.round_to", "finetune.batch_size", "quantization.calibration_samples"}


def _suggest(trial, name: str, choice: Choice):
    """Turn one spec entry into a value: fixed, categorical, or a float/int range."""
    if isinstance(choice, Range):
        return Knob(choice.low, choice.high, log=choice.log, integer=name in INTEGER_KNOBS).suggest(trial, name)
    if isinstance(choice, list):
        return choice[0] if len(choice) == 1 else trial.suggest_categorical(name, choice)
    return choice



def _corners(choice: Choice) -> list:
    """The values an entry can take at its edges: a range's ends, a list's items, a scalar."""
    if isinstance(choice, Range):
        return [choice.low, choice.high]
    return list(choice) if isinstance(choice, list) else [choice]


# What each entry may hold, checked before a search starts (a bad draw would otherwise fail
# trials one by one, after the base was trained). The rules are the Policy's own: each entry
# names the policy field its values go to, and its bounds and allowed names are read from
# that field, so a rule is stated once.
_POLICY_FIELD = {
    "pruning.mode": (Pruning, "mode"), "pruning.aggregate": (Pruning, "aggregate"),
    "pruning.steps": (Pruning, "steps"), "pruning.round_to": (Pruning, "round_to"),
    "pruning.sparsity": (Pruning, "global_sparsity"), "weighting.weight": (Weighting, "weights"),
    "fusion.coefficient": (Fusion, "coefficients"), "fusion.finetune_epochs": (Fusion, "finetune_epochs"),
    "finetune.epochs": (Finetune, "epochs"), "finetune.lr": (Finetune, "lr"),
    "finetune.batch_size": (Finetune, "batch_size"), "finetune.precision": (Finetune, "precision"),
    "finetune.distill.weight": (Distill, "weight"), "finetune.distill.temperature": (Distill, "temperature"),
    "finetune.distill.teacher": (Distill, "teacher"),
    "quantization.method": (Quantization, "method"),
    "quantization.calibration_samples": (Quantization, "calibration_samples"),
}
_ALLOWED = {"pruning.scope": ("layerwise", "global")}  # a space-only choice: no policy field holds it


def _field_rule(where: str):
    """(allowed names or None, (low, high) or None) of the policy field behind entry `where`."""
    if where in _ALLOWED:
        return _ALLOWED[where], None
    if where not in _POLICY_FIELD:
        return None, None
    section, name = _POLICY_FIELD[where]
    field = section.model_fields[name]
    annotation, metadata = field.annotation, list(field.metadata)
    while get_origin(annotation) in (Union, dict, Annotated):
        # Optional[X], dict[str, X], Union[X, ...], Annotated[X, rule]: the rule is X's
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is Annotated:
            metadata += [m for a in args[1:] for m in getattr(a, "metadata", [a])]
        annotation = args[-1] if get_origin(annotation) is dict else args[0]
    if get_origin(annotation) is Literal:
        return get_args(annotation), None
    low = next((m.ge for m in metadata if isinstance(m, Ge)), None)
    low = next((m.gt for m in metadata if isinstance(m, Gt)), low)
    high = next((m.le for m in metadata if isinstance(m, Le)), None)
    if low is None and high is None:
        return None, None
    return None, (float("-inf") if low is None else low, float("inf") if high is None else high)


def _check_entry(where: str, choice: Choice) -> None:
    if isinstance(choice, Range):
        if choice.low > choice.high:
            raise PrunefuseError(f"space: {where} has low {choice.low} > high {choice.high}")
        if choice.log and choice.low <= 0:
            raise PrunefuseError(f"space: {where} is a log range, so low must be > 0 (got {choice.low})")
        if where in INTEGER_KNOBS and not (float(choice.low).is_integer() and float(choice.high).is_integer()):
            raise PrunefuseError(f"space: {where} takes whole numbers; got {choice.low}..{choice.high}")
    if isinstance(choice, list) and not choice:
        raise PrunefuseError(f"space: {where} is an empty list; give at least one value")
    allowed, bounds = _field_rule(where)
    for value in _corners(choice):
        if allowed is not None and value not in allowed:
            raise PrunefuseError(f"space: {where} {value!r} is not one of: {', '.join(allowed)}")
        if bounds is not None:
            low, high = bounds
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PrunefuseError(f"space: {where} takes numbers; got {value!r}")
            if where in INTEGER_KNOBS and not isinstance(choice, Range) and not isinstance(value, int):
                raise PrunefuseError(f"space: {where} takes whole numbers; got {value!r}")
            if not low <= value <= high:
                reach = f"reaches {value}" if value > high else f"goes down to {value}"
                raise PrunefuseError(f"space: {where} {reach}; expected {low} <= value <= {high}")
        if where in ("pruning.importance", "weighting.method", "fusion.method") and \
                value is not None and not isinstance(value, str):
            raise PrunefuseError(f"space: {where} takes names; got {value!r}")


class SearchSpace:
    """Composes a SpaceSpec with the model's layers, the suite's tasks and each method's knobs.

    layers: the names that decide pruning, one sparsity each (the model's coupled groups,
    `mtl_models.pruning.coupled_groups`).

    suite / model: the specs copied into every policy (they rebuild the suite and model).
    fusion_knobs / weighting_knobs: method name -> {knob: Knob} (mtl_models.fusion.KNOBS, ...).
    importances: the pruning criteria's names (mtl_models.pruning.IMPORTANCES).
    """

    def __init__(self, spec: SpaceSpec, *, layers: list[str], tasks: list[str], suite: dict,
                 model: dict, fusion_knobs: Optional[dict] = None, weighting_knobs: Optional[dict] = None,
                 merge_groups: Optional[list[str]] = None, base: Optional[dict] = None,
                 importances: Optional[list[str]] = None, seed: int = 0):
        self.spec, self.layers, self.tasks = spec, list(layers), list(tasks)
        self.suite, self.model, self.seed = dict(suite), dict(model), seed
        self.base = dict(base or {})
        self.fusion_knobs = fusion_knobs or {}
        self.weighting_knobs = weighting_knobs or {}
        self.merge_groups = list(merge_groups or [])
        self.importances = list(importances or [])
        self._check()

    def _check(self):
        for name, knobs in (("fusion method", self.fusion_knobs), ("weighting method", self.weighting_knobs)):
            field = self.spec.fusion.method if name == "fusion method" else self.spec.weighting.method
            options = field if isinstance(field, list) else [field]
            for option in options:
                if option not in (None, "none") and knobs and option not in knobs:
                    raise PrunefuseError(f"space: unknown {name} {option!r}; expected one of: {', '.join(sorted(knobs))}")
        for where, choice in self._entries():
            _check_entry(where, choice)
        for value in _corners(self.spec.pruning.importance):
            if self.importances and value not in self.importances:
                raise PrunefuseError(f"space: unknown pruning importance {value!r}; expected one of: "
                                     f"{', '.join(self.importances)}")

    def _entries(self):
        for section in ("pruning", "weighting", "fusion", "finetune", "quantization"):
            part = getattr(self.spec, section)
            for field in type(part).model_fields:
                value = getattr(part, field)
                if isinstance(value, DistillSpace):  # a nested section: its own entries
                    for sub in type(value).model_fields:
                        yield f"{section}.{field}.{sub}", getattr(value, sub)
                elif field != "layerwise" and field != "distill":
                    yield f"{section}.{field}", value

    @property
    def precisions(self) -> list:
        """Every fine-tune precision a trial may draw (checked against the trials' device)."""
        return _corners(self.spec.finetune.precision)

    @property
    def quantizes(self) -> bool:
        """Whether a trial may draw an int8 method (its latency is then ONNX Runtime's)."""
        return any(m != "none" for m in _corners(self.spec.quantization.method))

    @property
    def fuses(self) -> bool:
        m = self.spec.fusion.method
        return any(x not in (None, "none") for x in (m if isinstance(m, list) else [m]))

    def control_policy(self) -> Policy:
        """The equal-budget dense control: no fusion, nothing pruned, no quantization, and the
        trials' fine-tune. Where the space draws a fine-tune knob, the control takes the most
        training a trial can get (the largest epochs) and the first value of the others, so a
        trial can never look better than the control for having trained longer. Weighting:
        the space's method when it is one fixed method other than `static` (whose weights
        are drawn per trial), else `equal`; its knobs at their defaults."""
        f, w = self.spec.finetune, self.spec.weighting
        finetune = {k: _corners(getattr(f, k))[0] for k in ("lr", "batch_size", "precision")}
        finetune["epochs"] = max(_corners(f.epochs))
        methods = _corners(w.method)
        method = methods[0] if len(methods) == 1 and methods[0] != "static" else "equal"
        return Policy.from_dict({
            "schema": POLICY_SCHEMA, "suite": self.suite, "model": self.model, "base": self.base,
            "weighting": {"method": method}, "finetune": finetune, "seed": self.seed,
        }, source="search space (dense control)")

    def hardest_pruning(self) -> list[Policy]:
        """The hardest pruning a trial may draw, once per mode, scope (and, structured,
        round_to) the space allows: every layer (or, global, all together) at the highest
        sparsity, nothing else changed. A search applies these to a fresh model before it
        trains anything (fail fast)."""
        p, out = self.spec.pruning, []
        highest = float(max(_corners(p.sparsity)))
        for mode in _corners(p.mode):
            for round_to in (_corners(p.round_to) if mode == "structured" else [1]):
                for scope in _corners(p.scope):
                    where = {"global_sparsity": highest} if scope == "global" else \
                        {"sparsity": {layer: highest for layer in self.layers}}
                    out.append(Policy.from_dict({
                        "schema": POLICY_SCHEMA, "suite": self.suite, "model": self.model, "seed": self.seed,
                        "pruning": {"mode": mode, "importance": "l2", "round_to": int(round_to), **where},
                    }, source="search space"))
        return out

    def suggest(self, trial) -> Policy:
        """Define-by-run: sample one policy on an Optuna trial."""
        return Policy.from_dict({
            "schema": POLICY_SCHEMA, "suite": self.suite, "model": self.model, "base": self.base,
            "weighting": self._weighting(trial), "fusion": self._fusion(trial),
            "pruning": self._pruning(trial), "finetune": self._finetune(trial),
            "quantization": self._quantization(trial), "seed": self.seed,
        }, source="search space")

    def _pruning(self, trial) -> dict:
        p = self.spec.pruning
        out = {k: _suggest(trial, f"pruning.{k}", getattr(p, k)) for k in ("mode", "importance", "steps")}
        if out["importance"] == "multitask_taylor":
            out["aggregate"] = _suggest(trial, "pruning.aggregate", p.aggregate)
        if out["mode"] == "structured":
            out["round_to"] = _suggest(trial, "pruning.round_to", p.round_to)
        if _suggest(trial, "pruning.scope", p.scope) == "global":
            out["global_sparsity"] = _suggest(trial, "pruning.global_sparsity", p.sparsity)
        else:
            out["sparsity"] = {layer: _suggest(trial, f"sparsity.{layer}", p.sparsity) for layer in self.layers}
        return out

    def _weighting(self, trial) -> dict:
        w = self.spec.weighting
        method = _suggest(trial, "weighting.method", w.method)
        out: dict[str, Any] = {"method": method}
        if method == "static":
            out["weights"] = {t: _suggest(trial, f"weight.{t}", w.weight) for t in self.tasks}
        knobs = self.weighting_knobs.get(method, {})
        out["params"] = {k: knob.suggest(trial, f"weighting.{method}.{k}") for k, knob in knobs.items()}
        return out

    def _fusion(self, trial):
        f = self.spec.fusion
        method = _suggest(trial, "fusion.method", f.method)
        if method in (None, "none"):
            return None
        if f.layerwise:
            coefficients = {t: {g: _suggest(trial, f"coef.{t}.{g}", f.coefficient) for g in self.merge_groups}
                            for t in self.tasks}
        else:
            coefficients = {t: _suggest(trial, f"coef.{t}", f.coefficient) for t in self.tasks}
        knobs = self.fusion_knobs.get(method, {})
        return {"method": method, "coefficients": coefficients,
                "params": {k: knob.suggest(trial, f"fusion.{method}.{k}") for k, knob in knobs.items()},
                "finetune_epochs": _suggest(trial, "fusion.finetune_epochs", f.finetune_epochs)}

    def _finetune(self, trial) -> dict:
        f = self.spec.finetune
        out = {k: _suggest(trial, f"finetune.{k}", getattr(f, k)) for k in ("epochs", "lr", "batch_size", "precision")}
        if f.distill is not None:
            out["distill"] = {k: _suggest(trial, f"finetune.distill.{k}", getattr(f.distill, k))
                              for k in ("weight", "temperature", "teacher")}
        return out

    def _quantization(self, trial) -> dict:
        q = self.spec.quantization
        out = {"method": _suggest(trial, "quantization.method", q.method)}
        if out["method"] == "static_int8":
            out["calibration_samples"] = _suggest(trial, "quantization.calibration_samples", q.calibration_samples)
        return out
