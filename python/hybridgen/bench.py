"""``python -m hybridgen bench``: decode latency and throughput of every policy over context
lengths and batch sizes, against full attention measured in the same run.

For each context length and batch size a random prompt is prefilled once, in chunks, through a
HybridCache with the model's own attention (the ``full`` policy's cache when it fits in memory);
every other policy gets its own cache built from that prompt's keys and values without running
the model again (the same placement the prompt step makes; policies that look at the prompt's
queries — h2o, keyformer, infinigen — see the last ``--score-window`` of them). Then the
policies decode in interleaved rounds — each round runs every policy for a few steps, in a
rotating order — so that a drifting load on the machine hits all of them alike; a policy's
latency is the median over rounds of its per-round median step time.

A configuration whose KV cache would not fit in the memory left (host RAM, and GPU memory on
CUDA) is skipped and recorded with the reason instead of running out of memory.

Models: ``smollm2`` (SmolLM2-135M, real weights), ``llama-random`` (a seeded, randomly
initialised Llama whose attention is shaped like Llama-3-8B's — 32 query heads, 8 KV heads,
head_dim 128 — with 2 layers and a narrow residual stream, vocabulary and FFN, so that decode
time is mostly attention), ``llama8b-random`` (Llama-3.1-8B's exact shape — 32 layers, hidden
4096, 32 query / 8 KV heads, head_dim 128, FFN 14336, vocabulary 128256 — with random weights
made directly on the device; for GPU runs) or the path of a local Llama / Qwen2 / OPT model.

The record's ``bars`` compare hybridgen's ``scheduler`` with ``aog`` and with the fastest
selective baseline (streaming, h2o, keyformer, infinigen) at each context and batch size.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import POLICIES, HybridConfig
from .guard import require_hybrid_run
from .hf.compat import cache_arg

DEFAULT_POLICIES = ("full", "aog", "aoc", "streaming", "h2o", "infinigen", "post_qkt", "pre_qkt", "scheduler")
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768)
MODELS = ("smollm2", "llama-random", "llama8b-random")
#: The selective baselines hybridgen's scheduler is held against at equal token budget.
SELECTIVE = ("streaming", "h2o", "keyformer", "infinigen")
#: A Llama small enough for tests (not listed in --help).
TINY = "tiny-random"
#: Share of the free memory a sweep plans to use (the rest absorbs estimate error and other work).
MEMORY_HEADROOM = 0.85
GIB = 1024**3


# --- command line ---------------------------------------------------------------------------
def build_parser(sub=None) -> argparse.ArgumentParser:
    kwargs = dict(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = sub.add_parser("bench", help=__doc__.splitlines()[0], **kwargs) if sub else argparse.ArgumentParser(
        prog="python -m hybridgen bench", **kwargs)
    p.add_argument("--model", default="smollm2", help="smollm2, llama-random or a model directory (default smollm2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="model and KV dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), metavar="POLICY",
                   help=f"any of {', '.join(POLICIES)}; full always runs (default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), metavar="N",
                   help="prompt lengths in tokens")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes (default 1)")
    p.add_argument("--steps", type=int, default=8, help="decode steps measured per policy, split over the rounds")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the policies (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="decode steps per policy before measuring (default 2)")
    p.add_argument("--gpu-budget", type=int, default=512, help="recent tokens per layer on the device tier")
    p.add_argument("--sinks", type=int, default=4, help="attention-sink tokens on the device tier")
    p.add_argument("--k", type=int, default=256, help="host tokens per head (post_qkt, pre_qkt, h2o, keyformer, infinigen)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    p.add_argument("--score-window", type=int, default=512,
                   help="last prompt queries shown to policies that score the prompt (h2o, keyformer, infinigen)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="plan with at most this much free memory per pool (default: what the machine reports)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, or auto = the cores the load average leaves idle (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON record (default benchmarks/results/bench_<model>.json); the plot goes next to it (.png)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON record only")
    p.set_defaults(func=_cli, argv=None)
    return p


def main(argv: list[str]) -> dict:
    """Runs the benchmark with command-line ``argv`` (without ``bench``); returns the record.
    Bad input raises ValueError / FileNotFoundError."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    return run(args)


def _cli(args) -> int:
    try:
        check_args(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"python -m hybridgen bench: error: {e}") from None
    run(args)
    return 0


def check_args(args) -> None:
    """Validates the options in place (names resolved, ``full`` added); raises on bad input."""
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown polic{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}: "
                         f"expected any of {', '.join(POLICIES)}")
    # full is the reference every ratio is taken against: it always runs, first.
    args.policies = ["full"] + [p for p in dict.fromkeys(args.policies) if p != "full"]
    resolve_model(args.model)
    for name in ("gpu_budget", "k", "chunk", "score_window", "steps", "rounds"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.sinks < 0 or args.warmup < 0:
        raise ValueError("--sinks and --warmup must be >= 0")
    if args.steps < args.rounds:
        raise ValueError(f"--steps ({args.steps}) must be at least --rounds ({args.rounds}): every round measures a step")
    bad = [b for b in args.batch if b <= 0]
    if bad:
        raise ValueError(f"batch sizes must be positive integers, got {bad}")
    small = [n for n in args.contexts if n <= args.gpu_budget + args.sinks]
    if small:
        raise ValueError(f"contexts {small} fit the device tier (--gpu-budget {args.gpu_budget} + --sinks "
                         f"{args.sinks}): every context must exceed it, or nothing reaches the host")
    if args.max_memory is not None and args.max_memory <= 0:
        raise ValueError(f"--max-memory must be > 0 GiB, got {args.max_memory}")
    if args.threads != "auto" and (not str(args.threads).isdigit() or int(args.threads) <= 0):
        raise ValueError(f"--threads must be a positive number or auto, got {args.threads!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    args.contexts = sorted(dict.fromkeys(args.contexts))
    args.batch = sorted(dict.fromkeys(args.batch))


def resolve_model(name: str):
    """``"smollm2"``, ``"llama-random"``, ``"tiny-random"`` or an existing model directory."""
    if name in MODELS or name == TINY:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name}: the directory has no config.json (not a transformers model)")
        return path
    if path.exists() or os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"--model {name}: no such model directory")
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)} or a model directory")


# --- models -----------------------------------------------------------------------------------
def random_llama(size: str = "llama-random", seed: int = 0):
    """A seeded, randomly initialised Llama built in code (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        # Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, rope theta 5e5) on a
        # narrow residual stream with a small FFN and vocabulary: decode time is mostly attention.
        "llama-random": dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=1024, rope_theta=500000.0,
                             max_position_embeddings=131072),
        TINY: dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=4096),
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shapes[size], tie_word_embeddings=False))


def llama8b_random(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Llama-3.1-8B's shape with random weights (N(0, 0.02), norms 1), allocated and filled on
    ``device`` directly: 8 billion parameters never pass through host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False, dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # free on meta: the device gets bf16 storage only
    if device.type == "meta":  # the shape only
        return model
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config, device=device)  # its buffers were left empty
    return model


def load_model(name, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(str(name))
    if resolved == "llama8b-random":
        return llama8b_random(device, dtype, seed).eval()
    if resolved in ("llama-random", TINY):
        model = random_llama(resolved, seed)
    else:
        if resolved == "smollm2":
            from .assets import smollm2

            resolved = smollm2()
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def model_label(name: str) -> str:
    return name if name in MODELS or name == TINY else Path(name).expanduser().resolve().name


def choose_threads(setting: str) -> tuple[int, str]:
    """Torch's CPU thread count for the run, and why. On a machine whose other work already
    keeps the cores busy, more OpenMP threads than idle cores spin against each other and slow
    every step many times over; ``auto`` takes only the cores the load average leaves idle."""
    if setting != "auto":
        return int(setting), "--threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, min(torch.get_num_threads(), round(cores - load)))
    return idle, f"auto: {cores} cores, 1-minute load average {load:.2f} before the run"


# --- memory planning --------------------------------------------------------------------------
def free_memory(device: torch.device, cap_gib: Optional[float]) -> dict:
    """Bytes free now: ``host`` (MemAvailable) and, on CUDA, ``device``; capped by ``cap_gib``."""
    host = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    pools = {"host": host}
    if device.type == "cuda":
        pools["device"] = torch.cuda.mem_get_info(device)[0]
    if cap_gib is not None:
        pools = {k: min(v, int(cap_gib * GIB)) for k, v in pools.items()}
    return pools


def footprint(policy: str, n: int, batch: int, info, dtype_bytes: int, cfg: HybridConfig) -> dict:
    """Estimated bytes a policy's cache holds at context ``n``: ``device`` and ``host``."""
    token = info.layers * batch * info.kv_heads * info.head_dim * 2 * dtype_bytes  # K and V, every layer
    layer_kv = token * n // info.layers
    resident = (cfg.sinks + cfg.gpu_budget + cfg.evict_chunk + 1) * token
    if policy == "full":
        return {"device": 2 * token * n, "host": 0}  # the device tier grows by doubling
    if policy == "aoc":
        return {"device": 0, "host": token * n}
    if policy == "aog":
        return {"device": layer_kv, "host": token * n}  # one layer's KV streamed at a time
    device = resident + layer_kv  # placing the prompt holds one layer's KV on the device at a time
    if policy in ("h2o", "keyformer"):
        device += cfg.k * token + info.layers * batch * info.kv_heads * n * 4  # key tokens + scores
    elif policy == "infinigen":
        device += int(0.3 * token * n / 2)  # partial keys (30 % of the channels)
    return {"device": device, "host": token * n}


def plan(policies, n, batch, info, dtype_bytes, cfg, pools: dict) -> tuple[dict, dict]:
    """Which policies fit, in order: ``(estimates, reasons)`` — ``reasons[p]`` is why ``p`` is
    skipped. Without a separate device pool (CPU), device and host bytes share host RAM."""
    left = {k: int(v * MEMORY_HEADROOM) for k, v in pools.items()}
    estimates, reasons = {}, {}
    for p in policies:
        need = footprint(p, n, batch, info, dtype_bytes, cfg)
        estimates[p] = need
        want = {"host": need["host"]} if "device" in left else {"host": need["host"] + need["device"]}
        if "device" in left:
            want["device"] = need["device"]
        short = [k for k, v in want.items() if v > left[k]]
        if short:
            reasons[p] = "; ".join(f"needs ~{_size(want[k])} of {k} memory, {_size(left[k])} left" for k in short)
            continue
        for k, v in want.items():
            left[k] -= v
    return estimates, reasons


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


# --- prefill and placement --------------------------------------------------------------------
class _QueryRecorder:
    """Stands in for a policy's ``prefill`` during the shared prompt pass: keeps the last
    ``window`` queries (and the scale) of every layer, then calls the policy's own."""

    def __init__(self, inner, window: int):
        self.inner, self.window = inner, window
        self.queries: dict[int, torch.Tensor] = {}
        self.scales: dict[int, float] = {}

    def __call__(self, layer, query, key, value, attention_mask, scale):
        prev = self.queries.get(layer.layer_idx)
        q = query if prev is None else torch.cat([prev, query], dim=2)
        self.queries[layer.layer_idx] = q[:, :, -self.window :].clone()  # not a view of the chunk
        self.scales[layer.layer_idx] = scale
        return self.inner(layer, query, key, value, attention_mask, scale)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, ids: torch.Tensor, config: HybridConfig, chunk: int, window: int):
    """The prompt through a fresh HybridCache in chunks: ``(cache, next tokens, seconds, recorder)``."""
    from .hf import HybridCache

    cache = HybridCache(model, config)
    recorder = _QueryRecorder(cache.policy.prefill, window)
    cache.policy.prefill = recorder
    _sync(ids.device)
    t0 = time.perf_counter()
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s : s + chunk], **cache_arg(cache), use_cache=True, logits_to_keep=1)
    _sync(ids.device)
    seconds = time.perf_counter() - t0
    del cache.policy.prefill  # the policy's own method again
    return cache, out.logits[:, -1:].argmax(-1), seconds, recorder


def place(model, source, config: HybridConfig, recorder: _QueryRecorder):
    """A new cache for ``config`` holding ``source``'s prompt, placed as the prompt step would
    place it; a policy that looks at the prompt sees the recorded queries. ``(cache, seconds)``."""
    from .hf import HybridCache
    from .policies import Policy

    cache = HybridCache(model, config)
    scores_prompt = type(cache.policy).prefill is not Policy.prefill
    device = source.layers[0].keys.device
    _sync(device)
    t0 = time.perf_counter()
    for i in range(len(source.layers)):
        k, v = source.layers[i].tier.logical_kv()
        cache.place_prompt(i, k, v, *((recorder.queries[i], None, recorder.scales[i]) if scores_prompt else ()))
        del k, v
    _sync(device)
    return cache, time.perf_counter() - t0


# --- decoding ---------------------------------------------------------------------------------
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


def _row(policy: str, n: int, batch: int, run: _Run, prefill_s: float, warmup: int, estimate: dict, exact: bool) -> dict:
    from .telemetry import Telemetry

    steps = warmup + sum(len(r) for r in run.rounds)
    require_hybrid_run(run.cache, what=f"bench row {policy} at {n} tokens x {batch}", decode_steps=steps,
                       context_tokens=n, policy=policy)
    round_ms = [1e3 * statistics.median(r) for r in run.rounds]
    ms = statistics.median(round_ms)
    tel = run.cache.telemetry
    s = Telemetry([r for r in tel.records if r.step in run.measured]).summary()
    parts = {k: s[f"t_{k}_per_step_ms"] for k in ("cpu", "gpu", "tx")}
    total = sum(parts.values()) or 1.0
    return {
        "policy": policy, "context": n, "batch": batch, "status": "ok", "exact": exact,
        "ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms,
        "round_ms": round_ms, "step_ms": [1e3 * t for r in run.rounds for t in r],
        "prefill_s": prefill_s, "placement_s": run.placement_s,
        "k_last": s["k_last"], "k_mean": s["k_mean"], "strategy_share": s["strategy_share"],
        "k_per_step": [[step, k, strategy] for step, k, strategy in tel.k_per_step()], "warmup_steps": warmup,
        "host_tokens": s["host_tokens_last"], "device_tokens": s["device_tokens_last"],
        "cpu_ms_per_step": parts["cpu"], "device_ms_per_step": parts["gpu"], "transfer_ms_per_step": parts["tx"],
        "cpu_share": parts["cpu"] / total, "device_share": parts["gpu"] / total, "transfer_share": parts["tx"] / total,
        "cpu_hidden_share": s["cpu_hidden_share"], "tx_bytes_per_step": s["tx_bytes_per_step"],
        "estimated_device_bytes": estimate["device"], "estimated_host_bytes": estimate["host"],
    }


def bars(rows: list[dict]) -> list[dict]:
    """Per context and batch size: the scheduler's speed-up over ``aog`` and over the fastest
    selective baseline that ran (ratios of ms/token; > 1 means the scheduler is faster)."""
    out = []
    for key in sorted({(r["context"], r["batch"]) for r in rows}):
        ok = {r["policy"]: r for r in rows if (r["context"], r["batch"]) == key and r["status"] == "ok"}
        if "scheduler" not in ok:
            continue
        ms = ok["scheduler"]["ms_per_token"]
        entry = {"context": key[0], "batch": key[1], "scheduler_ms": ms, "scheduler_k_last": ok["scheduler"]["k_last"]}
        if "aog" in ok:
            entry["speedup_vs_aog"] = ok["aog"]["ms_per_token"] / ms
        selective = [p for p in SELECTIVE if p in ok]
        if selective:
            best = min(selective, key=lambda p: ok[p]["ms_per_token"])
            entry.update(best_selective=best, speedup_vs_best_selective=ok[best]["ms_per_token"] / ms)
        out.append(entry)
    return out


def largest_fit(rows: list[dict]) -> dict:
    """Per policy, the largest batch × context it ran without running out of memory."""
    best: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["batch"] * r["context"] > best.get(r["policy"], {}).get("tokens", 0):
            best[r["policy"]] = {"batch": r["batch"], "context": r["context"], "tokens": r["batch"] * r["context"]}
    return best


def _skipped(policy: str, n: int, batch: int, reason: str, estimate: Optional[dict]) -> dict:
    row = {"policy": policy, "context": n, "batch": batch, "status": "skipped", "reason": reason}
    if estimate:
        row.update(estimated_device_bytes=estimate["device"], estimated_host_bytes=estimate["host"])
    return row


def measure_context(model, info, args, n: int, batch: int, device, dtype, bar) -> list[dict]:
    """Every policy at one context length and batch size: prefill, place, interleaved decode."""
    from .policies import table

    exact = {r["policy"]: r["exact"] for r in table()}
    extra = args.warmup + args.steps + 8
    cfg = {p: HybridConfig(policy=p, gpu_budget=args.gpu_budget, sinks=args.sinks, k=args.k, max_context=n + extra)
           for p in args.policies}
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
    source_cfg = cfg.get(source_policy) or HybridConfig(policy="all", gpu_budget=args.gpu_budget, sinks=args.sinks,
                                                       max_context=n + extra)
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
        order = fits[r % len(fits):] + fits[: r % len(fits)]  # rotate: no policy always goes first
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


# --- the record -------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    import transformers

    import hybridgen
    from . import _native

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "native_threads": _native.num_threads(), "isa": _native.isa(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "hybridgen": hybridgen.__version__, "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def default_out(model: str) -> Path:
    return Path("benchmarks") / "results" / f"bench_{model_label(model)}.json"


def run(args) -> dict:
    """Checks the options, runs the sweep, writes the JSON record (and the plot); returns it."""
    import json

    from tqdm import tqdm

    from .hf import patch, unpatch
    from .hf.models import describe

    check_args(args)
    argv = args.argv if args.argv is not None else _cli_argv()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    out = args.out or default_out(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads, why = choose_threads(args.threads)
    machine = machine_info(device)  # the load average before the run
    torch.set_num_threads(threads)
    machine.update(torch_threads=threads, torch_threads_reason=why)

    model = load_model(args.model, device, dtype, args.seed)
    info = describe(model)
    configs = [(n, b) for n in args.contexts for b in args.batch]
    total = len(configs) * (1 + (2 + args.rounds) * len(args.policies))
    rows = []
    patch(model, HybridConfig(gpu_budget=args.gpu_budget, sinks=args.sinks, k=args.k))
    try:
        with torch.inference_mode(), tqdm(total=total, desc="bench", unit="task") as bar:
            for n, b in configs:
                new = measure_context(model, info, args, n, b, device, dtype, bar)
                rows.extend(new)
                bar.write(format_rows(new))
    finally:
        unpatch(model)

    record = {
        "command": "python -m hybridgen bench " + shlex.join(argv),
        "model": model_label(args.model),
        "model_shape": {"type": info.model_type, "layers": info.layers, "q_heads": info.q_heads,
                        "kv_heads": info.kv_heads, "head_dim": info.head_dim},
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("func", "argv", "command")},
        "method": ("one shared chunked prefill per context and batch; each policy's cache is placed from its KV; "
                   f"{args.warmup} warm-up steps per policy, then {args.rounds} interleaved rounds (rotating order); "
                   "ms_per_token = median over rounds of the round's median decode-step time; "
                   "tokens_per_s = batch * 1000 / ms_per_token; time shares from per-layer telemetry"),
        "rows": rows,
        "bars": bars(rows),
        "largest_fit": largest_fit(rows),
    }
    for b in record["bars"]:
        print(f"{b['context']} × {b['batch']}: scheduler {b['scheduler_ms']:.1f} ms/token, K {b['scheduler_k_last']}; "
              f"vs aog {b.get('speedup_vs_aog', float('nan')):.2f}x, vs best selective "
              f"({b.get('best_selective', '-')}) {b.get('speedup_vs_best_selective', float('nan')):.2f}x")
    out.write_text(json.dumps(record, indent=2) + "\n")
    written = [str(out)]
    if not args.no_plot:
        from .bench_plot import plot

        plot(record, out.with_suffix(".png"))
        written.append(str(out.with_suffix(".png")))
    print("wrote " + " and ".join(written))
    return record


def _cli_argv() -> list[str]:
    """The options of ``python -m hybridgen bench ...`` as given on the command line."""
    argv = sys.argv[1:]
    return argv[1:] if argv[:1] == ["bench"] else argv


def format_rows(rows: list[dict]) -> str:
    """A small table of one context's rows."""
    lines = []
    for r in rows:
        head = f"{r['context']:>6} × {r['batch']:<2} {r['policy']:<10}"
        if r["status"] != "ok":
            lines.append(f"{head} skipped: {r['reason']}")
            continue
        ratio = f"{r['ratio_to_full']:5.2f}x full" if r.get("ratio_to_full") else "          "
        lines.append(f"{head} {r['ms_per_token']:8.1f} ms/token {r['tokens_per_s']:7.1f} tok/s  {ratio}  "
                     f"K {r['k_last']!s:>5}  host/device tokens {r['host_tokens']}/{r['device_tokens']}  "
                     f"cpu/device/tx {r['cpu_share']:.0%}/{r['device_share']:.0%}/{r['transfer_share']:.0%}")
    return "\n".join(lines)
