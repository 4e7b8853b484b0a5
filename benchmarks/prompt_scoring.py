"""Prompt scoring of the heavy-hitter baselines (``h2o``, ``keyformer``): seconds per layer.

Times ``HeavyHitterPolicy.prefill`` (every prompt query against the keys it sees, causal blocks
of queries within ``PROMPT_BLOCK_BYTES['cpu']``) against the algorithm it replaced, kept below as
:func:`old_scores`: blocks of 256 queries against all ``n`` keys, masked future and all, the
keys converted to float32 again per block. One layer, batch 1, float32 random queries and keys,
no padding; both run in turn at every length, and the largest relative difference of their
scores is printed (H2O; Keyformer's noise is drawn per block, so its scores differ by design).

    .venv/bin/python benchmarks/prompt_scoring.py                       # n = 4096 8192 16384, h2o
    .venv/bin/python benchmarks/prompt_scoring.py --n 32768 --no-old    # the new code alone
    .venv/bin/python benchmarks/prompt_scoring.py --policy keyformer --budget-mb 8 32 128 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridgen import HybridConfig
from hybridgen.engine import Engine, ModelInfo
from hybridgen.policies import heavy_hitter


def old_scores(policy: str, query, key, scale: float, block: int = 256) -> torch.Tensor:
    """The replaced ``prefill`` loop (``keep=None``): accumulated scores ``[b, hkv, n]``."""
    b, hq, nq, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    gen = torch.Generator().manual_seed(0)
    inc = torch.zeros((b, hkv, n))
    for lo in range(0, nq, block):
        hi = min(lo + block, nq)
        qb = query[:, :, lo:hi].float().reshape(b, hkv, hq // hkv, hi - lo, d)
        x = torch.matmul(qb, key.float().unsqueeze(2).transpose(-1, -2)) * scale
        ignore = torch.arange(n) > (torch.arange(lo, hi) + (n - nq)).unsqueeze(1)
        x = x.masked_fill(ignore.view(-1, 1, 1, hi - lo, n), float("-inf"))
        p = torch.softmax(x, dim=-1).nan_to_num(0.0)
        if policy == "keyformer":  # τ = 1 at the prefill
            u = torch.rand(x.shape, generator=gen).clamp_(1e-20, 1.0)
            p = torch.softmax(x + -torch.log(-torch.log(u)), dim=-1).nan_to_num(0.0)
        inc += p.sum(dim=(2, 3))
    return inc


def new_scores(policy: str, query, key, scale: float) -> torch.Tensor:
    """Through an engine: the policy's own ``prefill``; returns its ``acc [b, hkv, n]``."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    info = ModelInfo("qwen2", layers=1, q_heads=hq, kv_heads=hkv, head_dim=d, max_positions=n + 1)
    eng = Engine(HybridConfig(policy=policy, gpu_budget=1024, sinks=4, k=1024), info)
    eng.plan(batch=b, dtype=key.dtype, device="cpu", max_tokens=n + 1)
    eng.place(0, key, key, prompt=True)
    t = Timer()
    eng.prefill(0, query, key, key, None, scale)
    new_scores.took = t.took()
    return eng.tiers[0].policy_state.acc


class Timer:
    """Wall-clock and this process's CPU seconds since it was made (shared machines: the CPU time
    of a single thread is the steadier figure)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def took(self) -> str:
        return f"{time.perf_counter() - self.wall:7.2f} s/layer (CPU {time.process_time() - self.cpu:6.2f} s)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384], help="prompt lengths")
    ap.add_argument("--hkv", type=int, default=2, help="KV heads")
    ap.add_argument("--g", type=int, default=7, help="query heads per KV head")
    ap.add_argument("--d", type=int, default=64, help="head dim")
    ap.add_argument("--policy", choices=["h2o", "keyformer"], default="h2o")
    ap.add_argument("--budget-mb", type=float, nargs="+", help="PROMPT_BLOCK_BYTES['cpu'] values to time (MiB)")
    ap.add_argument("--no-old", action="store_true", help="skip the replaced algorithm")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(mb * 2**20) for mb in args.budget_mb or [heavy_hitter.PROMPT_BLOCK_BYTES["cpu"] / 2**20]]
    print(f"{args.policy}, hkv={args.hkv} g={args.g} d={args.d}, float32, {torch.get_num_threads()} threads")
    for n in args.n:
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(1, args.hkv * args.g, n, args.d, generator=gen)
        k = torch.randn(1, args.hkv, n, args.d, generator=gen)
        scale = args.d**-0.5
        line = f"n={n:6d}"
        if not args.no_old:
            t = Timer()
            want = old_scores(args.policy, q, k, scale)
            line += f"  old {t.took()}"
        for budget in budgets:
            heavy_hitter.PROMPT_BLOCK_BYTES["cpu"] = budget
            got = new_scores(args.policy, q, k, scale)
            line += f"  new[{budget / 2**20:g} MiB] {new_scores.took}"
            if not args.no_old and args.policy == "h2o":
                line += f" (max rel diff {((got - want).abs().max() / want.abs().max()).item():.1e})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
