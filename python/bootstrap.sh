#!/usr/bin/env bash
# Sets up a virtualenv with hybridgen built from this checkout (Rust core compiled by maturin) and
# the Python packages it needs, all from the package registries. Safe to re-run: it only
# rebuilds what changed. Usage: python/bootstrap.sh [extras], e.g. "test" or "test,bench".
#
# Which versions (HYBRIDGEN_DEPS):
#   locked  (default) the exact versions in python/constraints.txt, the ones last verified
#   newest  the newest versions pyproject.toml allows, as the registries serve them today
#   lowest  every direct dependency at its declared lower bound (python/deps.py lowest)
# HYBRIDGEN_VENV names the virtualenv (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3}"
deps="${HYBRIDGEN_DEPS:-locked}"
venv="${HYBRIDGEN_VENV:-.venv}"

if ! command -v cargo >/dev/null 2>&1; then
    echo "bootstrap: cargo (Rust) is needed to build the native core; install it with rustup" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap: creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$venv/bin/python" -m pip install --quiet --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
case "$deps" in
    locked) pins=(--constraint python/constraints.txt) ;;
    newest) pins=(--upgrade --upgrade-strategy eager) ;;
    lowest)
        "$venv/bin/python" python/deps.py lowest "$extras" > "$venv/lower-bounds.txt"
        pins=(--constraint "$venv/lower-bounds.txt") ;;
    *) echo "bootstrap: HYBRIDGEN_DEPS must be locked, newest or lowest, not '$deps'" >&2; exit 2 ;;
esac
echo "bootstrap: installing hybridgen ($spec) with $deps dependencies into $venv"
"$venv/bin/python" -m pip install "${pins[@]}" --editable "$spec"
