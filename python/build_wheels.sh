#!/usr/bin/env bash
# Builds the release wheels into OUTDIR: one abi3 wheel (CPython >= 3.10) per architecture,
# x86_64 and aarch64, tagged manylinux_2_17 (glibc 2.17: RHEL/Rocky 8, Ubuntu 20.04 and every
# newer Linux, Grace hosts included). maturin links with zig (`--zig`), which targets an old glibc
# from any build machine, so no manylinux container is needed; the aarch64 wheel is
# cross-compiled. Needs only Rust (rustup) and python3: maturin, zig and auditwheel come from
# PyPI into .venv-build at the versions pinned in pyproject.toml's `build` extra.
#
# Usage: bash python/build_wheels.sh OUTDIR        e.g. bash python/build_wheels.sh dist
#   HYBRIDGEN_WHEEL_ARCHS  which architectures (default "x86_64 aarch64")
#   HYBRIDGEN_AARCH64_REQUIRED=1  fail, rather than skip loudly, if the aarch64 standard
#                          library cannot be fetched
#   CARGO_TARGET_DIR       where cargo builds (as usual)
# tests/wheels.sh checks what this produces.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
    echo "usage: bash python/build_wheels.sh OUTDIR" >&2
    exit 2
fi
out="$1"
python="${PYTHON:-python3}"
venv=.venv-build
archs="${HYBRIDGEN_WHEEL_ARCHS:-x86_64 aarch64}"
policy=manylinux_2_17

# The kernels choose their instruction set at run time (AVX-512 / AVX2+F16C / scalar on x86_64,
# NEON / scalar on aarch64); a target-cpu or target-feature flag would bake one CPU's features
# into a wheel that has to run on every CPU of its architecture.
for flags in "${RUSTFLAGS:-}" "${CARGO_ENCODED_RUSTFLAGS:-}" "${CARGO_BUILD_RUSTFLAGS:-}"; do
    case "$flags" in
        *target-cpu*|*target-feature*)
            echo "build_wheels: refusing to build release wheels with '$flags' in the Rust flags" >&2
            echo "build_wheels: (the kernels dispatch at run time; unset RUSTFLAGS)" >&2
            exit 2 ;;
    esac
done

command -v cargo >/dev/null 2>&1 || { echo "build_wheels: cargo (Rust) is needed; install it with rustup" >&2; exit 1; }

export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$venv/bin/python" ]; then
    echo "build_wheels: creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
# The pins of the `build` extra, read from pyproject.toml so they live in one place (and without
# installing hybridgen itself into the build environment).
"$venv/bin/python" - > "$venv/build-requirements.txt" <<'PY'
import re
text = open("pyproject.toml").read()
try:
    import tomllib
    reqs = tomllib.loads(text)["project"]["optional-dependencies"]["build"]
except ImportError:  # Python 3.10: the one line of the extra
    reqs = re.findall(r'"([^"]+)"', re.search(r"(?m)^build = \[(.*)\]$", text).group(1))
print("\n".join(reqs))
PY
"$venv/bin/python" -m pip install --quiet -r "$venv/build-requirements.txt"
# maturin finds zig as `python3 -m ziglang` on PATH.
export PATH="$PWD/$venv/bin:$PATH"

mkdir -p "$out"
rm -f "$out"/hybridgen-*.whl

skipped=()
for arch in $archs; do
    target="$arch-unknown-linux-gnu"
    # (The toolchain's own standard libraries, however Rust was installed.)
    if ! ls "$(rustc --print sysroot)/lib/rustlib/$target/lib/"libstd-* >/dev/null 2>&1; then
        echo "build_wheels: adding the Rust standard library for $target (rustup)"
        if ! rustup target add "$target"; then
            echo "build_wheels: !!! $arch wheel SKIPPED: the $target standard library could not be fetched with rustup" >&2
            if [ "$arch" = aarch64 ] && [ "${HYBRIDGEN_AARCH64_REQUIRED:-0}" = 1 ]; then
                exit 1
            fi
            skipped+=("$arch")
            continue
        fi
    fi
    echo "== build_wheels: $arch ($target, $policy, abi3)"
    maturin build --release --zig --target "$target" --compatibility "$policy" --out "$out"
done

echo "build_wheels: built into $out:"
ls -l "$out"/hybridgen-*.whl 2>/dev/null || echo "build_wheels: (none)"
if [ ${#skipped[@]} -gt 0 ]; then
    echo "build_wheels: !!! NOT built: ${skipped[*]} (see above)" >&2
fi
