"""Host overhead of hybridgen's decode path per layer: the Python + FFI cost of one decode step,
on a model so small that the attention math itself is negligible.

A tiny random Llama (--layers layers, hidden 64) decodes in alternation unpatched (its own SDPA,
a DynamicCache) and patched (policy ``all``, LSE merge) from the same prompt. With a prompt that
fits the device tier (host store empty) the difference is the engine's bookkeeping; with
--host-tokens tokens on the host it adds the CPU stage (one native call per layer) and the merge.
Reports the median extra microseconds per layer and per step, and counts the calls into the
native store per layer and step (the decode engine's contract: one).

    .venv/bin/python benchmarks/engine_overhead.py
    .venv/bin/python benchmarks/engine_overhead.py --baseline 4a0d576 --rounds 5

``--baseline REV`` measures another revision in the same run: its tree is checked out beside this
one (a git worktree under ``target/``) with its own native core built there, and the two trees run
this script in alternation, ``--rounds`` times each, so load on a shared machine falls on both; the
record holds every round, the medians and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import hybridgen
from hybridgen import HybridConfig
from hybridgen.apps.bench import machine_info
from hybridgen.hf.compat import cache_arg

RESULTS = Path(__file__).parent / "results"


class _Counting:
    """Counts the calls made on the native store object it stands in for."""

    def __init__(self, inner):
        self._inner, self.calls = inner, Counter()

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if not callable(value):
            return value

        def counted(*a, **k):
            self.calls[name] += 1
            return value(*a, **k)

        return counted


def tiny_llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval()


def measure(layers: int, prompt: int, budget: int, steps: int) -> dict:
    base, hyb = tiny_llama(layers), tiny_llama(layers)
    hybridgen.patch(
        hyb,
        HybridConfig(
            policy="all", merge="lse", gpu_budget=budget, sinks=4, evict_chunk=4 * steps, max_context=prompt + 4 * steps
        ),
    )
    ids = torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(1))
    base_cache, cache = DynamicCache(), hybridgen.HybridCache(hyb)
    times: tuple[list, list] = ([], [])
    with torch.inference_mode():
        tokens = [m(ids, **cache_arg(c)).logits[:, -1:].argmax(-1) for m, c in ((base, base_cache), (hyb, cache))]
        counter = cache.store._native = _Counting(cache.store._native)
        for step in range(steps):
            for i, (m, c) in enumerate(((base, base_cache), (hyb, cache))):
                t0 = time.perf_counter()
                tokens[i] = m(tokens[i], **cache_arg(c)).logits[:, -1:].argmax(-1)
                if step >= 5:  # warm-up
                    times[i].append(time.perf_counter() - t0)
    hybridgen.unpatch(hyb)
    if cache.decode_steps != steps:
        raise SystemExit(
            f"engine_overhead: the patched model ran {cache.decode_steps} hybrid decode steps, expected {steps}"
        )
    base_us, hyb_us = 1e6 * statistics.median(times[0]), 1e6 * statistics.median(times[1])
    crossings = sum(counter.calls.values()) / (steps * layers)
    return {
        "layers": layers,
        "prompt": prompt,
        "host_tokens": cache.host_tokens(0),
        "steps_measured": len(times[0]),
        "unpatched_us_per_step": base_us,
        "hybrid_us_per_step": hyb_us,
        "overhead_us_per_layer": (hyb_us - base_us) / layers,
        "native_store_calls_per_layer_step": crossings,
        "native_store_calls": dict(counter.calls),
    }


ROOT = Path(__file__).resolve().parents[1]


def baseline_tree(rev: str) -> Path:
    """A checkout of ``rev`` with its native core built (kept under target/ for the next run)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = ROOT / "target" / f"baseline-{sha}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True)
    native = tree / "python" / "hybridgen" / "_native.abi3.so"
    if not native.exists():
        print(f"building the native core of {sha} (release; a few minutes the first time)", flush=True)
        target = ROOT / "target" / "baseline-build"
        subprocess.run(
            ["cargo", "build", "--release", "--quiet", "--features", "python", "--lib"],
            cwd=tree,
            check=True,
            env={**os.environ, "CARGO_TARGET_DIR": str(target)},
        )
        native.write_bytes((target / "release" / "libhybridgen.so").read_bytes())
    return tree


def compare(args) -> int:
    """This tree and ``args.baseline``'s in alternation (see the module docstring)."""
    trees = {"baseline": baseline_tree(args.baseline), "current": ROOT}
    rounds: dict = {name: [] for name in trees}
    loads = []
    for r in range(args.rounds):
        for name, tree in trees.items():
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run.json"
                cmd = [
                    sys.executable,
                    str(tree / "benchmarks" / "engine_overhead.py"),
                    "--layers",
                    str(args.layers),
                    "--steps",
                    str(args.steps),
                    "--host-tokens",
                    str(args.host_tokens),
                    "--out",
                    str(out),
                ]
                subprocess.run(
                    cmd,
                    cwd=tree,
                    check=True,
                    capture_output=True,
                    env={**os.environ, "PYTHONPATH": str(tree / "python")},
                )
                rounds[name].append(json.loads(out.read_text())["results"])
            loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    summary = {}
    for name, runs in rounds.items():
        summary[name] = [
            {
                "host_tokens": runs[0][i]["host_tokens"],
                "overhead_us_per_layer": statistics.median(run[i]["overhead_us_per_layer"] for run in runs),
                "native_store_calls_per_layer_step": runs[0][i]["native_store_calls_per_layer_step"],
            }
            for i in range(len(runs[0]))
        ]
    for i, row in enumerate(summary["current"]):
        before = summary["baseline"][i]["overhead_us_per_layer"]
        print(
            f"host tokens {row['host_tokens']:>5}: overhead per layer {before:6.0f} us ({args.baseline}) -> "
            f"{row['overhead_us_per_layer']:6.0f} us (this tree), median of {args.rounds} alternating rounds; "
            f"native store calls per layer and step {summary['baseline'][i]['native_store_calls_per_layer_step']:.2f}"
            f" -> {row['native_store_calls_per_layer_step']:.2f}"
        )
    record = {
        "command": "python benchmarks/engine_overhead.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(torch.device("cpu")),
        "torch_threads": 1,
        "baseline": args.baseline,
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "medians": summary,
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--host-tokens", type=int, default=256, help="host tokens in the second configuration")
    p.add_argument("--baseline", help="a git revision to measure in alternation with this tree")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per tree (with --baseline)")
    p.add_argument("--out", type=Path, default=RESULTS / "engine_overhead.json")
    args = p.parse_args(argv)
    if args.baseline:
        return compare(args)
    torch.set_num_threads(1)  # the overhead, not the cores, is what this measures
    budget = 64
    rows = [
        measure(args.layers, 32, budget, args.steps),  # fits the device tier: host store empty
        measure(args.layers, 4 + budget + args.host_tokens, budget, args.steps),
    ]
    for r in rows:
        print(
            f"host tokens {r['host_tokens']:>5}: unpatched {r['unpatched_us_per_step']:8.0f} us/step, hybrid "
            f"{r['hybrid_us_per_step']:8.0f} us/step -> {r['overhead_us_per_layer']:6.0f} us per layer; "
            f"native store calls per layer and step: {r['native_store_calls_per_layer_step']:.2f}"
        )
    record = {
        "command": "python benchmarks/engine_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(torch.device("cpu")),
        "torch_threads": 1,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
