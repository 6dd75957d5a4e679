"""The domain: task suites, the multi-task model, pruning, fusion, task weighting,
training, measurement, and the cycle that applies a Policy (`pipeline.apply_policy`).

Submodules are imported by name (`from mtl_models import fusion`); nothing heavy is
imported here, so `import mtl_models.suites` stays cheap.
"""

__all__ = ["artifacts", "checkpoint", "deploy", "fusion", "measure", "models", "pipeline", "pruning", "quantize",
           "suites", "tasks", "train", "weighting"]
