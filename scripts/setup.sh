#!/usr/bin/env bash
# Creates .venv (once) with prunefuse and its test tools. Idempotent and quick when done.
# CPU torch is installed first where there is no GPU: a plain `torch` requirement would
# otherwise pull a multi-GB CUDA build. TORCH_SPEC overrides the torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.prunefuse-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

python3 -m venv .venv
.venv/bin/python -m pip install -qq --upgrade pip >/dev/null
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  spec="${TORCH_SPEC:-torch}"
  vision="${TORCHVISION_SPEC:-torchvision}"
else
  spec="${TORCH_SPEC:-torch==2.13.0}"
  # The torchvision that pins torch==2.13.0: a newer one would replace the CPU torch with a CUDA build.
  vision="${TORCHVISION_SPEC:-torchvision==0.28.0}"
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $spec ..." >&2
  .venv/bin/pip install -qq "$spec"
fi
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
  echo "setup: installing $vision ..." >&2
  .venv/bin/pip install -qq "$vision"
fi
echo "setup: installing prunefuse and its dependencies ..." >&2
.venv/bin/pip install -qq -e ".[test,deploy,zoo]"  # -qq: errors show and stop, nothing else prints
# FusionBench's merge functions are a reference in tests/test_fusion_reference.py. The modules
# used need only torch; its own requirements (Lightning, Hydra, a CUDA torch) are not installed.
.venv/bin/pip install -qq --no-deps "fusion-bench==0.2.33"
.venv/bin/python -c "import torch, ray, optuna, torch_pruning, plotly, onnx, onnxruntime, mlflow, search.cli"
# timm, torchvision and transformers import through the one place that makes torchvision load beside the CPU torch
.venv/bin/python -c "from mtl_models.models import imports; imports.timm(); imports.torchvision(); imports.transformers()"
echo "$want" > "$stamp"
