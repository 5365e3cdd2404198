#!/usr/bin/env bash
# Install adapmtl, with what it needs, into the current Python environment.
#
#   bash scripts/install.sh          # the library
#   bash scripts/install.sh --test   # plus the test dependencies
#
# torch: kept if already installed; otherwise torch==2.14.1 (override with ADAPMTL_TORCH=...), whose
# CUDA build lets the CUDA extension compile wherever nvcc is found, GPU or not.
# CUDA: built when torch has CUDA and nvcc is found (CUDA_HOME, else /usr/local/cuda);
# ADAPMTL_NO_CUDA=1 skips it, ADAPMTL_FORCE_CUDA=1 makes a failure to build it an error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "${ADAPMTL_TORCH:-torch==2.14.1}"
fi
"$PY" -m pip install setuptools wheel ninja pybind11
# --no-build-isolation: build against the torch installed above instead of downloading another one.
"$PY" -m pip install --no-build-isolation -e ".${extras}"
"$PY" -c "import adapmtl, adapmtl.ops as o; print('adapmtl', adapmtl.__version__, 'CPU backends:', o.available_backends('cpu'))"
