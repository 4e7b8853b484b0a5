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
# pip hides the build's own output (cargo's progress included) unless -v, which is far too noisy,
# and prints no more than "still running..." meanwhile: say what takes the time, and print the
# elapsed time every 30 s from a background loop that is stopped when pip returns, however it ends.
echo "bootstrap: pip first downloads what is missing (torch and its CUDA libraries: a few GB, a few minutes, the first time only),"
echo "bootstrap: then compiles hybridgen's Rust core (release build: 5-15 minutes on 2 cores the first time," \
     "1-3 minutes after a change under src/, seconds otherwise)..."
heartbeat() {
    local start=$SECONDS t
    # Stopped by TERM: end the current sleep too (its output goes nowhere in any case, so a
    # leftover sleep could never hold a caller's pipe open).
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
        sleep 30 </dev/null >/dev/null 2>&1 &
        nap=$!
        wait "$nap"
        t=$((SECONDS - start))
        echo "bootstrap: still installing or compiling, $((t / 60)) min $((t % 60)) s so far"
    done
}
heartbeat &
beat=$!
trap 'kill "$beat" 2>/dev/null || true' EXIT
status=0
"$venv/bin/python" -m pip install "${pins[@]}" --editable "$spec" || status=$?
kill "$beat" 2>/dev/null || true
wait "$beat" 2>/dev/null || true
trap - EXIT
if [ "$status" -ne 0 ]; then
    echo "bootstrap: pip install failed with status $status" >&2
    exit "$status"
fi
echo "bootstrap: $venv is ready ($((SECONDS / 60)) min $((SECONDS % 60)) s)"
