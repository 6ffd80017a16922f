#!/usr/bin/env bash
# Set up, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check pipeline jobs tests benchmarks
.venv/bin/python -m pytest -q "$@"
