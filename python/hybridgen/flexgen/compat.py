"""Which FlexGen settings the hybrid cache works with, and how FlexGen's cache percents map to a
token split.

FlexGen splits its KV cache *by batch x head* (``--percent``'s third and fourth numbers: the share
of the cache on the GPU and in CPU memory); hybridgen splits it *by token position* (the sinks and
the ``gpu_budget`` most recent tokens on the GPU, every older token in host memory). The two meet
like this:

* cache percents left at FlexGen's default (100 % on the GPU): ``gpu_budget`` decides the split;
* cache percents that move cache off the GPU and no explicit ``gpu_budget``: the same share of
  *tokens* stays on the GPU (``gpu_budget`` = that many tokens minus the sinks, at least 1);
* both given: refused, they are two answers to one question.

Refused outright: a cache on disk (the host tier is memory), ``--attn-sparsity`` below 1 (use
policy ``post_qkt`` with ``k``), ``--compress-cache`` (the host store keeps float16) and
``--cpu-cache-compute`` (hybrid attention already splits the work between CPU and GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import POLICIES, HybridConfig
from ..policies import policy_class

__all__ = ["FLEXGEN_POLICIES", "FlexSettings", "check_config", "placement"]

#: Every policy the engine serves, except those that score the prompt's queries (FlexGen's
#: prefill attention is its own and shows hybridgen only the prompt's keys and values).
FLEXGEN_POLICIES = tuple(p for p in POLICIES if not policy_class(p).needs_prompt_queries)


@dataclass(frozen=True)
class FlexSettings:
    """The parts of a FlexGen ``Policy`` (or its command line) that concern the KV cache."""

    cache_gpu_percent: float = 100
    cache_cpu_percent: float = 0
    cpu_cache_compute: bool = False
    attn_sparsity: float = 1.0
    compress_cache: bool = False

    @classmethod
    def from_policy(cls, policy) -> "FlexSettings":
        """From a ``flexgen.flex_opt.Policy``."""
        return cls(
            policy.cache_gpu_percent,
            policy.cache_cpu_percent,
            policy.cpu_cache_compute,
            policy.attn_sparsity,
            policy.compress_cache,
        )

    @classmethod
    def from_args(cls, args) -> "FlexSettings":
        """From ``flex_opt``'s parsed command line (``--percent`` has six numbers)."""
        return cls(args.percent[2], args.percent[3], args.cpu_cache_compute, args.attn_sparsity, args.compress_cache)

    @property
    def cache_disk_percent(self) -> float:
        return 100 - self.cache_gpu_percent - self.cache_cpu_percent


def check_config(config: HybridConfig) -> HybridConfig:
    """``config`` validated for FlexGen: a policy that needs no prompt queries, no speculation
    (it starts a layer's CPU stage from the previous layer's input, which FlexGen does not show),
    no ``max_context`` (FlexGen's task fixes the length)."""
    if not isinstance(config, HybridConfig):
        raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
    config.validate()
    if config.policy not in FLEXGEN_POLICIES:
        raise ValueError(
            f"policy {config.policy!r} is not available in FlexGen: use one of {FLEXGEN_POLICIES} (it scores the "
            "prompt's queries, and FlexGen's own prefill attention does not show them)"
        )
    if config.speculative:
        raise ValueError(
            "speculative is not available in FlexGen: it starts a layer's CPU stage from the previous "
            "layer's input, which FlexGen's layer loop does not show (pipeline=True is available)"
        )
    if config.max_context is not None:
        raise ValueError("max_context is not used with FlexGen: its task (prompt_len + gen_len) fixes the length")
    return config


def placement(config: HybridConfig, flex: FlexSettings, *, cache_len: int, budget_given: bool) -> tuple[int, int]:
    """``(sinks, gpu_budget)`` for a FlexGen run whose cache holds ``cache_len`` tokens per
    sequence; ValueError for settings hybrid attention cannot serve (see the module docstring).

    ``budget_given``: whether ``gpu_budget`` was chosen explicitly (not HybridConfig's default).
    """
    if flex.cache_disk_percent != 0:
        raise ValueError(
            f"--percent puts {flex.cache_disk_percent:g}% of the KV cache on disk (cache percents "
            f"{flex.cache_gpu_percent:g} GPU + {flex.cache_cpu_percent:g} CPU must add up to 100): hybrid attention "
            "keeps old tokens in host memory, not on disk"
        )
    if flex.attn_sparsity < 1.0:
        raise ValueError(
            f"--attn-sparsity {flex.attn_sparsity:g} selects tokens FlexGen's way; with hybrid attention use "
            "policy post_qkt with k (tokens per head) instead"
        )
    if flex.compress_cache:
        raise ValueError(
            "--compress-cache cannot be combined with hybrid attention: the host store keeps float16 keys and values"
        )
    if flex.cpu_cache_compute:
        raise ValueError(
            "--cpu-cache-compute cannot be combined with hybrid attention, which already computes the old "
            "tokens' attention on the CPU and the recent tokens' on the GPU"
        )
    if flex.cache_gpu_percent == 100:
        return config.sinks, config.gpu_budget
    if budget_given:
        raise ValueError(
            f"--percent puts {flex.cache_cpu_percent:g}% of the KV cache in CPU memory and gpu_budget={config.gpu_budget} "
            "also sets the split (hybrid attention splits by token): give one of them, not both"
        )
    on_gpu = int(cache_len * flex.cache_gpu_percent // 100)
    return config.sinks, max(1, on_gpu - config.sinks)
