#!/usr/bin/env bash
# The whole test suite from a fresh checkout: sets up .venv (python/bootstrap.sh), then runs the
# Rust core's tests (cargo test) and the Python package's tests (pytest). Extra arguments go to
# pytest, e.g. `bash tests/run.sh -m gpu` on a machine with a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

bash python/bootstrap.sh test,bench
echo "== cargo test"
cargo test --quiet
echo "== pytest"
.venv/bin/python -m pytest "$@"
