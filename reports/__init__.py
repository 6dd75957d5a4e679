"""Reading experiments, Pareto analysis, the HTML report and choosing a policy. No torch.

`load_experiment` is resolved on first use, so importing `reports` costs no pandas import.
"""

__all__ = ["load_experiment"]


def __getattr__(name):
    if name == "load_experiment":
        from .experiment import load_experiment

        return load_experiment
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
