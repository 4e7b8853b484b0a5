#!/usr/bin/env bash
# The core's CPU kernels on aarch64 (NEON), built on this x86-64 machine and run under qemu:
# `cargo test --no-default-features --target aarch64-unknown-linux-gnu` runs the Rust tests
# (every kernel against its float64 reference, on each instruction set the emulated CPU has:
# NEON and scalar). Installs what it needs: the aarch64 standard library (rustup), Debian's
# cross linker and C library, and qemu-user-static.
#
# If something cannot be installed here (no rustup, no network to the registries), the step
# prints "aarch64: SKIPPED (...)" and exits 0 - it never reports a pass it did not run.
# HYBRIDGEN_AARCH64_REQUIRED=1 turns a skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu

skip() {
    echo "aarch64: SKIPPED ($*)"
    if [ "${HYBRIDGEN_AARCH64_REQUIRED:-0}" = 1 ]; then
        exit 1
    fi
    exit 0
}

if [ "$(uname -m)" = aarch64 ]; then
    echo "aarch64: native machine, plain cargo test"
    exec cargo test --no-default-features --test kernels --test stage --test threads --lib
fi

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    rustup target add "$target" >/dev/null 2>&1 || skip "the $target standard library could not be fetched with rustup"
fi
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
[ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] || need+=(libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        skip "no apt-get to install ${need[*]}"
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"; } \
        >/dev/null 2>&1 || skip "Debian packages ${need[*]} could not be installed"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
echo "aarch64: cargo test --target $target (under qemu-aarch64-static)"
# The kernel tests and the library's unit tests: what differs by instruction set. (The store and
# GPU tests are architecture-independent and run natively.)
cargo test --no-default-features --target "$target" --test kernels --test stage --test threads --lib "$@"
echo "aarch64: passed"
