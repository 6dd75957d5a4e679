"""`merge`: check the experts against the base, then merge them key by key with a method.

Statistics are not task vectors: non-learned buffers (BatchNorm's running_mean,
running_var, num_batches_tracked, any registered buffer; `buffers=`) and every non-float
tensor are copied from the base. Averaged or DARE-rescaled, a running variance goes
negative and the merged model outputs NaN.
A nan or inf in the base or an expert raises `PrunefuseError` naming the key and
model rather than silently poisoning the merge: found key by key on what the merge computes
anyway (a float32 sum of the task vectors or of the merged key, which any nan or inf reaches),
then named by checking that key of each model; nothing is returned before.
A method with a `streamed` form (TIES, task arithmetic, average) merges each key chunk by chunk
(`KeyInputs`): no whole task vector exists, only the merged copy. Those and the methods marked
`keys_in_parallel` (the singular ones) run their ops single-threaded, keys side by side
(`_keys_in_parallel`): the merge is then the same bit for bit at any thread count.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor

from spaces.errors import PrunefuseError, unknown_name

from . import cache, select
from .registry import METHODS


def layer_group(key: str) -> str:
    """`trunk.0.weight` -> `trunk.0`; a key without a dot is its own group."""
    return key.rpartition(".")[0] or key


def layer_groups(state: Mapping[str, Tensor]) -> list[str]:
    """The groups a layer-wise coefficient dict must cover (float tensors only)."""
    return list(dict.fromkeys(layer_group(k) for k, v in state.items() if v.is_floating_point()))


# --- entry point ---------------------------------------------------------------

def check_params(method: str, params: Mapping) -> None:
    """Each of `params` is a knob `method` takes (its keyword-only arguments)."""
    METHODS.check_params(method, params)


def _finite(t: Tensor) -> bool:
    """No nan or inf in `t`: its float64 sum is finite (float32 entries cannot overflow a float64
    sum), one pass without the bool tensor `isfinite` makes (46 s of a BERT-base TIES merge)."""
    if t.dtype == torch.float64:  # its sum could overflow where no entry does
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def _maybe_finite(t: Tensor) -> bool:
    """False whenever `t` holds a nan or inf (and, rarely, where its float32 sum overflows):
    the cheap screen `merge` runs on what it computes anyway; `_name_non_finite` decides."""
    return bool(torch.isfinite(t.sum()))


def _name_non_finite(key: str, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Raise naming the first model whose `key` holds a nan or inf; none: the screen saw an overflow."""
    for who, state in [("base", base), *((f"task {t!r}", sd) for t, sd in experts.items())]:
        if state[key].is_floating_point() and not _finite(state[key]):
            raise PrunefuseError(f"key {key!r} of {who} contains nan or inf")


def _check_state(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Keys and shapes; nan and inf are found key by key as `merge` goes (no pass of its own
    over every model: 4 float64 sums were a sixth of a BERT-base TIES merge)."""
    if not experts:
        raise PrunefuseError("no experts to merge; pass at least one task's state dict")
    for who, state in [("base", base), *((f"task {t!r}", sd) for t, sd in experts.items())]:
        for key in sorted(state.keys() - base.keys()):
            raise PrunefuseError(f"key {key!r} of {who} is not in the base state dict")
        for key, ref in base.items():
            if key not in state:
                raise PrunefuseError(f"key {key!r} is missing from {who}")
            t = state[key]
            if t.shape != ref.shape:
                raise PrunefuseError(f"key {key!r} of {who} has shape {tuple(t.shape)}, "
                                     f"base has {tuple(ref.shape)}")


def _check_coefficients(base: Mapping[str, Tensor], experts: Mapping, coefficients: Mapping) -> None:
    if missing := [t for t in experts if t not in coefficients]:
        raise PrunefuseError(f"no coefficient for task(s) {', '.join(map(repr, missing))}")
    if extra := [t for t in coefficients if t not in experts]:
        raise PrunefuseError(f"coefficient for unknown task(s) {', '.join(map(repr, extra))}; "
                             f"experts are: {', '.join(map(repr, experts))}")
    groups = layer_groups(base)
    for task, coef in coefficients.items():
        if not isinstance(coef, Mapping):
            continue
        if missing := [g for g in groups if g not in coef]:
            raise PrunefuseError(f"layer-wise coefficients of task {task!r} lack group(s) "
                                 f"{', '.join(map(repr, missing))}")
        if extra := [g for g in coef if g not in groups]:
            raise PrunefuseError(f"layer-wise coefficients of task {task!r} name unknown group(s) "
                                 f"{', '.join(map(repr, extra))}; groups are: {', '.join(groups)}")


# Buffers every BatchNorm registers: what `merge` keeps from the base when not told which
# keys are buffers (a state dict alone does not say).
BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def buffer_keys(model, prefix: str = "") -> set[str]:
    """State-dict keys of `model`'s buffers (non-learned state), under `prefix`."""
    state = model.state_dict()
    return {k for k, _ in model.named_buffers() if k in state and k.startswith(prefix)}


def merge(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]], method: str,
          coefficients: Mapping[str, float | Mapping[str, float]], *, buffers: Collection[str] | None = None,
          **method_params) -> dict[str, Tensor]:
    """Merge `experts` (task -> state dict, fine-tuned from `base`) with `method`.

    buffers: the keys holding non-learned state (`buffer_keys(model)`), copied from the base
      and never merged; None: the keys of BatchNorm statistics (`BATCHNORM_STATISTICS`).
    Returns a new state dict with every key, shape and dtype of `base`.
    """
    if method not in METHODS:
        raise unknown_name("fusion method", method, METHODS)
    fn = METHODS[method]
    check_params(method, method_params)
    _check_state(base, experts)
    _check_coefficients(base, experts, coefficients)
    if buffers is None:
        buffers = {k for k in base if k.rpartition(".")[2] in BATCHNORM_STATISTICS}
    kept = set(buffers)
    streamed = getattr(fn, "streamed", None)
    out: dict[str, Tensor] = {}

    def lambdas_of(key: str) -> dict[str, float]:
        return {t: float(c[layer_group(key)] if isinstance(c, Mapping) else c) for t, c in coefficients.items()}

    @torch.no_grad()  # grad mode is per thread: these may run in _keys_in_parallel's
    def streamed_key(key: str) -> Tensor:
        ref, tensors = base[key], {t: state[key] for t, state in experts.items()}
        merged = streamed(KeyInputs(key=key, base=ref, experts=tensors, lambdas=lambdas_of(key)), **method_params)
        if not _maybe_finite(merged):  # a nan or inf in any input reaches the output
            _name_non_finite(key, base, experts)
        return merged

    @torch.no_grad()
    def whole_key(key: str) -> Tensor:
        """`fn` on this key's whole task vectors (TaskDeltas): the merged key."""
        ref = base[key]
        tensors = {t: state[key] for t, state in experts.items()}
        deltas = TaskDeltas(key=key, base=ref, experts=tensors)
        theta0 = ref.to(deltas.dtype)
        for task, lam in lambdas_of(key).items():
            deltas.lambdas[task] = lam
            deltas[task] = torch.sub(tensors[task].to(device=ref.device, dtype=deltas.dtype), theta0).mul_(lam)
        if not all(_maybe_finite(d) for d in deltas.values()):
            _name_non_finite(key, base, experts)
        merged = fn(deltas, key, **method_params)
        del deltas  # the task vectors of this key go before the next key's are made
        return merged.add_(theta0).to(ref.dtype)

    with torch.no_grad():
        merged_keys = {k: None for k, ref in base.items() if k not in kept and ref.is_floating_point()}
        for key in [k for k in base if k not in merged_keys]:  # buffers are small: checked directly
            _name_non_finite(key, base, experts)
        done = None
        if streamed is not None or getattr(fn, "keys_in_parallel", False):
            # chunk by chunk (no whole task vector, one merged copy per key), or the decompositions of
            # the singular methods: single-threaded LAPACK calls, keys side by side
            with _keys_in_parallel() as run:
                done = dict(zip(merged_keys, run(streamed_key if streamed is not None else whole_key, merged_keys)))
        for key, ref in base.items():
            if key not in merged_keys:
                out[key] = ref.clone()
            else:
                out[key] = done.pop(key) if done is not None else whole_key(key)
    return out


@contextmanager
def _keys_in_parallel():
    """map(fn, keys) over torch's thread count, each op single-threaded: the chunks are small, and
    an op split across threads waits at a barrier per chunk (on 2 shared cores a TIES merge took
    69 CPU s that way, 5.4 s single-threaded; LAPACK's SVD and eigensolvers wait at one per
    Householder step: TSV-M took 824 CPU s at 2 threads, 110 s at 1). Results in key order; the
    first key's error first."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield lambda fn, keys: map(fn, keys)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield lambda fn, keys: list(pool.map(fn, keys))
    finally:
        torch.set_num_threads(threads)


class KeyInputs:
    """One key's base and expert tensors and coefficients, for a method that merges chunk by
    chunk (`fn.streamed`): it returns the merged weights of the key (not a delta), in the
    base's dtype and shape, and must let a nan or inf of any input reach them."""

    def __init__(self, *, key: str, base: Tensor, experts: Mapping[str, Tensor], lambdas: Mapping[str, float]):
        self.key, self.base, self.experts, self.lambdas = key, base, experts, lambdas
        self.dtype = torch.promote_types(base.dtype, torch.float32)  # fp16/bf16 merge in fp32
        self._flat_base = base.reshape(-1)
        self._flat = {t: e.reshape(-1) for t, e in experts.items()}

    def _tau(self, task: str, start: int, stop: int, theta0: Tensor) -> Tensor:
        part = self._flat[task][start:stop].to(device=theta0.device, dtype=self.dtype)
        return torch.sub(part, theta0)

    def chunks(self, size: int | None = None):
        """(start, theta_0, {task: tau_t}) chunk by chunk in flat order; every tau_t a new tensor."""
        size = size or select.CHUNK
        for start in range(0, self.base.numel(), size):
            theta0 = self._flat_base[start:start + size].to(self.dtype)
            yield start, theta0, {t: self._tau(t, start, start + theta0.numel(), theta0) for t in self._flat}

    def top_cut(self, task: str, k: int) -> select.Cut:
        """Which entries of tau_task are its top k by magnitude (`select.top_cut`)."""
        n = self.base.numel()

        def passes():
            for start in range(0, n, select.CHUNK):
                theta0 = self._flat_base[start:start + select.CHUNK].to(self.dtype)
                yield start, select.magnitude_bits(self._tau(task, start, start + theta0.numel(), theta0))

        step = max(1, n // select.SAMPLE)
        theta0 = self._flat_base[::step][:select.SAMPLE].to(self.dtype)
        sample = torch.sub(self._flat[task][::step][:select.SAMPLE].to(device=theta0.device, dtype=self.dtype), theta0)
        return select.top_cut(passes, n, k, select.magnitude_bits(sample))


class TaskDeltas(dict):
    """task -> lambda_t * tau_t for one key: what a method merges. The tensors are `merge`'s own
    temporaries, freed after the method returns: a method may overwrite them (DARE-TIES
    trims in place) or drop them (TSV-M). `remembered(what, compute)` keeps what a method computes from the unscaled
    task vectors (`task_vectors()`) in `cache`, found again when these experts are merged again."""

    def __init__(self, *, key: str, base: Tensor, experts: Mapping[str, Tensor]):
        super().__init__()
        self.key, self.base, self.experts = key, base, experts
        self.dtype = torch.promote_types(base.dtype, torch.float32)  # fp16/bf16 merge in fp32
        self.lambdas: dict[str, float] = {}

    def task_vectors(self):
        """tau_t = expert - base (unscaled), in the merge dtype, one at a time in this dict's order."""
        for task in self:
            yield torch.sub(self.experts[task].to(device=self.base.device, dtype=self.dtype), self.base.to(self.dtype))

    def remembered(self, what: tuple, compute):
        tensors = [self.base, *(self.experts[t] for t in self)]  # in this dict's (the coefficients') order
        return cache.remembered((*what, self.dtype), self.key, tensors, compute)
