#!/usr/bin/env bash
# Sets up ./.venv with hybridgen built from this checkout (Rust core compiled by maturin) and
# the Python packages it needs, all from the package registries. Safe to re-run: it only
# rebuilds what changed. Usage: python/bootstrap.sh [extras], e.g. "test" or "test,bench".
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "bootstrap: cargo (Rust) is needed to build the native core; install it with rustup" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "bootstrap: installing hybridgen ($spec) and its dependencies into .venv"
.venv/bin/python -m pip install --editable "$spec"
