#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with everything the examples, the
# ONNX export and the tests need. torch is pinned first to 2.13.0 so that nothing pulls
# another build; pyproject itself only asks for torch>=2.5. On the project's machines pip
# finds the 2.13.0 CPU wheel locally; elsewhere PyPI's Linux wheel is the multi-GB CUDA
# build, so set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to take the CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi

pip_install() {  # quiet, but a failure stops the setup with pip's output
  local out
  if ! out=$(.venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    echo "setup_env: 'pip install $*' failed" >&2
    exit 1
  fi
  if [ -n "$out" ]; then printf '%s\n' "$out" | { grep -v "^WARNING: Location" || true; }; fi
}

pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
pip_install -e ".[examples,onnx,test]"
.venv/bin/python - <<'PY'
import sys

import torch

import reuse_compiler

if not torch.__version__.startswith("2.13.0"):
    sys.exit(f"setup_env: torch {torch.__version__} is installed in .venv, 2.13.0 was pinned; remove .venv and rerun")
print(f"reuse-compiler {reuse_compiler.__version__}, torch {torch.__version__}")
PY
