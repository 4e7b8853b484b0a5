#!/usr/bin/env bash
# The GPU benchmark: a Llama-3.1-8B-shaped model with random weights (bf16) at 32K/64K/128K
# tokens, batch 1 and 4, device KV budget 4 sinks + 2048 recent tokens (far below the context),
# every policy at the same extra token budget k, full attention where it fits, all in one run.
# Writes benchmarks/results/bench_llama8b-random.{json,png}; the JSON's "bars" hold the
# scheduler's speed-up over aog and over the fastest selective baseline, "largest_fit" the
# largest batch x context each policy ran. Needs a CUDA GPU (sized for an 80 GB H100) and
# ~100 GB of host RAM (policies whose caches do not fit are recorded as skipped, with why).
set -euo pipefail
cd "$(dirname "$0")/.."
bash python/bootstrap.sh bench
exec .venv/bin/python -m hybridgen bench --model llama8b-random --device cuda --dtype bfloat16 \
    --contexts 32768 65536 131072 --batch 1 4 --gpu-budget 2048 --sinks 4 --k 1024 \
    --policies full aog aoc streaming h2o infinigen scheduler --steps 16 --rounds 2 --warmup 4 "$@"
