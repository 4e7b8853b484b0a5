#!/usr/bin/env bash
# The Rust core's fuzz targets (tests/fuzz): first the committed corpus and a few thousand seeded
# inputs through the targets' bodies on stable Rust (cargo test), then — where a nightly toolchain
# and cargo-fuzz exist — a short libFuzzer run of each target from that corpus. Without nightly
# the libFuzzer run is skipped and says so; the replay has still run.
#
#   bash tests/fuzz.sh [SECONDS_PER_TARGET]      (default 20)
set -euo pipefail
cd "$(dirname "$0")/fuzz"
seconds="${1:-20}"
echo "== fuzz corpus replay (stable)"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-../../target}" cargo test --quiet
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "== libFuzzer run SKIPPED: no nightly Rust toolchain here (cargo-fuzz needs one); the corpus replay above ran"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    if ! cargo install --quiet --locked cargo-fuzz; then
        echo "== libFuzzer run SKIPPED: cargo-fuzz could not be installed; the corpus replay above ran"
        exit 0
    fi
fi
for target in store_ops slot_ops kernels; do
    echo "== cargo fuzz run $target (${seconds}s)"
    # A private copy of the corpus: new inputs found in a short CI run are not committed.
    work="$(mktemp -d)"
    cp corpus/$target/* "$work/"
    cargo +nightly fuzz run --fuzz-dir . --features libfuzzer "$target" "$work" -- -max_total_time="$seconds" -max_len=512
    rm -rf "$work"
done
