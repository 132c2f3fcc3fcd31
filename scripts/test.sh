#!/usr/bin/env bash
# The test command: set up .venv, lint, run the test suite (slow tests included in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
