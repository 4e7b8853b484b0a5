"""Serving with vLLM: hybridgen's plugin vs stock vLLM on the same prompts, requests × contexts.

For each mode (``stock``: vLLM without plugins; ``hybrid``: the plugin with ``--hybrid-config``;
``offload``: vLLM's own CPU offloading, ``--kv-offloading-size``, GPU only) a fresh process runs
one in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the plugin's counters can be
read), warms it up, then for every cell (``R`` requests of ``C`` prompt tokens each) adds the
requests at once and steps the engine until all have ``--max-tokens`` tokens, timing every
token. Reported per cell: output tokens/s over the cell's wall time, time to first token, p50/p99
inter-token latency, the requests that fit the KV cache at once at full length (vLLM's blocks ÷
blocks per request), the most requests that ran at once and the most blocks they held (measured
each step: the plugin frees a request's blocks between its sinks and its window once its prompt
is computed, so more requests run at once than fit at full length), the greedy tokens' agreement with the stock run, and for ``hybrid`` the host tokens
per request and what hybrid decode did (rows, host tokens attended, strategies).

The model is a Llama shape with random weights (vLLM's ``load_format="dummy"``: only a
``config.json`` is written) and prompts of random token ids (no tokenizer): timings only.

    # CPU, for function (a few minutes on 2 cores):
    .venv-vllm/bin/python benchmarks/vllm_serving.py --device cpu
    # a GPU (unverified so far), Llama-3-8B shape, 32K-128K:
    python benchmarks/vllm_serving.py --shape llama3-8b --contexts 32768,65536,131072 \\
        --requests 1,4,8 --modes stock,hybrid,offload --hybrid-config '{"policy": "all", "gpu_budget": 4096}'
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: Llama shapes (config.json fields); weights are random (vLLM's dummy loader).
SHAPES = {
    # Small enough for 2 CPU cores, head_dim 64 (CPU_ATTN needs >= 32), GQA 4:1.
    "small": dict(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}
VOCAB = {"small": 4096, "llama3-8b": 128256}

LABEL_CPU = (
    "CPU function run: vLLM's CPU backend on a shared development machine, random weights; shows that the "
    "benchmark and the plugin run end to end, not how fast hybrid attention is on a GPU server"
)


def write_model(folder: Path, shape: str, max_len: int) -> Path:
    """A Llama ``config.json`` of ``shape`` (no weights: vLLM's dummy loader makes them)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB[shape],
        "max_position_embeddings": max_len,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **SHAPES[shape],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def percentile(xs: list[float], p: float):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


# --- one mode, in its own process ---------------------------------------------------------------
def worker(args) -> None:
    """Runs every cell with one engine and prints the results as JSON on the last stdout line."""
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    cells = [(r, c) for c in args.contexts for r in args.requests]
    engine_args = dict(
        model=str(args.model_dir),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_model_len=max(args.contexts) + args.max_tokens + 16,
        max_num_seqs=max(args.requests),
        max_num_batched_tokens=args.batched_tokens,
        enable_prefix_caching=False,
        enforce_eager=args.eager,
        seed=0,
    )
    if args.mode == "offload":
        engine_args["kv_offloading_size"] = args.offload_gib
    if args.kv_blocks:
        engine_args["num_gpu_blocks_override"] = args.kv_blocks
    t0 = time.perf_counter()
    llm = LLM(**engine_args)
    startup = time.perf_counter() - t0
    engine = llm.llm_engine
    cache = engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    scheduler = engine.engine_core.engine_core.scheduler  # in process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    pool = scheduler.kv_cache_manager.block_pool

    def stats():
        if args.mode != "hybrid":
            return {}
        import hybridgen.vllm

        return hybridgen.vllm.stats()

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    engine.add_request(
        "warm-up", {"prompt_token_ids": list(range(2, 66))}, SamplingParams(max_tokens=4, detokenize=False)
    )
    while engine.has_unfinished_requests():
        engine.step()

    total = sum(r for r, _ in cells) * args.max_tokens
    bar = tqdm(total=total, desc=f"{args.mode:>7}", unit="tok", file=sys.stderr, dynamic_ncols=True)
    results = []
    for n, (reqs, ctx) in enumerate(cells):
        rng = random.Random(1000 * reqs + ctx)  # the same prompts in every mode
        prompts = {f"c{n}-r{i}": [rng.randrange(2, VOCAB[args.shape]) for _ in range(ctx)] for i in range(reqs)}
        before = stats()
        times = {rid: [] for rid in prompts}
        tokens = {}
        peak_running = peak_blocks = 0
        start = time.perf_counter()
        for rid, p in prompts.items():
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            peak_running = max(peak_running, len(scheduler.running))
            peak_blocks = max(peak_blocks, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
            for o in outs:
                got = len(o.outputs[0].token_ids)
                bar.update(got - len(times[o.request_id]))
                times[o.request_id] += [now] * (got - len(times[o.request_id]))
                tokens[o.request_id] = list(o.outputs[0].token_ids)
        wall = time.perf_counter() - start
        after = stats()
        itl = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
        ttft = [ts[0] - start for ts in times.values() if ts]
        out_tokens = sum(len(ts) for ts in times.values())
        cell = {
            "requests": reqs,
            "context": ctx,
            "max_tokens": args.max_tokens,
            "wall_s": round(wall, 4),
            "output_tokens": out_tokens,
            "tokens_per_s": round(out_tokens / wall, 3),
            "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 3),
            "itl_p50_ms": round(1e3 * percentile(itl, 50), 3) if itl else None,
            "itl_p99_ms": round(1e3 * percentile(itl, 99), 3) if itl else None,
            "max_concurrent_requests": None
            if not blocks
            else (blocks - 1) // -(-(ctx + args.max_tokens) // cache.block_size),
            "peak_running_requests": peak_running,
            "peak_blocks_in_use": peak_blocks,
            "tokens": [tokens[rid] for rid in prompts],
        }
        if args.mode == "hybrid":
            # vLLM's engine ids are the caller's plus "-" and 8 random characters.
            finished = after.get("finished_requests", [])
            done = {r["req_id"].rsplit("-", 1)[0]: r for r in finished if r["req_id"].rsplit("-", 1)[0] in prompts}
            cell["host_tokens_per_request"] = [done[rid]["host_tokens"] if rid in done else None for rid in prompts]
            cell["hybrid"] = {
                key: after[key] - before[key]
                for key in ("hybrid_rows", "stock_rows", "host_tokens_read", "host_keys_scored", "untracked")
            }
            cell["hybrid"]["rows_by_strategy"] = {
                s: after["rows_by_strategy"][s] - before["rows_by_strategy"][s] for s in after["rows_by_strategy"]
            }
        results.append(cell)
    bar.close()
    out = {
        "mode": args.mode,
        "startup_s": round(startup, 2),
        "kv_cache_blocks": blocks,
        "block_size": cache.block_size,
        "async_scheduling": engine.vllm_config.scheduler_config.async_scheduling,
        "kv_connector": getattr(engine.vllm_config.kv_transfer_config, "kv_connector", None),
        "cells": results,
    }
    print(json.dumps(out))


# --- the orchestration ---------------------------------------------------------------------------
def run_mode(args, mode: str, model_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRIDGEN_CONFIG", "VLLM_PLUGINS")}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_gib))
    if mode == "hybrid":
        env["HYBRIDGEN_CONFIG"] = args.hybrid_config
    else:
        env["VLLM_PLUGINS"] = ""  # vLLM without any plugin
    cmd = [sys.executable, __file__, "--worker", mode, "--model-dir", str(model_dir), *args.passthrough]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(
            f"{mode}: the engine process failed (exit {proc.returncode}); its output:\n{proc.stdout[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(modes: dict) -> list[dict]:
    """One row per (cell, mode): the numbers a reader compares, tokens replaced by their agreement."""
    rows = []
    stock = modes.get("stock")
    for mode, res in modes.items():
        for i, cell in enumerate(res["cells"]):
            row = {k: v for k, v in cell.items() if k != "tokens"}
            row["mode"] = mode
            if stock is not None and mode != "stock":
                ref = stock["cells"][i]["tokens"]
                same = sum(a == b for x, y in zip(ref, cell["tokens"]) for a, b in zip(x, y))
                row["tokens_equal_stock"] = round(same / max(1, sum(len(x) for x in ref)), 4)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (cpu: small, cuda: llama3-8b)")
    p.add_argument("--contexts", type=_ints, default=None, help="prompt tokens per request (cpu: 1024,4096)")
    p.add_argument("--requests", type=_ints, default=None, help="requests at once (cpu: 1,4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--modes", default=None, help="stock,hybrid[,offload] (offload: GPU only; cpu: stock,hybrid)")
    p.add_argument(
        "--hybrid-config",
        default=None,
        help='HYBRIDGEN_CONFIG of the hybrid mode (cpu: {"policy": "all", "gpu_budget": 256, "sinks": 4})',
    )
    p.add_argument("--dtype", default=None, help="model dtype (cpu: float32, cuda: bfloat16)")
    p.add_argument("--batched-tokens", type=int, default=2048, help="vLLM's max_num_batched_tokens (chunked prefill)")
    p.add_argument("--offload-gib", type=float, default=16.0, help="vLLM's kv_offloading_size in the offload mode")
    p.add_argument("--cpu-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE on the CPU")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="vLLM's num_gpu_blocks_override: a pool this small (one is vLLM's null block)",
    )
    p.add_argument("--no-eager", dest="eager", action="store_false", help="let vLLM compile (slow start on a CPU)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per mode before giving up")
    p.add_argument("--out", type=Path, default=None, help="JSON result (default benchmarks/results/...)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.shape = args.shape or ("small" if cpu else "llama3-8b")
    args.contexts = args.contexts or ([1024, 4096] if cpu else [32768, 65536, 131072])
    args.requests = args.requests or ([1, 4] if cpu else [1, 4, 8])
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.hybrid_config = args.hybrid_config or json.dumps(
        {"policy": "all", "gpu_budget": 256 if cpu else 4096, "sinks": 4}
    )
    if args.worker:
        args.mode = args.worker
        worker(args)
        return
    modes = (args.modes or ("stock,hybrid" if cpu else "stock,hybrid,offload")).split(",")
    args.passthrough = [
        f"--device={args.device}",
        f"--shape={args.shape}",
        f"--contexts={','.join(map(str, args.contexts))}",
        f"--requests={','.join(map(str, args.requests))}",
        f"--max-tokens={args.max_tokens}",
        f"--dtype={args.dtype}",
        f"--batched-tokens={args.batched_tokens}",
        f"--offload-gib={args.offload_gib}",
        f"--hybrid-config={args.hybrid_config}",
        *([] if args.eager else ["--no-eager"]),
        *([f"--kv-blocks={args.kv_blocks}"] if args.kv_blocks else []),
    ]
    import torch

    from hybridgen.apps.bench.report import machine_info

    machine = machine_info(torch.device("cuda" if not cpu else "cpu"))
    load_before = machine.pop("load_average")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "model", args.shape, max(args.contexts) + args.max_tokens + 16)
        t0 = time.perf_counter()
        for mode in modes:
            print(f"vllm_serving: {mode} ({len(args.contexts) * len(args.requests)} cells)", file=sys.stderr)
            results[mode] = run_mode(args, mode, model_dir)
        elapsed = time.perf_counter() - t0
    import vllm

    report = {
        "label": LABEL_CPU if cpu else "GPU run",
        "command": " ".join([_interpreter(), *sys.argv]),
        "machine": {
            **machine,
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
            "vllm": vllm.__version__,
        },
        "model": {"shape": args.shape, **SHAPES[args.shape], "vocab_size": VOCAB[args.shape], "dtype": args.dtype},
        "hybrid_config": json.loads(args.hybrid_config),
        "max_tokens": args.max_tokens,
        "elapsed_s": round(elapsed, 1),
        "engines": {m: {k: v for k, v in r.items() if k != "cells"} for m, r in results.items()},
        "rows": summarize(results),
    }
    out = args.out or RESULTS / f"vllm_serving_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for row in report["rows"]:
        print(
            f"{row['mode']:>7} R={row['requests']:<3} C={row['context']:<7} {row['tokens_per_s']:>9.1f} tok/s  "
            f"ITL p50 {row['itl_p50_ms']} ms p99 {row['itl_p99_ms']} ms  "
            f"ran at once {row['peak_running_requests']} (fit at full length {row['max_concurrent_requests']})"
            + (f"  host tokens/request {row['host_tokens_per_request']}" if row["mode"] == "hybrid" else "")
        )
    print(f"vllm_serving: wrote {out}")


def _interpreter() -> str:
    """The Python that ran this, relative to the working directory where it lies below it."""
    rel = os.path.relpath(sys.executable)
    return sys.executable if rel.startswith("..") else rel


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
