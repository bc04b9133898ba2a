#!/usr/bin/env bash
# Install everything the tests need into .venv, then lint and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
