"""Task-weighting methods: how per-task losses become the one scalar the loop backprops.

`make_weighter({"method": "dwa", "temperature": 2.0}, tasks)` builds a `Weighter`. The
training loop, each step, calls `combine(losses, shared_params=trunk_params)` and
`.backward()`s the result; it adds `parameters()` (uncertainty's log-variances) to its
optimizer as their own parameter group, at `param_lr` (None = the model's lr), calls
`end_epoch(mean_losses)` after each epoch. `state_dict()` / `load_state_dict()` carry a
weighter's own state (DWA's loss history, GradNorm's weights and optimizer) for a caller
that checkpoints mid-training; the trial loop does not (a trial restarts from its policy).
K below is the number of tasks.

Spec values are checked for validity (a temperature must be > 0), not against the
`KNOBS` ranges: those bound the search, and the search space checks them itself.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from spaces.errors import PrunefuseError
from spaces.knobs import Knob
from spaces.registry import Registry


def _number(method: str, key: str, value, *, allow_zero: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise PrunefuseError(f"{method} {key} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


class Weighter:
    """Shared checks; subclasses implement `_combine(L, shared_params)` on the (K,) loss vector."""

    # Learning rate for `parameters()` in the loop's optimizer; None = the model's lr.
    param_lr: float | None = None

    def __init__(self, tasks):
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"weighting needs distinct task names, got {self.tasks}")

    def combine(self, losses: dict[str, torch.Tensor], *, shared_params=()) -> torch.Tensor:
        if set(losses) != set(self.tasks):
            raise ValueError(f"losses are for tasks {sorted(losses)}, expected {sorted(self.tasks)}")
        L = torch.stack([losses[t].reshape(()) for t in self.tasks])
        if not bool(torch.isfinite(L.detach()).all()):  # one sync per step, not one per task
            name, value = next((t, v) for t, v in zip(self.tasks, L.detach().tolist()) if not math.isfinite(v))
            raise FloatingPointError(f"loss of task {name!r} is {value}")
        return self._combine(L, list(shared_params))

    def parameters(self) -> list[nn.Parameter]:
        return []

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        pass

    def weights(self) -> dict[str, float]:
        return dict(zip(self.tasks, self._weight_vector().tolist()))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


class Equal(Weighter):
    """Σ_t L_t: every task weighs 1, the baseline the other methods are measured against."""

    def _combine(self, L, shared_params):
        return L.sum()

    def _weight_vector(self):
        return torch.ones(len(self.tasks))


class Static(Weighter):
    """Σ_t w_t L_t with fixed w, normalised to Σ w_t = K so equal weights reproduce `equal`
    (and the loss scale, hence the effective learning rate, does not depend on the weights)."""


    def __init__(self, tasks, *, weights=None):
        super().__init__(tasks)
        if not isinstance(weights, dict):
            raise PrunefuseError(f"static weighting needs 'weights': a mapping task -> weight for tasks {self.tasks}")
        missing = [t for t in self.tasks if t not in weights]
        extra = [t for t in weights if t not in self.tasks]
        if missing or extra:
            raise PrunefuseError(f"static weights: missing {missing}, unknown {extra}; expected exactly tasks {self.tasks}")
        raw = [_number("static", f"weight of {t!r}", weights[t], allow_zero=True) for t in self.tasks]
        if sum(raw) == 0:
            raise PrunefuseError(f"static weights are all zero; give at least one of {self.tasks} a positive weight")
        self.w = torch.tensor(raw) * (len(raw) / sum(raw))

    def _combine(self, L, shared_params):
        return (self.w.to(L) * L).sum()

    def _weight_vector(self):
        return self.w


UNCERTAINTY_LR = 0.02  # see Uncertainty's docstring and benchmarks/weighting.py
UNCERTAINTY_INITS = ("first_loss", "zero")


class Uncertainty(Weighter):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018):
    loss = Σ_t L_t / (2·e^{s_t}) + s_t / 2, with s_t = log σ_t² learned.

    Learning s (not σ) keeps the weight positive and the optimisation unconstrained; the
    optimum for a fixed L_t is e^{s_t} = L_t. The loss is always the paper's formula; two
    practical choices differ from the paper's plain setup, both chosen on held-out seeds of
    the scaled synthetic suite (benchmarks/weighting.py, seeds 3-5, selection on val Δm):

    - `lr` (default UNCERTAINTY_LR = 0.02) is the learning rate of s in the loop's Adam,
      which puts s in its own parameter group (`param_lr`). At the model's lr (1e-3) Adam
      moves s by ~1e-3 per step, so reaching log L_t for a loss ~100x another's takes
      thousands of steps, longer than a short run: the weights stay ~equal while the large
      task shapes the shared trunk. The paper learns s jointly but does not tie its step
      size to the network's; a separate, larger lr for the log-variances is the usual
      practical choice.
    - `init` "first_loss" (default) sets s_t = log L_t from the first training batch's
      losses (the first combine() under autograd), i.e. at the optimum for those losses, so
      every task starts at weight 1/(2 L_t) instead of waiting for s to climb there;
      "zero" is the paper's s_t = 0 (then with one task the loss starts at L/2 + 0).
      Either way the gradient w.r.t. the model is Σ_t ∇L_t / (2e^{s_t}): with one task it
      points the same way as ∇L.
    """


    def __init__(self, tasks, *, lr=UNCERTAINTY_LR, init="first_loss"):
        super().__init__(tasks)
        self.param_lr = _number("uncertainty", "lr", lr, allow_zero=False)
        if init not in UNCERTAINTY_INITS:
            raise PrunefuseError(f"uncertainty init must be one of {', '.join(UNCERTAINTY_INITS)}; got {init!r}")
        self.init = init
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))
        self.initialised = init == "zero"  # "first_loss": set at the first training step

    def _combine(self, L, shared_params):
        if self.log_var.device != L.device:
            # Follow the model to its device; `.data` keeps the Parameter object the
            # loop's optimizer holds (this happens on the first step, before any state).
            self.log_var.data = self.log_var.data.to(L.device)
        if not self.initialised and torch.is_grad_enabled() and L.requires_grad:
            with torch.no_grad():
                self.log_var.copy_(L.detach().to(self.log_var.dtype).clamp_min(1e-12).log())
            self.initialised = True
        s = self.log_var.to(L.dtype)
        return (L / (2 * torch.exp(s)) + s / 2).sum()

    def parameters(self):
        return [self.log_var]

    def _weight_vector(self):  # the factor multiplying each L_t
        return 0.5 * torch.exp(-self.log_var.detach().float().cpu())

    def state_dict(self):
        return {"log_var": self.log_var.detach().cpu().clone(), "initialised": self.initialised}

    def load_state_dict(self, d):
        with torch.no_grad():
            self.log_var.copy_(d["log_var"])
        self.initialised = bool(d.get("initialised", True))


class DWA(Weighter):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019):
    λ_k = K·exp(w_k / T) / Σ_i exp(w_i / T), w_k = L_k(epoch−1) / L_k(epoch−2).

    A task whose loss fell less over the last epoch gets more weight. Weights are 1 for
    the first two epochs, when there are not yet two epochs of averages to compare.
    """


    def __init__(self, tasks, *, temperature=2.0):
        super().__init__(tasks)
        self.temperature = _number("dwa", "temperature", temperature, allow_zero=False)
        self.history: list[list[float]] = []  # the last two epochs' mean losses, task order

    def end_epoch(self, mean_losses):
        self.history = (self.history + [[float(mean_losses[t]) for t in self.tasks]])[-2:]

    def _weight_vector(self):
        if len(self.history) < 2:
            return torch.ones(len(self.tasks))
        older, last = (torch.tensor(h, dtype=torch.float64) for h in self.history)
        ratio = last / older.clamp_min(1e-12)  # a loss already at 0 must not divide by 0
        return (len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)).float()

    def _combine(self, L, shared_params):
        return (self._weight_vector().to(L) * L).sum()

    def state_dict(self):
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, d):
        self.history = [list(map(float, h)) for h in d["history"]]


class RLW(Weighter):
    """Random Loss Weighting (Lin et al., "Reasonable Effectiveness of Random Weighting",
    TMLR 2022): each step λ = softmax(z), z ~ N(0, I_K); loss = Σ_t λ_t L_t.

    As in the paper the weights lie on the simplex (λ_t >= 0, Σ λ_t = 1, NOT scaled by K),
    so the loss is on average ~1/K of `equal`'s. Samples come from a private generator
    seeded by spec "seed" (default 0), so a trial is reproducible and checkpointable.
    """


    def __init__(self, tasks, *, seed=0):
        super().__init__(tasks)
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)  # a whole float (3.0) from a hand-written YAML or JSON counts as 3
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PrunefuseError(f"rlw seed must be an integer, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)
        self.last = torch.full((len(self.tasks),), 1.0 / len(self.tasks))  # before any draw: the mean

    def _combine(self, L, shared_params):
        self.last = torch.softmax(torch.randn(len(self.tasks), generator=self.generator), dim=0)
        return (self.last.to(L) * L).sum()

    def _weight_vector(self):
        return self.last

    def state_dict(self):
        return {"generator": self.generator.get_state(), "last": self.last.clone()}

    def load_state_dict(self, d):
        self.generator.set_state(d["generator"])
        self.last = d["last"].clone()


class GradNorm(Weighter):
    """GradNorm (Chen et al., ICML 2018): learn task weights w (init 1) so that each task's
    gradient norm on the last shared layer W, G_t = ||∇_W w_t L_t||, tracks
    target_t = mean(G) · r_t^α, r_t = L̃_t / mean(L̃), L̃_t = L_t / L_t(0).
    Each combine() takes one step of its own Adam (lr 0.025) on Σ_t |G_t − target_t|
    (target held constant, as in the paper), then renormalises Σ w_t = K, and returns
    Σ_t w_t L_t with w detached, so the model never sees the GradNorm loss's gradient.

    W is the last tensor of `shared_params` with dim >= 2 (a Linear/Conv weight: biases
    and norm scales are skipped), falling back to the last one. Because w_t is a scalar,
    ||∇_W(w_t L_t)|| = w_t·||∇_W L_t||: we take ||∇_W L_t|| without create_graph and
    differentiate w_t·||∇_W L_t|| w.r.t. w alone. This has the same value and w-gradient
    as the double-backward form, costs no second-order graph, and cannot touch the model.
    Outside autograd (torch.no_grad, e.g. validation) it only combines, without a step.
    """


    def __init__(self, tasks, *, alpha=1.5, lr=0.025):
        super().__init__(tasks)
        self.alpha = _number("gradnorm", "alpha", alpha, allow_zero=True)
        self.lr = _number("gradnorm", "lr", lr, allow_zero=False)
        self.w = torch.ones(len(self.tasks), requires_grad=True)
        self.initial: torch.Tensor | None = None  # L_t(0), recorded at the first step
        self._opt: torch.optim.Adam | None = None  # built at the first step, on w's final device
        self._pending_opt: dict | None = None      # optimizer state loaded before it exists

    def _combine(self, L, shared_params):
        if self._opt is None:
            self.w.data = self.w.data.to(L.device)
            self._opt = torch.optim.Adam([self.w], lr=self.lr)
            if self._pending_opt is not None:
                self._opt.load_state_dict(self._pending_opt)
                self._pending_opt = None
        # clone: _step updates w in place, and autograd saved this factor for L's backward.
        total = (self.w.detach().clone().to(L.dtype) * L).sum()
        if torch.is_grad_enabled() and L.requires_grad:
            self._step(L, shared_params)
        return total

    def _step(self, L, shared_params):
        live = [p for p in shared_params if p.requires_grad]
        if not live:
            raise ValueError("gradnorm needs the trunk's parameters as shared_params")
        W = next((p for p in reversed(live) if p.dim() >= 2), live[-1])
        norms = []
        for i in range(len(self.tasks)):  # retain_graph: the loop still backprops L afterwards
            (g,) = torch.autograd.grad(L[i], W, retain_graph=True, allow_unused=True)
            norms.append(torch.zeros((), device=L.device) if g is None else g.detach().float().norm())
        G = self.w * torch.stack(norms)
        losses = L.detach().float()
        if self.initial is None:
            self.initial = losses.clone()
        ratio = losses / self.initial.to(losses).clamp_min(1e-12)
        target = (G.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        (self.w.grad,) = torch.autograd.grad((G - target).abs().sum(), [self.w])
        self._opt.step()
        with torch.no_grad():  # keep w > 0 (G_t = w_t·||∇L_t|| needs it), then Σ w_t = K
            self.w.clamp_(min=1e-4)
            self.w.mul_(len(self.tasks) / self.w.sum())

    def _weight_vector(self):
        return self.w.detach().cpu()

    def state_dict(self):
        opt = self._opt.state_dict() if self._opt is not None else self._pending_opt
        return {"w": self.w.detach().cpu().clone(),
                "initial": None if self.initial is None else self.initial.cpu().clone(),
                "optimizer": copy.deepcopy(opt)}

    def load_state_dict(self, d):
        with torch.no_grad():
            self.w.copy_(d["w"])
        self.initial = None if d["initial"] is None else d["initial"].clone()
        if self._opt is not None and d["optimizer"] is not None:
            self._opt.load_state_dict(d["optimizer"])
        else:
            self._pending_opt = d["optimizer"]


# name -> Weighter class; the spec keys a method takes are its constructor's keyword-only
# arguments, and its searchable knobs' defaults are theirs. Static's per-task weights are the
# search space's own business.
METHODS = Registry("weighting method")
METHODS.register("equal")(Equal)
METHODS.register("static")(Static)
METHODS.register("uncertainty", knobs={"lr": Knob(1e-3, 0.1, log=True)})(Uncertainty)
METHODS.register("dwa", knobs={"temperature": Knob(0.5, 5.0)})(DWA)
METHODS.register("rlw", needs=("seed",))(RLW)
METHODS.register("gradnorm", knobs={"alpha": Knob(0.0, 3.0)})(GradNorm)
KNOBS = METHODS.knobs


def make_weighter(spec: dict, tasks: list[str]) -> Weighter:
    """Build the weighter `spec` names, e.g. {"method": "dwa", "temperature": 2.0}."""
    spec = dict(spec)
    if "method" not in spec:
        raise PrunefuseError(f"weighting spec needs a 'method'; expected one of: {', '.join(sorted(METHODS))}")
    name = spec.pop("method")
    method = METHODS.method(name)
    for key in spec:
        if key not in method.params:
            valid = ", ".join(("method",) + method.params)
            raise PrunefuseError(f"unknown key {key!r} for weighting method {name!r}; valid keys: {valid}")
    return method.fn(tasks, **spec)
