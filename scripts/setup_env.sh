#!/usr/bin/env bash
# Creates ./.venv with everything megatron-swift needs on a CPU machine (idempotent).
# torch is pinned first to the CPU wheel (2.13.0): an unpinned torch can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG=.venv-install.log

pip_install() {
  if ! .venv/bin/python -m pip install -q "$@" >>"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" | tail -40
    echo "setup_env: pip install $* failed (full log: $LOG)" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import megatron_swift, megatron.core, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ]; then
  : >"$LOG"
  echo "setup_env: installing into .venv (log: $LOG)"
  pip_install --upgrade pip
  pip_install "torch==2.13.0"
  pip_install -e ".[test]"
  .venv/bin/python -W ignore -c "import megatron_swift, megatron.core, torch, transformers, pytest; print('setup_env: ready: torch', torch.__version__, '| megatron-core', __import__('megatron.core').core.__version__, '| transformers', transformers.__version__)"
  touch .venv/.installed
fi
