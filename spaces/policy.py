"""Policy: the exported artifact. Plain, frozen, validated data with an exact YAML round-trip.

Every field means something without the search that produced it: `prunefuse apply` rebuilds
the suite and model from `suite` and `model`, runs the cycle with this policy and seed, and
gets the model the trial measured. Unknown keys are rejected (a typo must not pass silently).
Names (suite, trunk, methods, layers) are checked against the registries and the model when
the policy is applied, since `spaces` imports no torch.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from .errors import PrunefuseError
from .files import atomic_write_text, read_yaml, validation_message
from .vocabulary import POLICY_SCHEMA

SCHEMA = POLICY_SCHEMA
# Training precision: fp32, or autocast to bf16 / fp16 (fp16 with a grad scaler, on CUDA only;
# the rule is mtl_models.training.device.check_precision).
Precision = Literal["fp32", "bf16", "fp16"]
MAX_SPARSITY = 0.95  # no layer pruned to zero width (mtl_models.pruning reads it from here)

# A method's knobs: whole numbers stay ints (a DARE or RLW seed), the rest are floats.
Knobs = dict[str, Union[StrictInt, float]]
TaskWeight = Annotated[float, Field(ge=0.0)]
Coefficient = Annotated[float, Field(ge=-10.0, le=10.0)]  # λ scales a task vector; beyond ±10 it only explodes


class Strict(BaseModel):
    # NaN / inf in any float field is refused: a NaN bound passes every `<=` check.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Weighting(Strict):
    """How task losses are combined: a method from mtl_models.training.weighting.METHODS and its knobs."""
    method: str = "equal"
    weights: Optional[dict[str, TaskWeight]] = None  # for `static`: task -> weight >= 0
    params: Knobs = {}                          # the method's own knobs (dwa temperature, gradnorm alpha)


class Fusion(Strict):
    """Merging per-task experts into one trunk: a method from mtl_models.fusion.METHODS."""
    method: str
    # task -> λ, or task -> {layer group: λ} for layer-wise coefficients.
    coefficients: dict[str, Union[Coefficient, dict[str, Coefficient]]]
    params: Knobs = {}                          # density, scale, drop_rate, seed
    finetune_epochs: float = Field(0.0, ge=0.0, le=100.0)  # post-merge fine-tune with the policy's weighting


class Pruning(Strict):
    mode: Literal["structured", "unstructured"] = "structured"
    importance: str = "l2"
    aggregate: Literal["mean", "min", "max", "vote"] = "max"  # multitask_taylor only
    steps: int = Field(1, ge=1, le=50)        # 1 = one-shot; n = cubic train-prune cycles
    global_sparsity: Optional[float] = Field(None, ge=0.0, le=MAX_SPARSITY)
    sparsity: dict[str, float] = {}        # layer name -> fraction of units (or weights) removed
    round_to: int = Field(1, ge=1, le=1024)  # structured: kept widths rounded to a multiple (kernel blocks)

    @field_validator("sparsity")
    @classmethod
    def _in_range(cls, v):
        for layer, s in v.items():
            if not 0.0 <= s <= MAX_SPARSITY:
                raise ValueError(f"sparsity of {layer} is {s}; expected 0 <= sparsity <= {MAX_SPARSITY}")
        return v

    @model_validator(mode="after")
    def _round_to_needs_channels(self):
        if self.round_to != 1 and self.mode != "structured":
            raise ValueError(f"round_to={self.round_to} rounds kept channels; it needs mode 'structured'")
        return self


class Distill(Strict):
    """Knowledge distillation in the fine-tune (mtl_models.training.distill): KL at `temperature` for
    class-logit heads, MSE to the teacher's outputs for the others, mixed in by `weight`."""
    weight: float = Field(1.0, ge=0.0, le=100.0)
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    teacher: Literal["dense", "fused"] = "dense"  # the dense base, or the (fused) model before pruning


class Finetune(Strict):
    epochs: float = Field(2.0, ge=0.0, le=100.0)  # total; spread evenly over the pruning steps
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(256, ge=1, le=1 << 20)
    precision: Precision = "fp32"             # latency is also timed in bf16 / fp16 on CUDA
    distill: Optional[Distill] = None         # None: labels only


class Quantization(Strict):
    """Post-training int8 quantization after the fine-tune (mtl_models.deployment.quantize, by ONNX Runtime);
    the quantized model is the one measured, exported and timed in ONNX Runtime."""
    method: Literal["none", "dynamic_int8", "static_int8"] = "none"
    calibration_samples: int = Field(512, ge=1, le=1 << 20)  # static_int8: training rows calibrating activations


class CheckpointFile(Strict):
    """A user's weights file (or Hugging Face folder) and the SHA-256 of what was read from it."""
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Base(Strict):
    """How the dense base (and the task experts) this policy starts from were trained."""
    epochs: float = Field(15.0, ge=0.0)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(256, ge=1)
    expert_epochs: float = Field(3.0, ge=0.0)
    expert_lr: Optional[float] = Field(None, gt=0.0)  # None: the base's lr
    expert_preserve: float = Field(1.0, ge=0.0)       # keeps the other tasks' predictions (0: plain)
    seed: int = 0
    precision: Precision = "fp32"             # base, experts and references
    checkpoint: Optional[str] = None          # a user's trained base (--base-checkpoint) instead of training
    checkpoint_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")  # apply refuses a changed file
    experts: Optional[dict[str, CheckpointFile]] = None  # a user's experts (--experts TASK=PATH), per task


class Policy(Strict):
    schema_: Literal[POLICY_SCHEMA] = Field(SCHEMA, alias="schema")
    suite: dict[str, Any]                     # {name: multidigits, seed: 0, ...}: rebuilds the suite
    model: dict[str, Any]                     # {trunk: mlp, width: 256, ...}: rebuilds the model
    base: Base = Base()
    weighting: Weighting = Weighting()
    fusion: Optional[Fusion] = None
    pruning: Pruning = Pruning()
    finetune: Finetune = Finetune()
    quantization: Quantization = Quantization()
    seed: int = 0
    provenance: Optional[dict[str, Any]] = None  # written by export: experiment, trial, metrics

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @field_validator("suite")
    @classmethod
    def _suite_named(cls, v):
        if not isinstance(v.get("name"), str):
            raise ValueError("suite needs a 'name'")
        return v

    @field_validator("model")
    @classmethod
    def _model_named(cls, v):
        if not isinstance(v.get("trunk"), str):
            raise ValueError("model needs a 'trunk'")
        return v

    # --- conversions ---
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)

    @classmethod
    def from_dict(cls, data, source: str = "policy") -> "Policy":
        if not isinstance(data, dict):
            raise PrunefuseError(f"{source}: expected a mapping with a 'schema: {SCHEMA}' line, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            raise PrunefuseError(f"{source}: schema is {data.get('schema')!r}; expected {SCHEMA!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PrunefuseError(validation_message(source, exc)) from None

    def to_yaml(self, path=None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path) -> "Policy":
        return cls.from_dict(read_yaml(path, "policy file"), source=str(path))

    def replace(self, **changes) -> "Policy":
        return Policy.from_dict({**self.to_dict(), **changes})


# --- a fusion section learned in a trial (AdaMerging's coefficients) ---

def learned_fusion_record(policy: Policy) -> str:
    """The fusion section of a policy whose coefficients a trial learned, as the JSON text its
    results carry under `spaces.vocabulary.LEARNED_FUSION`."""
    return json.dumps(policy.to_dict()["fusion"], sort_keys=True)


def with_learned_fusion(policy, record):
    """A trial's proposed policy (a dict) with the fusion section it learned, where its results
    recorded one: what its export holds, so `apply` merges without learning again."""
    if not isinstance(record, str) or not isinstance(policy, dict):
        return policy
    try:
        fusion = json.loads(record)
    except ValueError:
        return policy  # a damaged record: the proposed policy (apply then learns again)
    return {**policy, "fusion": fusion} if isinstance(fusion, dict) else policy
