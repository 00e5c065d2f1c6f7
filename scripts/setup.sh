#!/usr/bin/env bash
# Creates .venv (if missing) and installs covidseg into it. Idempotent; safe to rerun.
# PyTorch is pinned first to the CPU build this project is developed with; the package range admits it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
EXTRA=${1:-}
if [ -n "$EXTRA" ]; then
  .venv/bin/python -m pip install -q -e ".[$EXTRA]"
else
  .venv/bin/python -m pip install -q -e .
fi
