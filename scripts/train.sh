#!/usr/bin/env bash
# The main job: set up .venv, then train CifarNet on real digits with and without reuse.
# Extra arguments go to examples/train.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python examples/train.py "$@"
