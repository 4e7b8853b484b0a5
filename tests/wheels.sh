#!/usr/bin/env bash
# Checks the release wheels that python/build_wheels.sh put in DIR (default dist), as a user
# would meet them:
#   both      the files, tags and ELF of the wheel; `auditwheel show` must find it consistent with
#             manylinux_2_17 for its architecture and needing no external libraries
#             (tests/wheel_checks.py static)
#   x86_64    installed with pip into a fresh virtualenv, then run with no Rust toolchain on PATH
#             and from outside the checkout: `python -m hybridgen --version`, `python -m hybridgen
#             demo`, the native kernels on every instruction set this CPU runs (and, under
#             qemu-x86_64-static, on an emulated Haswell and Nehalem: AVX2 and scalar chosen), and a
#             pytest smoke subset (exact modes equal full attention) importing the installed package
#   aarch64   the wheel's native module loaded by Debian's arm64 Python under qemu-aarch64-static,
#             its kernels checked against numpy on NEON and scalar (tests/wheel_checks.py native).
#             The core's full kernel test suite on aarch64 is tests/aarch64.sh.
# What cannot be set up here (the arm64 Python, qemu) is reported as SKIPPED, loudly, never as a
# pass; HYBRIDGEN_AARCH64_REQUIRED=1 turns an aarch64 skip into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dir="$(cd "${1:-dist}" && pwd)"
python="${PYTHON:-python3}"
if [ ! -x .venv-build/bin/auditwheel ]; then
    echo "wheels: .venv-build has no auditwheel; run python/build_wheels.sh first" >&2
    exit 2
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
work="$(mktemp -d "${TMPDIR:-/tmp}/hybridgen-wheels.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1

passed=0
failed=0
skipped=0
pass() { echo "wheels: PASSED $*"; passed=$((passed + 1)); }
flunk() { echo "wheels: FAILED $*"; failed=$((failed + 1)); }
skip() {
    echo "wheels: !!! SKIPPED $* !!!"
    skipped=$((skipped + 1))
    if [ "${HYBRIDGEN_AARCH64_REQUIRED:-0}" = 1 ] && [[ "$*" == aarch64* ]]; then
        failed=$((failed + 1))
    fi
}

unpack() {
    local deb
    for deb in "$@"; do
        dpkg-deb -x "$deb" "$root" || return 1
    done
}

# qemu-user-static (Debian's), installed if missing.
have_qemu() {
    command -v "qemu-$1-static" >/dev/null 2>&1 && return 0
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    { command -v apt-get && $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-user-static; } >/dev/null 2>&1
    command -v "qemu-$1-static" >/dev/null 2>&1
}

wheel_for() {
    local found=("$dir"/hybridgen-"$version"-cp310-abi3-*manylinux_2_17_"$1".whl)
    [ -e "${found[0]}" ] && echo "${found[0]}"
}

# -- x86_64 ------------------------------------------------------------------------------------
x86="$(wheel_for x86_64 || true)"
if [ -z "$x86" ]; then
    flunk "x86_64: no hybridgen-$version-cp310-abi3-*manylinux_2_17_x86_64.whl in $dir"
else
    echo "== wheels: x86_64 $(basename "$x86") ($(du -h "$x86" | cut -f1))"
    if .venv-build/bin/python tests/wheel_checks.py static "$x86" x86_64; then
        pass "x86_64 static + auditwheel"
    else
        flunk "x86_64 static + auditwheel"
    fi

    # A fresh virtualenv: the wheel and its dependencies (the locked versions, so the pip cache
    # serves them), plus pytest for the smoke subset.
    venv="$work/venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet --constraint python/constraints.txt "$x86" pytest
    # From here on: no Rust on PATH, no variables of this shell, a new HOME, and the checkout
    # not on sys.path (PYTHONSAFEPATH; the working directory is elsewhere).
    clean=(env -i "HOME=$work/home" "PATH=$venv/bin:/usr/bin:/bin" "LANG=C.UTF-8" "PYTHONSAFEPATH=1")
    mkdir -p "$work/home"
    cd "$work"
    if "${clean[@]}" bash -c 'command -v cargo || command -v rustc || command -v rustup' >/dev/null; then
        flunk "x86_64: a Rust toolchain is on the clean PATH ($venv/bin:/usr/bin:/bin); cannot check without one"
    else
        echo "wheels: cargo, rustc and rustup are not on the clean PATH"
        origin="$("${clean[@]}" python -c 'import hybridgen; print(hybridgen.__file__)')"
        case "$origin" in
            "$venv"/lib/*/site-packages/hybridgen/__init__.py) pass "x86_64 imports from the venv: $origin" ;;
            *) flunk "x86_64: hybridgen imported from $origin, not the venv" ;;
        esac
        if "${clean[@]}" python -m hybridgen --version; then pass "x86_64 --version"; else flunk "x86_64 --version"; fi
        unzip -q "$x86" 'hybridgen/_native.abi3.so' -d "$work/x86_64"
        isa="$("${clean[@]}" python -c 'import hybridgen; print(hybridgen.isa())')"
        if "${clean[@]}" python "$repo/tests/wheel_checks.py" native "$work/x86_64/hybridgen/_native.abi3.so" "$isa"; then
            pass "x86_64 native kernels"
        else
            flunk "x86_64 native kernels"
        fi
        # The same wheel on older CPUs, emulated: it must choose AVX2 on a Haswell and the scalar
        # kernels on a Nehalem (no AVX), i.e. nothing newer was compiled in outside the dispatch.
        if have_qemu x86_64; then
            for cpu in "Haswell avx2" "Nehalem scalar"; do
                read -r model want <<< "$cpu"
                # (qemu warns about CPU features it does not emulate and that no kernel uses.)
                if "${clean[@]}" qemu-x86_64-static -cpu "$model" "$venv/bin/python" "$repo/tests/wheel_checks.py" native \
                    "$work/x86_64/hybridgen/_native.abi3.so" "$want" 2>&1 | grep -v "TCG doesn't support requested feature"; then
                    pass "x86_64 native kernels on an emulated $model CPU ($want)"
                else
                    flunk "x86_64 native kernels on an emulated $model CPU ($want)"
                fi
            done
        else
            skip "x86_64 on emulated older CPUs: qemu-user-static could not be installed"
        fi
        if "${clean[@]}" python -m hybridgen demo > "$work/demo.txt" 2>&1 && grep -q "exact modes match full attention" "$work/demo.txt"; then
            grep -v "chunk/s" "$work/demo.txt"
            pass "x86_64 python -m hybridgen demo"
        else
            cat "$work/demo.txt"
            flunk "x86_64 python -m hybridgen demo"
        fi
        # The smoke subset from the checkout's tests, against the installed package; the first
        # test fails unless hybridgen comes from the venv.
        cat > "$work/test_installed.py" <<PY
import hybridgen, hybridgen._native
def test_hybridgen_is_the_installed_wheel():
    assert hybridgen.__file__.startswith("$venv/lib/"), hybridgen.__file__
    assert hybridgen._native.__file__.startswith("$venv/lib/"), hybridgen._native.__file__
PY
        if "${clean[@]}" python -m pytest -q -p no:cacheprovider -c "$repo/pyproject.toml" --rootdir "$repo" \
            "$work/test_installed.py" \
            "$repo/tests/python/test_hybrid_attention.py::test_exact_mode_equals_full_attention" \
            "$repo/tests/python/test_hybrid_attention.py::test_empty_host_tier_is_plain_attention" \
            "$repo/tests/python/native/test_threads_and_isas.py::test_fused_partial_attention_on_every_isa" \
            "$repo/tests/python/apps/test_version.py"; then
            pass "x86_64 pytest smoke subset"
        else
            flunk "x86_64 pytest smoke subset"
        fi
    fi
    cd "$repo"
    rm -rf "$venv"
fi

# -- aarch64 -----------------------------------------------------------------------------------
arm="$(wheel_for aarch64 || true)"
if [ -z "$arm" ]; then
    skip "aarch64: no hybridgen-$version-cp310-abi3-*manylinux_2_17_aarch64.whl in $dir (see python/build_wheels.sh's output)"
else
    echo "== wheels: aarch64 $(basename "$arm") ($(du -h "$arm" | cut -f1))"
    if .venv-build/bin/python tests/wheel_checks.py static "$arm" aarch64; then
        pass "aarch64 static + auditwheel"
    else
        flunk "aarch64 static + auditwheel"
    fi
    # Debian's arm64 Python and numpy, unpacked from their packages into a private root (apt
    # with its own state: the machine's package database is not touched), run by qemu.
    root="${XDG_CACHE_HOME:-$HOME/.cache}/hybridgen/arm64-python"
    why=""
    have_qemu aarch64 || why="qemu-user-static could not be installed"
    if [ -z "$why" ] && [ ! -x "$root/usr/bin/python3" ]; then
        echo "wheels: fetching Debian's arm64 python3 and python3-numpy into $root"
        apt="$root.apt"
        rm -rf "$root" "$apt"
        mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/cache" "$root"
        touch "$apt/status"
        opts=(-o Debug::NoLocking=1 -o APT::Architecture=arm64 -o APT::Architectures::=arm64
              -o Dir::State::Lists="$apt/lists" -o Dir::State::status="$apt/status" -o Dir::Cache="$apt/cache"
              -o Dir::Cache::archives="$apt/archives" -o APT::Sandbox::User=root -o Acquire::Languages=none)
        if command -v apt-get >/dev/null 2>&1 \
            && apt-get "${opts[@]}" -qq update >"$apt/log" 2>&1 \
            && apt-get "${opts[@]}" -y -qq install --download-only --no-install-recommends python3 python3-numpy >>"$apt/log" 2>&1 \
            && unpack "$apt"/archives/*.deb; then
            # The links update-alternatives would make for numpy's BLAS and LAPACK.
            ln -sf blas/libblas.so.3 "$root/usr/lib/aarch64-linux-gnu/libblas.so.3"
            ln -sf lapack/liblapack.so.3 "$root/usr/lib/aarch64-linux-gnu/liblapack.so.3"
            rm -rf "$apt"
        else
            [ -f "$apt/log" ] && tail -5 "$apt/log"
            rm -rf "$root"
            why="Debian's arm64 python3 and python3-numpy could not be fetched with apt-get"
        fi
    fi
    if [ -n "$why" ]; then
        skip "aarch64 native module under qemu: $why"
    else
        unzip -q "$arm" 'hybridgen/_native.abi3.so' -d "$work/aarch64"
        if env -i PATH=/usr/bin:/bin qemu-aarch64-static -L "$root" "$root/usr/bin/python3" -I \
            tests/wheel_checks.py native "$work/aarch64/hybridgen/_native.abi3.so" neon; then
            pass "aarch64 native module and kernels under qemu-aarch64-static"
        else
            flunk "aarch64 native module and kernels under qemu-aarch64-static"
        fi
    fi
fi

echo "wheels: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
