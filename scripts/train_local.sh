#!/usr/bin/env bash
# Set up, then train on the built-in dataset with the `local` preset (2 CPU cores, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m jobs.train --preset local "$@"
