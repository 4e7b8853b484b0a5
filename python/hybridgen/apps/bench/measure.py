"""Measuring one context length and batch size: one shared prefill, each policy's cache placed
from it, warm-up, interleaved decode rounds, a row per policy (proved to have run its policy)."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...config import HybridConfig
from ...engine import PromptRecorder
from ...guard import require_hybrid_run
from ...hf.compat import cache_arg
from .planning import free_memory, plan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, ids: torch.Tensor, config: HybridConfig, chunk: int, window: int):
    """The prompt through a fresh HybridCache in chunks: ``(cache, next tokens, seconds, recorder)``;
    the recorder keeps each layer's last ``window`` queries (the tokens stay in the cache)."""
    from ...hf import HybridCache

    cache = HybridCache(model, config)
    recorder = cache.engine.on_prefill = PromptRecorder(window=window, kv=False)
    _sync(ids.device)
    t0 = time.perf_counter()
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s : s + chunk], **cache_arg(cache), use_cache=True, logits_to_keep=1)
    _sync(ids.device)
    seconds = time.perf_counter() - t0
    cache.engine.on_prefill = None
    return cache, out.logits[:, -1:].argmax(-1), seconds, recorder


def place(model, source, config: HybridConfig, recorder: PromptRecorder):
    """A new cache for ``config`` holding ``source``'s prompt, placed as the prompt step would
    place it; a policy that looks at the prompt sees the recorded queries. ``(cache, seconds)``."""
    from ...hf import HybridCache

    cache = HybridCache(model, config)
    device = source.layers[0].keys.device
    _sync(device)
    t0 = time.perf_counter()
    for i in range(len(source.layers)):
        k, v = source.layers[i].tier.logical_kv()
        recorder.replay(cache.engine, i, k, v, place=cache.place_prompt)
        del k, v
    _sync(device)
    return cache, time.perf_counter() - t0


@dataclass
class _Run:
    """One policy's cache and what its decode steps measured."""

    cache: object
    token: torch.Tensor
    placement_s: float
    rounds: list = field(default_factory=list)  # per round: step seconds
    measured: set = field(default_factory=set)  # cache.step values of the measured steps

    def step(self, model, measure: bool) -> float:
        device = self.token.device
        if measure:
            self.measured.add(self.cache.step)
        _sync(device)
        t0 = time.perf_counter()
        out = model(self.token, **cache_arg(self.cache), use_cache=True, logits_to_keep=1)
        _sync(device)
        seconds = time.perf_counter() - t0
        self.token = out.logits[:, -1:].argmax(-1)
        return seconds


def _row(
    policy: str, n: int, batch: int, run: _Run, prefill_s: float, warmup: int, estimate: dict, exact: bool
) -> dict:
    from ...telemetry import Telemetry

    steps = warmup + sum(len(r) for r in run.rounds)
    require_hybrid_run(
        run.cache,
        what=f"bench row {policy} at {n} tokens x {batch}",
        decode_steps=steps,
        context_tokens=n,
        policy=policy,
    )
    round_ms = [1e3 * statistics.median(r) for r in run.rounds]
    ms = statistics.median(round_ms)
    tel = run.cache.telemetry
    s = Telemetry([r for r in tel.records if r.step in run.measured]).summary()
    parts = {k: s[f"t_{k}_per_step_ms"] for k in ("cpu", "gpu", "tx")}
    total = sum(parts.values()) or 1.0
    return {
        "policy": policy,
        "context": n,
        "batch": batch,
        "status": "ok",
        "exact": exact,
        "ms_per_token": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "round_ms": round_ms,
        "step_ms": [1e3 * t for r in run.rounds for t in r],
        "prefill_s": prefill_s,
        "placement_s": run.placement_s,
        "k_last": s["k_last"],
        "k_mean": s["k_mean"],
        "strategy_share": s["strategy_share"],
        "k_per_step": [[step, k, strategy] for step, k, strategy in tel.k_per_step()],
        "warmup_steps": warmup,
        "host_tokens": s["host_tokens_last"],
        "device_tokens": s["device_tokens_last"],
        "cpu_ms_per_step": parts["cpu"],
        "device_ms_per_step": parts["gpu"],
        "transfer_ms_per_step": parts["tx"],
        "cpu_share": parts["cpu"] / total,
        "device_share": parts["gpu"] / total,
        "transfer_share": parts["tx"] / total,
        "cpu_hidden_share": s["cpu_hidden_share"],
        "tx_bytes_per_step": s["tx_bytes_per_step"],
        "estimated_device_bytes": estimate["device"],
        "estimated_host_bytes": estimate["host"],
    }


def _skipped(policy: str, n: int, batch: int, reason: str, estimate: Optional[dict]) -> dict:
    row = {"policy": policy, "context": n, "batch": batch, "status": "skipped", "reason": reason}
    if estimate:
        row.update(estimated_device_bytes=estimate["device"], estimated_host_bytes=estimate["host"])
    return row


def measure_context(model, info, args, n: int, batch: int, device, dtype, bar) -> list[dict]:
    """Every policy at one context length and batch size: prefill, place, interleaved decode."""
    from ...policies import table

    exact = {r["policy"]: r["exact"] for r in table()}
    extra = args.warmup + args.steps + 8
    cfg = {
        p: HybridConfig(policy=p, gpu_budget=args.gpu_budget, sinks=args.sinks, k=args.k, max_context=n + extra)
        for p in args.policies
    }
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pools = free_memory(device, args.max_memory)
    estimates, reasons = plan(args.policies, n, batch, info, dtype_bytes, cfg["full"], pools)
    if "full" in reasons:
        # The prompt then goes through a cache that keeps older tokens on the host ("all"): it
        # must fit before anything else.
        order = ["full", "all", *(p for p in args.policies if p not in ("full", "all"))]
        estimates, reasons = plan(order, n, batch, info, dtype_bytes, cfg["full"], pools)
        if "all" in reasons:
            why = f"the prompt's KV does not fit in memory even with older tokens on the host ({reasons['all']})"
            reasons = {p: reasons.get(p) or why for p in args.policies}
        elif "all" not in args.policies:
            del estimates["all"]
    fits = [p for p in args.policies if p not in reasons]
    rows = [_skipped(p, n, batch, reasons[p], estimates[p]) for p in args.policies if p in reasons]
    per_policy = 2 + args.rounds
    if not fits:
        bar.update(1 + per_policy * len(args.policies))
        return rows
    bar.update(per_policy * (len(args.policies) - len(fits)))

    # The prompt runs once, through full's cache (or, when full does not fit, through a cache
    # that keeps the older tokens on the host); every other policy is placed from it.
    source_policy = "full" if "full" in fits else "all"
    source_cfg = cfg.get(source_policy) or HybridConfig(
        policy="all", gpu_budget=args.gpu_budget, sinks=args.sinks, max_context=n + extra
    )
    gen = torch.Generator().manual_seed(args.seed + n + 7919 * batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=gen).to(device)
    bar.set_postfix_str(f"{n} tokens × {batch}: prefill")
    source, token, prefill_s, recorder = prefill(model, ids, source_cfg, args.chunk, args.score_window)
    bar.update(1)
    runs: dict[str, _Run] = {}
    for p in fits:
        bar.set_postfix_str(f"{n} tokens × {batch}: placing {p}")
        if p == source_policy:
            runs[p] = _Run(source, token.clone(), 0.0)
        else:
            cache, seconds = place(model, source, cfg[p], recorder)
            runs[p] = _Run(cache, token.clone(), seconds)
        bar.update(1)
    if source_policy not in fits:
        del source
    del recorder

    for p in fits:
        bar.set_postfix_str(f"{n} tokens × {batch}: warm-up {p}")
        for _ in range(args.warmup):
            runs[p].step(model, measure=False)
        bar.update(1)
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
    for r, steps in enumerate(per_round):
        order = fits[r % len(fits) :] + fits[: r % len(fits)]  # rotate: no policy always goes first
        for p in order:
            bar.set_postfix_str(f"{n} tokens × {batch}: round {r + 1}/{args.rounds} {p}")
            runs[p].rounds.append([runs[p].step(model, measure=True) for _ in range(steps)])
            bar.update(1)

    for p in fits:
        rows.append(_row(p, n, batch, runs[p], prefill_s, args.warmup, estimates[p], exact[p]))
    full = next((r for r in rows if r["policy"] == "full" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok":
            row["ratio_to_full"] = row["ms_per_token"] / full["ms_per_token"] if full else None
            row["speedup_vs_full"] = full["ms_per_token"] / row["ms_per_token"] if full else None
    order = {p: i for i, p in enumerate(args.policies)}
    return sorted(rows, key=lambda r: order[r["policy"]])
