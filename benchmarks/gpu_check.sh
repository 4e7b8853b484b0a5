#!/usr/bin/env bash
# Everything a GPU session checks, in one command, offline, in under 8 minutes on one H100/H200:
#
#   bash benchmarks/gpu_check.sh [WHEELS_DIR] [OUT_DIR]
#
#   1. installs the wheels in WHEELS_DIR (default .whl: this checkout's hybridgen wheel and the
#      Python packages the machine lacks; prepare them where there is network with
#      `bash benchmarks/gpu_wheels.sh .whl`) into a private folder — nothing is downloaded;
#   2. prints what the core sees (version, CUDA probe, NVRTC, the kernels the device loads);
#   3. runs `pytest -m gpu` (kernels vs float64 at up to 128K x batch 4, policies on CUDA vs the
#      CPU path, stream races, page-locking, exact mode; no network);
#   4. measures the device partial's bandwidth against a torch copy of the same bytes;
#   5. a short gpu_llama8b run (Llama-3.1-8B shape, random weights: 32K tokens, batch 1 and 4);
#   6. FlexGen's own KV offloading vs hybrid attention (benchmarks/flexgen_offload.py).
#
# Every step's log and JSON go to OUT_DIR (default benchmarks/results/gpu_check); the summary at
# the end names each step's outcome, and the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-.whl}"
out="${2:-benchmarks/results/gpu_check}"
python="${PYTHON:-python3}"
mkdir -p "$out"
site="${HYBRIDGEN_GPU_SITE:-/tmp/hybridgen-gpu-site}"
export PYTHONUNBUFFERED=1
declare -A status
started=$SECONDS

step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND with a time limit, logs to $out/NAME.log
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - started)) s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    status[$name]=$rc
    echo "== $name: exit $rc"
}

if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $wheels: run 'bash benchmarks/gpu_wheels.sh $wheels' on a machine with network first" >&2
    exit 2
fi
rm -rf "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl || exit 2
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# The tests and benchmarks import hybridgen from the wheel, not from this checkout's python/.
export HYBRIDGEN_DATA="${HYBRIDGEN_DATA:-/tmp/hybridgen-data}"

step about 60 "$python" -c '
import torch, hybridgen
from hybridgen import _native, cuda
print("hybridgen", getattr(hybridgen, "__version__", "?"), "from", hybridgen.__file__)
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())
print("probe", cuda.probe())
print("nvrtc", _native.nvrtc_info())
print("loaded kernels:", _native.load_kernels(torch.cuda.current_device(), cuda.kernel_cache_dir()))
'
step pytest_gpu 240 "$python" -m pytest -p no:cacheprovider -q -m gpu tests/python --junitxml="$out/pytest_gpu.xml"
step kernel_bandwidth 90 "$python" benchmarks/gpu_kernel_bandwidth.py --out "$out"
step llama8b 150 "$python" -m hybridgen bench --model llama8b-random --device cuda --dtype bfloat16 \
    --contexts 32768 --batch 1 4 --gpu-budget 2048 --sinks 4 --k 1024 --policies full aog scheduler \
    --steps 4 --rounds 1 --warmup 2 --out "$out/bench_llama8b-random.json"
step flexgen_offload 120 "$python" benchmarks/flexgen_offload.py --prompt-len 2048 --gen-len 16 \
    --out "$out/flexgen_offload.json"

echo "== summary ($((SECONDS - started)) s; logs and JSON in $out)"
failed=0
for name in about pytest_gpu kernel_bandwidth llama8b flexgen_offload; do
    rc=${status[$name]:-missing}
    echo "  $name: $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)")"
    [ "$rc" = 0 ] || failed=1
done
exit $failed
