#!/usr/bin/env bash
# Create .venv and install LiverSeg into it. torch is installed first, pinned, so that pip takes the
# CPU wheel instead of pulling several GB of CUDA packages. EXTRAS=test adds the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ -n "${EXTRAS:-}" ]; then
  .venv/bin/python -m pip install -q ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install -q .
fi
