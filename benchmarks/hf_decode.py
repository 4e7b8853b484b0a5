"""Decode latency of a transformers model with hybridgen vs the unpatched model, in one run.

Two instances of the model are loaded: one unpatched (its own SDPA attention, a DynamicCache)
and one patched with hybridgen (a HybridCache). For each context length both prefill the same
random prompt in chunks; then, for each hybrid variant, the two decode ``--steps`` tokens in
alternation — one step unpatched, one step hybrid — so that the machine's drifting load hits
both alike, and the medians (after two warm-up steps) are compared. Hybrid variants share one
prefilled HybridCache and switch policy between runs (each run adds ``--steps`` tokens to both
contexts, negligible next to their length).

    .venv/bin/python benchmarks/hf_decode.py   # SmolLM2-135M at 4K and 16K tokens, float32, CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache

from hybridgen import HybridConfig
from hybridgen.apps.bench import machine_info
from hybridgen.data import assets
from hybridgen.hf import HybridCache, patch, unpatch
from hybridgen.hf.compat import cache_arg

RESULTS = Path(__file__).parent / "results"

VARIANTS = {
    # name: HybridConfig overrides
    "hybrid exact (lse)": dict(policy="all", merge="lse"),
    "hybrid exact (concat)": dict(policy="all", merge="concat"),
    "hybrid exact (lse), pipelined": dict(policy="all", merge="lse", pipeline=True),
    "hybrid post_qkt k=256": dict(policy="post_qkt", k=256, merge="lse"),
    "hybrid pre_qkt k=256": dict(policy="pre_qkt", k=256, merge="lse"),
    "hybrid post_qkt k=256, speculative": dict(policy="post_qkt", k=256, merge="lse", pipeline=True, speculative=True),
    "hybrid scheduler": dict(policy="scheduler", merge="lse"),
}


def prefill(model, ids, cache, chunk):
    with torch.inference_mode():
        for s in tqdm(range(0, ids.shape[1], chunk), desc="prefill", unit="chunk", leave=False):
            out = model(ids[:, s : s + chunk], **cache_arg(cache), use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def paired_decode(base, base_cache, base_token, hyb, hyb_cache, hyb_token, steps):
    """Alternating decode steps; returns the median step time of each and the next tokens."""
    times = ([], [])
    with torch.inference_mode():
        for _ in range(steps):
            for i, (model, cache) in enumerate(((base, base_cache), (hyb, hyb_cache))):
                token = base_token if i == 0 else hyb_token
                t0 = time.perf_counter()
                out = model(token, **cache_arg(cache), use_cache=True)
                times[i].append(time.perf_counter() - t0)
                if i == 0:
                    base_token = out.logits[:, -1:].argmax(-1)
                else:
                    hyb_token = out.logits[:, -1:].argmax(-1)
    return statistics.median(times[0][2:]), statistics.median(times[1][2:]), base_token, hyb_token


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gpu-budget", type=int, default=512)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    p.add_argument("--model", default=None, help="model path (default SmolLM2-135M)")
    p.add_argument("--out", type=Path, default=RESULTS / "hf_decode.json")
    args = p.parse_args()

    torch.manual_seed(0)
    path = args.model or assets.smollm2()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hyb = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for n in args.contexts:
        ids = torch.randint(100, base.config.vocab_size - 100, (1, n))
        config = HybridConfig(gpu_budget=args.gpu_budget, sinks=4, max_context=n + 4 * args.steps * len(VARIANTS))
        patch(hyb, config)
        base_cache, cache = DynamicCache(), HybridCache(hyb)
        base_token = prefill(base, ids, base_cache, args.chunk)
        token = prefill(hyb, ids, cache, args.chunk)
        for name, overrides in VARIANTS.items():
            cache.set_config(replace(config, **overrides))  # a fresh policy (and scheduler) per variant
            cache.telemetry.clear()
            ran = cache.decode_steps
            t_base, t, base_token, token = paired_decode(base, base_cache, base_token, hyb, cache, token, args.steps)
            if cache.decode_steps - ran != args.steps or cache.config.policy != overrides["policy"]:
                raise SystemExit(
                    f"hf_decode: {name} ran {cache.decode_steps - ran} of {args.steps} steps through "
                    f"policy {cache.config.policy!r}: its row would not measure hybrid attention"
                )
            s = cache.telemetry.summary()
            rows.append(
                {
                    "context": n,
                    "variant": name,
                    "ms_per_token": 1e3 * t,
                    "unpatched_ms_per_token": 1e3 * t_base,
                    "ratio_to_unpatched": t / t_base,
                    "speedup_vs_unpatched": t_base / t,
                    "k_last": s.get("k_last"),
                    "strategy_share": s.get("strategy_share"),
                    "cpu_ms_per_step": s.get("t_cpu_per_step_ms"),
                    "device_ms_per_step": s.get("t_gpu_per_step_ms"),
                    "host_tokens": s.get("host_tokens_last"),
                    "cpu_hidden_share": s.get("cpu_hidden_share"),
                }
            )
            print(
                f"{n:>6} tokens | {name:<36} {1e3 * t:7.1f} ms/token vs unpatched {1e3 * t_base:7.1f} "
                f"-> {t / t_base:.2f}x  (K {s.get('k_last')}, CPU hidden {s.get('cpu_hidden_share', 0):.0%})",
                flush=True,
            )
        unpatch(hyb)
        del cache, base_cache

    record = {
        "command": "python benchmarks/hf_decode.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out" and v is not None
        ),
        "model": str(args.model or "SmolLM2-135M-Instruct"),
        "machine": machine_info(torch.device("cpu")),
        "gpu_budget": args.gpu_budget,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, c in zip(axes[0], contexts):
        sel = [r for r in rows if r["context"] == c]
        x = range(len(sel))
        ax.bar(
            [i - 0.2 for i in x], [r["unpatched_ms_per_token"] for r in sel], 0.4, label="unpatched (sdpa), paired run"
        )
        bars = ax.bar([i + 0.2 for i in x], [r["ms_per_token"] for r in sel], 0.4, label="hybridgen")
        ax.bar_label(bars, labels=[f"{r['ratio_to_unpatched']:.2f}x" for r in sel], fontsize=7)
        ax.set_xticks(list(x), [r["variant"].replace("hybrid ", "") for r in sel], rotation=25, ha="right", fontsize=7)
        ax.set_title(f"{c} tokens", fontsize=9)
        ax.set_ylabel("decode ms/token")
    axes[0][0].legend(fontsize=7)
    m = record["machine"]
    fig.suptitle(
        f"{record['model']} on {m['cpu']} ({m['native_threads']} threads, {m['isa']}), device budget {record['gpu_budget']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
