#!/usr/bin/env bash
# Sets up ./.venv if needed, then runs the whole test suite (CPU, real 2-process gloo jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -p no:cacheprovider -W ignore::DeprecationWarning "$@"
