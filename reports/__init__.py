"""Reading experiments, Pareto analysis, the HTML report and choosing a policy. No torch."""
from .experiment import load_experiment

__all__ = ["load_experiment"]
