"""The hybrid options of ``python -m hybridgen.flexgen``, added to FlexGen's own, and their
translation into a :class:`~hybridgen.HybridConfig` checked against FlexGen's settings."""

from __future__ import annotations

import argparse

from ...config import MERGES, HybridConfig
from ...flexgen.compat import FLEXGEN_POLICIES, FlexSettings, check_config, placement

__all__ = ["STAND_IN", "add_hybrid_arguments", "check_args", "hybrid_options"]

#: ``--tokenizer`` value of the stand-in tokenizer (no download; ``_DUMMY_`` weights only).
STAND_IN = "stand-in"

_DEFAULTS = HybridConfig()


def add_hybrid_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "hybrid attention (hybridgen)",
        "The KV cache is split by token: the sinks and the --gpu-budget most recent tokens stay on the GPU, "
        "older tokens go to host memory, where the CPU attends over them each step.",
    )
    g.add_argument(
        "--no-hybrid", action="store_true", help="run FlexGen's own attention (a baseline through the same command)"
    )
    g.add_argument(
        "--gpu-budget",
        type=int,
        default=None,
        help=f"recent tokens per layer kept on the GPU besides the sinks (default {_DEFAULTS.gpu_budget}, "
        "or the share of the cache --percent puts on the GPU)",
    )
    g.add_argument("--sinks", type=int, default=_DEFAULTS.sinks, help="leading tokens that never leave the GPU")
    g.add_argument(
        "--policy",
        choices=FLEXGEN_POLICIES,
        default=_DEFAULTS.policy,
        help="host tokens the CPU attends to: all (exact), post_qkt (top --k by logit), pre_qkt "
        "(--k by position), scheduler (K adapted in [--k-min, --k-max])",
    )
    g.add_argument("--k", type=int, default=_DEFAULTS.k, help="host tokens per head for post_qkt / pre_qkt")
    g.add_argument("--k-min", type=int, default=_DEFAULTS.k_min, help="the scheduler's smallest K")
    g.add_argument("--k-max", type=int, default=_DEFAULTS.k_max, help="the scheduler's largest K")
    g.add_argument(
        "--merge",
        choices=MERGES,
        default=_DEFAULTS.merge,
        help="lse: the CPU returns a partial output + log-sum-exp; concat: selected logits + value rows",
    )
    g.add_argument(
        "--evict-chunk",
        type=int,
        default=_DEFAULTS.evict_chunk,
        help="tokens moved to host memory at a time while decoding",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer name or local directory instead of FlexGen's facebook/opt-30b from the hub; "
        f"'{STAND_IN}' (the default with --path _DUMMY_) makes prompts without any download",
    )


def hybrid_options(args: argparse.Namespace) -> dict:
    """The :class:`~hybridgen.HybridConfig` fields given on the command line (``gpu_budget`` only
    if given: otherwise FlexGen's cache percents may set it)."""
    options = dict(
        sinks=args.sinks,
        policy=args.policy,
        k=args.k,
        k_min=args.k_min,
        k_max=args.k_max,
        merge=args.merge,
        evict_chunk=args.evict_chunk,
    )
    if args.gpu_budget is not None:
        options["gpu_budget"] = args.gpu_budget
    return options


def check_args(args: argparse.Namespace, dummy_weight: str = "_DUMMY_") -> HybridConfig | None:
    """Checks the combined command line; returns the HybridConfig (``None`` with --no-hybrid).
    Raises ValueError/TypeError with a message for the user."""
    if len(args.percent) != 6:
        raise ValueError(
            f"--percent takes six numbers (weights, cache, activations: GPU then CPU), got {len(args.percent)}"
        )
    if args.tokenizer == STAND_IN and dummy_weight not in args.path:
        raise ValueError(f"--tokenizer {STAND_IN} only serves --path {dummy_weight} runs (its token ids carry no text)")
    if args.no_hybrid:
        return None
    config = check_config(HybridConfig(**hybrid_options(args)))
    placement(
        config,
        FlexSettings.from_args(args),
        cache_len=args.prompt_len + args.gen_len - 1,
        budget_given=args.gpu_budget is not None,
    )
    return config
