#!/usr/bin/env bash
# Regenerates python/constraints.txt: installs the newest versions pyproject.toml allows into a
# fresh virtualenv (.venv-lock), runs the whole test suite there, and only if it passes records
# the exact versions. Usage: bash python/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-lock
HYBRIDGEN_DEPS=newest HYBRIDGEN_VENV=.venv-lock bash tests/run.sh -q
.venv-lock/bin/python python/deps.py lock
