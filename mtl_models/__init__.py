"""The domain: task suites, the multi-task model, training, fusion, pruning, measurement,
deployment, and the cycle that applies a Policy (`pipeline.apply_policy`).

Where things are:
  suites/      the tasks and their data: built-in suites, tabular and image files, plugins;
               splits read in batches (`suites.reading`)
  models/      the multi-task model and its trunks (built-in and timm / torchvision / transformers),
               users' weights files and experts, checkpoints of pruned models
  training/    the training loop, task losses and metrics, loss weighting, distillation
  fusion/      merging task experts into one model (task arithmetic, TIES, TSV-M, Iso-C, AdaMerging, ...)
  pruning/     structured and unstructured pruning, coupled groups, criteria, the preflight check
  measuring/   params, MACs, latency
  deployment/  ONNX export, int8 quantization, BatchNorm folding
  artifacts    the dense base, the experts and the control, trained once and cached
  pipeline     one trial's cycle: fuse → prune → fine-tune → measure
  apply        a policy turned back into its model (never touches Ray)

Sub-packages are imported by name (`from mtl_models import fusion`); nothing heavy is
imported here, so `import mtl_models.suites` stays cheap.
"""
