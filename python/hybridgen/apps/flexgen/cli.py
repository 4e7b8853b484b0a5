"""``python -m hybridgen.flexgen``: FlexGen's ``flex_opt`` command line with hybrid attention.

Every ``flex_opt`` option works as before; the hybrid options (:mod:`hybridgen.apps.flexgen.options`)
are added, the patch is applied around FlexGen's own ``run_flexgen``, and the hybrid telemetry is
printed after FlexGen's report. ``--no-hybrid`` runs FlexGen unchanged through the same command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ...flexgen.install import require_flexgen
from ...flexgen.patch import patch, unpatch
from .options import STAND_IN, add_hybrid_arguments, check_args, hybrid_options
from .tokenizer import use_tokenizer

__all__ = ["build_parser", "main", "run", "timings"]

EXAMPLE = """example (OPT-1.3B-shaped dummy weights, 4K prompt, old tokens in host memory):
  python -m hybridgen.flexgen --model facebook/opt-1.3b --path _DUMMY_ --prompt-len 4096 --gen-len 32 \\
      --gpu-batch-size 4 --gpu-budget 1024 --policy scheduler --k-min 64 --k-max 2048
"""


def build_parser(flex_opt) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hybridgen.flexgen",
        description="FlexGen's flex_opt (OPT generation benchmark) with hybridgen's CPU-GPU hybrid attention.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flex_opt.add_parser_arguments(parser)
    add_hybrid_arguments(parser)
    return parser


def timings(args: argparse.Namespace) -> dict:
    """FlexGen's figures of the run that just finished, computed as ``run_flexgen`` reports them
    (from its ``generate`` timer: the first cost is the prefill, the others decode steps)."""
    from flexgen.timer import timers
    from flexgen.utils import project_decode_latency

    costs = list(timers("generate").costs)
    num_prompts = args.num_gpu_batches * args.gpu_batch_size
    prefill = costs[0]
    decode = project_decode_latency(costs, args.prompt_len, args.gen_len) if args.cut_gen_len else sum(costs[1:])
    return {
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_tokens_per_s": num_prompts * args.prompt_len / prefill,
        "decode_tokens_per_s": num_prompts * (args.gen_len - 1) / max(decode, 1e-10),
        "total_tokens_per_s": num_prompts * args.gen_len / (prefill + decode),
        "step_s": costs[1:],
    }


def run(args: argparse.Namespace) -> dict:
    """Runs FlexGen's ``run_flexgen(args)`` (patched unless ``args.no_hybrid``) and returns its
    :func:`timings`, plus the hybrid telemetry summary under ``"hybrid"``. Needs a CUDA GPU."""
    flex_opt, _ = require_flexgen()
    config = check_args(args, flex_opt.DUMMY_WEIGHT)
    tokenizer = args.tokenizer or (STAND_IN if flex_opt.DUMMY_WEIGHT in args.path else None)
    session = None
    if config is not None:
        # Keyword options, so that an absent --gpu-budget lets FlexGen's cache percents set it.
        session = patch(**hybrid_options(args))
    try:
        with use_tokenizer(flex_opt, tokenizer):
            flex_opt.run_flexgen(args)
    finally:
        if session is not None:
            unpatch()
    result = timings(args)
    if session is not None:
        result["hybrid"] = session.telemetry.summary()
        result["hybrid_summary"] = session.telemetry.format_summary()
    return result


def main(argv: Optional[list] = None) -> int:
    try:
        flex_opt, _ = require_flexgen()
    except ImportError as e:
        print(f"python -m hybridgen.flexgen: {e}", file=sys.stderr)
        return 1
    parser = build_parser(flex_opt)
    args = parser.parse_args(argv)
    try:
        check_args(args, flex_opt.DUMMY_WEIGHT)
    except (ValueError, TypeError) as e:
        parser.error(str(e))  # exits 2
    import torch

    if not torch.cuda.is_available():
        print(
            "python -m hybridgen.flexgen: FlexGen needs a CUDA GPU (its OptLM creates CUDA streams) and none is "
            "available",
            file=sys.stderr,
        )
        return 1
    result = run(args)
    if "hybrid_summary" in result:
        print(f"hybrid attention: {result['hybrid_summary']}")
    return 0
