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
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="${TORCH_SPEC:-torch}"
  else
    spec="${TORCH_SPEC:-torch==2.13.0}"
  fi
  echo "setup: installing $spec ..." >&2
  .venv/bin/pip install -q "$spec"
fi
echo "setup: installing prunefuse and its dependencies ..." >&2
.venv/bin/pip install -q -e ".[test,deploy]" 2>&1 | grep -v -i "warning" || true
# FusionBench's merge functions are a reference in tests/test_fusion_reference.py. The modules
# used need only torch; its own requirements (Lightning, Hydra, a CUDA torch) are not installed.
.venv/bin/pip install -q --no-deps "fusion-bench==0.2.33" 2>&1 | grep -v -i "warning" || true
.venv/bin/python -c "import torch, ray, optuna, torch_pruning, plotly, onnx, onnxruntime, mlflow, search.cli"
echo "$want" > "$stamp"
