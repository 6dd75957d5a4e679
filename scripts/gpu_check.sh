#!/usr/bin/env bash
# The GPU path end to end (scripts/gpu_check.py): a 4-trial search at 0.5 GPU a trial with
# steps 2 and --early-stop asha, apply on CUDA, CUDA vs CPU latency of the dense and a pruned model, one
# table. At most 5 minutes on a machine with one GPU; without CUDA it runs the CPU parts,
# says the CUDA parts were skipped, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
# 5 minutes where there is a GPU; a CPU-only run (everything on shared cores) may take longer.
LIMIT=900
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then LIMIT=300; fi
exec timeout "$LIMIT" "$PY" scripts/gpu_check.py "$@"
