"""One prefill, replayed into every policy's cache.

Prefill is the same for every policy — the model's own attention over the whole prompt; a policy
only decides afterwards where the tokens go and may look at the prompt's queries
(:meth:`~hybridgen.policies.Policy.prefill`). So an evaluation that compares many policies on one
prompt runs the prompt once, records each layer's query, keys, values and mask, and hands them to
each policy's fresh cache exactly as its own prefill would have. Decoding then runs for real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import HybridConfig
from ..policies.exact import FullPolicy
from ..hf.compat import cache_arg


@dataclass
class RecordedPrefill:
    #: Per layer: ``(query, keys, values, attention_mask, scale)`` as the attention function saw them.
    layers: list
    #: Next-token logits after the prompt ``[vocab]`` (float32).
    logits: torch.Tensor
    length: int


class _Recorder(FullPolicy):
    def __init__(self, config, info, into: dict):
        super().__init__(config, info)
        self.into = into

    def prefill(self, layer, query, key, value, attention_mask, scale) -> None:
        self.into[layer.layer_idx] = (query.clone(), key.clone(), value.clone(), attention_mask, scale)


def record_prefill(model, ids: torch.Tensor) -> RecordedPrefill:
    """Runs the prompt ``ids [1, n]`` once through the (unpatched) ``model`` and records it."""
    from ..hf import HybridCache, patch, unpatch

    seen: dict = {}
    config = HybridConfig(policy="full", max_context=ids.shape[1] + 8)
    patch(model, config)
    try:
        cache = HybridCache(model)
        cache.policy = _Recorder(config, cache.info, seen)
        with torch.inference_mode():
            logits = model(ids.to(model.device), **cache_arg(cache), use_cache=True).logits[0, -1].float()
    finally:
        unpatch(model)
    return RecordedPrefill([seen[i] for i in range(len(seen))], logits, ids.shape[1])


def replay(model, recorded: RecordedPrefill, config: Optional[HybridConfig]):
    """A cache holding the recorded prompt as ``config``'s policy would after its own prefill
    (the model must be patched with ``config``); ``None``: a DynamicCache (the model's own
    attention)."""
    from transformers import DynamicCache

    from ..hf import HybridCache

    if config is None:
        cache = DynamicCache()
        for i, (_, k, v, _, _) in enumerate(recorded.layers):
            cache.update(k, v, i)
        return cache
    cache = HybridCache(model, config)
    with torch.inference_mode():
        for i, (q, k, v, mask, scale) in enumerate(recorded.layers):
            cache.place_prompt(i, k, v, q, mask, scale)
    return cache
