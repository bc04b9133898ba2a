#!/usr/bin/env bash
# Create .venv and install LiverSeg into it: the light install (ONNX Runtime, no PyTorch) by default.
# EXTRAS=torch adds PyTorch and MONAI (GPUs, training); EXTRAS=test the test tools (and the torch extra).
# With either, torch is installed first, pinned, so that pip takes the CPU wheel instead of several GB of
# CUDA packages (TORCH_VERSION chooses another).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ -n "${EXTRAS:-}" ]; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q ".[${EXTRAS}]"
else
  .venv/bin/python -m pip install -q .
fi
