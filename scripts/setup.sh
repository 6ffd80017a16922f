#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its dev, sweep and bench extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # pyproject.toml asks for 3.10-3.12 (torch and ray wheels); say so before pip does, obscurely.
  if ! command -v "$PYTHON" >/dev/null; then
    echo "error: $PYTHON: no such command; this project needs Python 3.10-3.12: PYTHON=python3.12 bash $0" >&2
    exit 2
  fi
  if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
    echo "error: $PYTHON is $("$PYTHON" --version 2>&1 | head -1 || true); this project needs Python 3.10-3.12:" \
         "name one, e.g. PYTHON=python3.12 bash $0" >&2
    exit 2
  fi
  "$PYTHON" -m venv .venv
fi
# pip, not uv/poetry: pip takes the local torch build instead of downloading it again.
.venv/bin/python -m pip install -q --upgrade pip
# The sweep extra (Optuna, HyperOpt) too, so the sweep tests cover every search.
# bench (pytorch-metric-learning): the benchmarks' peer and their smoke test.
.venv/bin/python -m pip install -q -e '.[dev,sweep,bench]'
