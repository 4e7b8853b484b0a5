"""Host overhead of hybridgen's decode path per layer: the Python + FFI cost of one decode step,
on a model so small that the attention math itself is negligible.

A tiny random Llama (--layers layers, hidden 64) decodes in alternation unpatched (its own SDPA,
a DynamicCache) and patched (policy ``all``, LSE merge) from the same prompt. With a prompt that
fits the device tier (host store empty) the difference is the engine's bookkeeping; with
--host-tokens tokens on the host it adds the CPU stage (one native call per layer) and the merge.
Reports the median extra microseconds per layer and per step, and counts the calls into the
native store per layer and step (the decode engine's contract: one).

    .venv/bin/python benchmarks/engine_overhead.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaForCausalLM(config).eval()


def measure(layers: int, prompt: int, budget: int, steps: int) -> dict:
    base, hyb = tiny_llama(layers), tiny_llama(layers)
    hybridgen.patch(hyb, HybridConfig(policy="all", merge="lse", gpu_budget=budget, sinks=4, evict_chunk=4 * steps,
                                      max_context=prompt + 4 * steps))
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
        raise SystemExit(f"engine_overhead: the patched model ran {cache.decode_steps} hybrid decode steps, expected {steps}")
    base_us, hyb_us = 1e6 * statistics.median(times[0]), 1e6 * statistics.median(times[1])
    crossings = sum(counter.calls.values()) / (steps * layers)
    return {"layers": layers, "prompt": prompt, "host_tokens": cache.host_tokens(0), "steps_measured": len(times[0]),
            "unpatched_us_per_step": base_us, "hybrid_us_per_step": hyb_us,
            "overhead_us_per_layer": (hyb_us - base_us) / layers, "native_store_calls_per_layer_step": crossings,
            "native_store_calls": dict(counter.calls)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--host-tokens", type=int, default=256, help="host tokens in the second configuration")
    p.add_argument("--out", type=Path, default=RESULTS / "engine_overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the overhead, not the cores, is what this measures
    budget = 64
    rows = [measure(args.layers, 32, budget, args.steps),  # fits the device tier: host store empty
            measure(args.layers, 4 + budget + args.host_tokens, budget, args.steps)]
    for r in rows:
        print(f"host tokens {r['host_tokens']:>5}: unpatched {r['unpatched_us_per_step']:8.0f} us/step, hybrid "
              f"{r['hybrid_us_per_step']:8.0f} us/step -> {r['overhead_us_per_layer']:6.0f} us per layer; "
              f"native store calls per layer and step: {r['native_store_calls_per_layer_step']:.2f}")
    record = {"command": "python benchmarks/engine_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(torch.device("cpu")), "torch_threads": 1, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
