"""Optuna samplers by name (`--sampler`, `SearchConfig.sampler`): one registered function each,
`(*, seed, trials, floors) -> optuna sampler`. A new sampler is one decorated function here;
the CLI, `SearchConfig` and `run_search` take every registered name. Optuna is imported
inside each, so the names are known without it."""
from __future__ import annotations

from spaces.registry import Registry

SAMPLERS = Registry("sampler")


def _startup(trials: int | None) -> int:
    return min(10, max(4, (trials or 40) // 4))


@SAMPLERS.register("tpe")
def tpe(*, seed: int, trials: int | None, floors=None):
    import optuna

    # multivariate + group model the conditional (define-by-run) space jointly.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constraints_func=floors,
                                      n_startup_trials=_startup(trials))


@SAMPLERS.register("nsga2")
def nsga2(*, seed: int, trials: int | None, floors=None):
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=floors,
                                         population_size=max(8, min(50, (trials or 40) // 4)))


@SAMPLERS.register("gp")
def gp(*, seed: int, trials: int | None, floors=None):
    import optuna

    # Gaussian process, log expected hypervolume improvement; its cost per trial grows with the
    # trials (benchmarks/search.py). Knobs outside the space every trial has are sampled at random.
    return optuna.samplers.GPSampler(seed=seed, constraints_func=floors, warn_independent_sampling=False,
                                     n_startup_trials=_startup(trials))


@SAMPLERS.register("random")
def random(*, seed: int, trials: int | None, floors=None):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def make_sampler(name: str, *, seed: int, trials: int | None, floors=None):
    """The sampler registered as `name` (an unknown name: one line listing the valid ones)."""
    return SAMPLERS.method(name).fn(seed=seed, trials=trials, floors=floors)
