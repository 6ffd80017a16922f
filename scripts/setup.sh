#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its dev, sweep and bench extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip, not uv/poetry: pip takes the local torch build instead of downloading it again.
.venv/bin/python -m pip install -q --upgrade pip
# The sweep extra (Optuna, HyperOpt) too, so the sweep tests cover every search.
# bench (pytorch-metric-learning): the benchmarks' peer and their smoke test.
.venv/bin/python -m pip install -q -e '.[dev,sweep,bench]'
