#!/usr/bin/env bash
# Lint and format checks of both languages, as CI runs them: ruff (lint + format) over the Python
# tree, rustfmt and clippy (warnings are errors) over the crate, bindings included. Expects the
# virtualenv of tests/run.sh (ruff comes with the test extra). Fix with `ruff check --fix .`,
# `ruff format .` and `cargo fmt`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${HYBRIDGEN_VENV:-.venv}"
echo "== ruff check"
"$venv/bin/ruff" check .
echo "== ruff format --check"
"$venv/bin/ruff" format --check .
echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy (core, and with the Python bindings), -D warnings"
cargo clippy --quiet --all-targets -- -D warnings
cargo clippy --quiet --all-targets --features python -- -D warnings
echo "lint: clean"
