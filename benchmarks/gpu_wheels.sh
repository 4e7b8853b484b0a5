#!/usr/bin/env bash
# Prepares the wheels benchmarks/gpu_check.sh installs on a GPU machine without network:
#
#   bash benchmarks/gpu_wheels.sh [DIR]          (default DIR: .whl)
#
# Run it here, where there is network: it builds this checkout's hybridgen wheel (abi3, so any
# CPython >= 3.10 there loads it) and downloads, without their dependencies, the packages whose
# versions a stock CUDA image lacks or has too old, at the versions python/constraints.txt locks
# (the image already has torch with CUDA, numpy, accelerate, safetensors, tqdm, pytest...).
# Keep DIR out of git (e.g. `echo /.whl/ >> .git/info/exclude`); it stays well under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
bash python/bootstrap.sh >/dev/null
mkdir -p "$dir"
rm -f "$dir"/hybridgen-*.whl
.venv/bin/python -m pip wheel -q --no-deps -w "$dir" .
pin() { grep -i "^$1==" python/constraints.txt | head -1; }
python_version="${GPU_PYTHON_VERSION:-3.12}"
for name in transformers huggingface_hub tokenizers flexgen PuLP; do
    spec="$(pin "$name")"
    [ -n "$spec" ] || { echo "$name is not in python/constraints.txt" >&2; exit 1; }
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$dir" "$spec"
done
du -sh "$dir"
ls -1 "$dir"
