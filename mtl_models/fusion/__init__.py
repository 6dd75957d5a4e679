"""Merge task experts fine-tuned from one base model into a single multi-task model.

Every method works on task vectors tau_t = theta_t - theta_0 (Ilharco et al. 2023,
"Editing Models with Task Arithmetic"). The per-task coefficient lambda_t scales tau_t
*before* a method combines them; lambda_t may be one float or, AdaMerging style, a dict
giving one float per layer group (see `layer_group`).

Methods (registered in `METHODS`; their searchable knobs in `KNOBS`), one module a family:
  linear.py      average, task_arithmetic
  sparse.py      ties, dare_linear, dare_ties, breadcrumbs, della
  singular.py    tsv, iso_c, iso_cts (per 2-D weight; task arithmetic for the rest)
  adamerging.py  adamerging: coefficients learned on unlabeled inputs (`learn_coefficients`)
`merge.py` checks the inputs and merges key by key (`merge`; TIES, task arithmetic and average
chunk by chunk); `select.py` finds TIES's top-k exactly without a sort; `registry.py` holds `METHODS`;
`spectral.py` gives polar factors and top singular triplets from the float64 Gram's eigendecomposition
(the SVD where that is ill-conditioned); `cache.py` keeps knob-free per-tensor work (TSV-M's whitened
bases) across merges.
Reference, benchmarks and what each method does: docs/merging.md.
"""
from __future__ import annotations

from . import adamerging, linear, singular, sparse  # noqa: F401  (each registers its methods)
from .adamerging import learn_coefficients
from .merge import BATCHNORM_STATISTICS, buffer_keys, check_params, layer_group, layer_groups, merge
from .registry import METHODS, register

KNOBS = METHODS.knobs  # method -> {knob: Knob}, defaults from the signatures

__all__ = ["BATCHNORM_STATISTICS", "KNOBS", "METHODS", "buffer_keys", "check_params", "layer_group",
           "layer_groups", "learn_coefficients", "merge", "register"]
