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
import shlex
from pathlib import Path

import torch

from ... import _native
from ...config import POLICIES, HybridConfig
from .measure import measure_context, place, prefill
from .models import MODELS, TINY, choose_threads, llama8b_random, load_model, model_label, random_llama, resolve_model
from .planning import GIB, MEMORY_HEADROOM, footprint, free_memory, plan
from .report import SELECTIVE, bars, default_out, format_rows, largest_fit, machine_info

__all__ = [
    "DEFAULT_CONTEXTS",
    "DEFAULT_POLICIES",
    "GIB",
    "MEMORY_HEADROOM",
    "MODELS",
    "SELECTIVE",
    "TINY",
    "bars",
    "build_parser",
    "check_args",
    "choose_threads",
    "default_out",
    "footprint",
    "format_rows",
    "free_memory",
    "largest_fit",
    "llama8b_random",
    "load_model",
    "machine_info",
    "main",
    "measure_context",
    "model_label",
    "place",
    "plan",
    "prefill",
    "random_llama",
    "resolve_model",
    "run",
]

DEFAULT_POLICIES = ("full", "aog", "aoc", "streaming", "h2o", "infinigen", "post_qkt", "pre_qkt", "scheduler")
DEFAULT_CONTEXTS = (2048, 4096, 8192, 16384, 32768)


# --- command line ---------------------------------------------------------------------------
def build_parser(sub=None) -> argparse.ArgumentParser:
    kwargs = dict(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p = (
        sub.add_parser("bench", help=__doc__.splitlines()[0], **kwargs)
        if sub
        else argparse.ArgumentParser(prog="python -m hybridgen bench", **kwargs)
    )
    p.add_argument("--model", default="smollm2", help="smollm2, llama-random or a model directory (default smollm2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument(
        "--dtype",
        choices=_native.DTYPES,
        default=None,
        help="model and KV dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        metavar="POLICY",
        help=f"any of {', '.join(POLICIES)}; full always runs (default: {' '.join(DEFAULT_POLICIES)})",
    )
    p.add_argument(
        "--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), metavar="N", help="prompt lengths in tokens"
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="batch sizes (default 1)")
    p.add_argument("--steps", type=int, default=8, help="decode steps measured per policy, split over the rounds")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the policies (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="decode steps per policy before measuring (default 2)")
    p.add_argument("--gpu-budget", type=int, default=512, help="recent tokens per layer on the device tier")
    p.add_argument("--sinks", type=int, default=4, help="attention-sink tokens on the device tier")
    p.add_argument(
        "--k", type=int, default=256, help="host tokens per head (post_qkt, pre_qkt, h2o, keyformer, infinigen)"
    )
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    p.add_argument(
        "--score-window",
        type=int,
        default=512,
        help="last prompt queries shown to policies that score the prompt (h2o, keyformer, infinigen)",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="plan with at most this much free memory per pool (default: what the machine reports)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads: a number, or auto = the cores the load average leaves idle (at least 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON record (default benchmarks/results/bench_<model>.json); the plot goes next to it (.png)",
    )
    p.add_argument("--no-plot", action="store_true", help="write the JSON record only")
    p.set_defaults(func=_cli)
    return p


def main(argv: list[str]) -> dict:
    """Runs the benchmark with command-line ``argv`` (without ``bench``); returns the record.
    Bad input raises ValueError / FileNotFoundError."""
    args = build_parser().parse_args(argv)
    args.command_line = "python -m hybridgen bench " + shlex.join(argv)
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
        raise ValueError(
            f"unknown polic{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}: "
            f"expected any of {', '.join(POLICIES)}"
        )
    # full is the reference every ratio is taken against: it always runs, first.
    args.policies = ["full"] + [p for p in dict.fromkeys(args.policies) if p != "full"]
    resolve_model(args.model)
    for name in ("gpu_budget", "k", "chunk", "score_window", "steps", "rounds"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.sinks < 0 or args.warmup < 0:
        raise ValueError("--sinks and --warmup must be >= 0")
    if args.steps < args.rounds:
        raise ValueError(
            f"--steps ({args.steps}) must be at least --rounds ({args.rounds}): every round measures a step"
        )
    bad = [b for b in args.batch if b <= 0]
    if bad:
        raise ValueError(f"batch sizes must be positive integers, got {bad}")
    small = [n for n in args.contexts if n <= args.gpu_budget + args.sinks]
    if small:
        raise ValueError(
            f"contexts {small} fit the device tier (--gpu-budget {args.gpu_budget} + --sinks "
            f"{args.sinks}): every context must exceed it, or nothing reaches the host"
        )
    if args.max_memory is not None and args.max_memory <= 0:
        raise ValueError(f"--max-memory must be > 0 GiB, got {args.max_memory}")
    if args.threads != "auto" and (not str(args.threads).isdigit() or int(args.threads) <= 0):
        raise ValueError(f"--threads must be a positive number or auto, got {args.threads!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    args.contexts = sorted(dict.fromkeys(args.contexts))
    args.batch = sorted(dict.fromkeys(args.batch))


def run(args) -> dict:
    """Checks the options, runs the sweep, writes the JSON record (and the plot); returns it."""
    import json

    from tqdm import tqdm

    from ...hf import patch, unpatch
    from ...hf.models import describe

    check_args(args)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
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
        "command": args.command_line,
        "model": model_label(args.model),
        "model_shape": {
            "type": info.model_type,
            "layers": info.layers,
            "q_heads": info.q_heads,
            "kv_heads": info.kv_heads,
            "head_dim": info.head_dim,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "machine": machine,
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("func", "command_line", "command")
        },
        "method": (
            "one shared chunked prefill per context and batch; each policy's cache is placed from its KV; "
            f"{args.warmup} warm-up steps per policy, then {args.rounds} interleaved rounds (rotating order); "
            "ms_per_token = median over rounds of the round's median decode-step time; "
            "tokens_per_s = batch * 1000 / ms_per_token; time shares from per-layer telemetry"
        ),
        "rows": rows,
        "bars": bars(rows),
        "largest_fit": largest_fit(rows),
    }
    for b in record["bars"]:
        print(
            f"{b['context']} × {b['batch']}: scheduler {b['scheduler_ms']:.1f} ms/token, K {b['scheduler_k_last']}; "
            f"vs aog {b.get('speedup_vs_aog', float('nan')):.2f}x, vs best selective "
            f"({b.get('best_selective', '-')}) {b.get('speedup_vs_best_selective', float('nan')):.2f}x"
        )
    out.write_text(json.dumps(record, indent=2) + "\n")
    written = [str(out)]
    if not args.no_plot:
        from .plot import plot

        plot(record, out.with_suffix(".png"))
        written.append(str(out.with_suffix(".png")))
    print("wrote " + " and ".join(written))
    return record
