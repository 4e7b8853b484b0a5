"""Perplexity measured through the decode path.

A prompt of ``prefix`` tokens is prefilled, then every following token of the text is fed one by
one through the cache (teacher forcing), so each prediction is made by the decode-time attention
under test — hybrid attention with its policy, or the model's own attention for ``config=None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from ..config import HybridConfig
from ..guard import require_hybrid_run
from ..hf.compat import cache_arg
from .replay import replay


@dataclass
class PerplexityResult:
    policy: str
    tokens: int
    nll: float  # mean negative log-likelihood (nats) of the scored tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def decode_perplexity(
    model, ids: torch.Tensor, prefix: int, config: Optional[HybridConfig] = None, progress: bool = False, recorded=None
) -> PerplexityResult:
    """Perplexity of ``ids [1, n]`` after its first ``prefix`` tokens, one decode step per token.

    With ``config``, the model is patched for the measurement (and unpatched after); ``None``
    measures the model's own attention with an ordinary DynamicCache. ``recorded``: the prefix's
    :func:`~hybridgen.eval.replay.record_prefill`, replayed instead of prefilling again.
    """
    from transformers import DynamicCache

    from ..hf import HybridCache, patch, unpatch

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [1, n], got shape {tuple(ids.shape)}")
    n = ids.shape[1]
    if not 0 < prefix < n:
        raise ValueError(f"prefix must be in 1..{n - 1}, got {prefix}")
    if config is not None:
        patch(model, config)
    try:
        total = 0.0
        if recorded is not None:
            if recorded.length != prefix:
                raise ValueError(f"the recorded prefill has {recorded.length} tokens, the prefix {prefix}")
            cache, logits = replay(model, recorded, config), recorded.logits
        else:
            cache = HybridCache(model) if config is not None else DynamicCache()
        with torch.inference_mode():
            if recorded is None:
                logits = model(ids[:, :prefix], **cache_arg(cache), use_cache=True).logits[0, -1]
            steps = range(prefix, n)
            for t in tqdm(
                steps, desc=f"perplexity ({config.policy if config else 'full'})", leave=False, disable=not progress
            ):
                total -= torch.log_softmax(logits.float(), -1)[ids[0, t]].item()
                if t + 1 < n:
                    logits = model(ids[:, t : t + 1], **cache_arg(cache), use_cache=True).logits[0, -1]
        if config is not None and n - prefix > 1:
            require_hybrid_run(
                cache,
                what=f"perplexity with policy {config.policy}",
                decode_steps=n - prefix - 1,
                context_tokens=prefix,
            )
    finally:
        if config is not None:
            unpatch(model)
    return PerplexityResult(policy=config.policy if config else "full", tokens=n - prefix, nll=total / (n - prefix))
