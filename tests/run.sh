#!/usr/bin/env bash
# The whole test suite from a fresh checkout: sets up .venv (python/bootstrap.sh, locked
# versions), then runs the Rust core's tests (cargo test) and the Python package's tests
# (pytest). Extra arguments go to pytest, e.g. `bash tests/run.sh -m gpu` on a machine with a
# CUDA GPU. HYBRIDGEN_DEPS / HYBRIDGEN_VENV choose another dependency set (see bootstrap.sh).
# `bash tests/run.sh --fast` is the edit loop: no cargo tests, and no test marked slow (CI runs all).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${HYBRIDGEN_VENV:-.venv}"
fast=0
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
fi

bash python/bootstrap.sh test,bench
if [ "$fast" = 1 ]; then
    echo "== pytest (fast: not slow)"
    exec "$venv/bin/python" -m pytest -m "not slow" "$@"
fi
echo "== cargo test"
# The CUDA build of torch ships NVRTC (nvidia-cuda-nvrtc): with it on the library path the core's
# own tests compile the kernels too (no GPU needed).
nvrtc_dir="$("$venv/bin/python" -c 'import nvidia, pathlib; print(pathlib.Path(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
LD_LIBRARY_PATH="${nvrtc_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --quiet
echo "== pytest"
"$venv/bin/python" -m pytest "$@"
