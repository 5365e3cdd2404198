#!/usr/bin/env bash
# Install adapmtl, with what it needs, into the current Python environment.
#
#   bash scripts/install.sh                  # editable, for a development checkout (the README's quick start)
#   bash scripts/install.sh --test           # plus the test dependencies
#   bash scripts/install.sh --wheel [--test] # as users get it: sdist -> wheel -> a regular install (CI)
#
# torch: kept if already installed; otherwise torch==2.14.1 (override with ADAPMTL_TORCH=...), whose
# CUDA build lets the CUDA extension compile wherever nvcc is found, GPU or not.
# CUDA: built when torch has CUDA and nvcc is found (CUDA_HOME, else /usr/local/cuda);
# ADAPMTL_NO_CUDA=1 skips it, ADAPMTL_FORCE_CUDA=1 makes a failure to build it an error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

extras="" wheel=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    --wheel) wheel=1 ;;
    *) echo "install.sh: unknown option $arg (use --test, --wheel)" >&2; exit 2 ;;
  esac
done

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "${ADAPMTL_TORCH:-torch==2.14.1}"
fi
"$PY" -m pip install setuptools wheel ninja pybind11
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}  # compile every source file in parallel
# --no-build-isolation everywhere: build against the torch installed above instead of downloading another one.
if [ "$wheel" = 1 ]; then
  "$PY" -m pip install build
  rm -rf dist
  "$PY" -m build --sdist --no-isolation --outdir dist .
  # the wheel is built from the sdist, so a file missing from the sdist fails here, not on a user's machine
  "$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir dist dist/adapmtl-*.tar.gz
  whl=$(ls dist/adapmtl-*.whl)
  "$PY" -m pip install --force-reinstall --no-deps "$whl"
  "$PY" -m pip install "${whl}${extras}"
elif "$PY" scripts/editable_up_to_date.py; then
  # an editable install of this checkout whose extensions are newer than every source: no rebuild, only
  # what the extras add (e.g. the second quick-start command after the first)
  "$PY" scripts/editable_up_to_date.py --requirements "${extras}" | xargs -r "$PY" -m pip install
else
  "$PY" -m pip install --no-build-isolation -e ".${extras}"
fi
# from another folder, so that a regular install is checked, not the source tree beside it
(cd "${TMPDIR:-/tmp}" && "$PY" -c "import adapmtl, adapmtl.ops as o; print('adapmtl', adapmtl.__version__, 'from', adapmtl.__file__, '- CPU backends:', o.available_backends('cpu'))")
