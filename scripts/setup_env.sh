#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with everything the examples, the
# ONNX export and the tests need. torch is pinned first to the CPU wheel so that nothing
# pulls a multi-GB CUDA build; pyproject itself only asks for torch>=2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e ".[examples,onnx,test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, reuse_compiler; print(f'reuse-compiler {reuse_compiler.__version__}, torch {torch.__version__}')"
