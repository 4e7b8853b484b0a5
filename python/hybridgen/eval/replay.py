"""One prefill of a transformers model, replayed into every policy's cache
(:class:`hybridgen.engine.PromptRecorder` does the recording and the placing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import HybridConfig
from ..engine import PromptRecorder
from ..hf.compat import cache_arg


@dataclass
class RecordedPrefill:
    #: What every layer's prompt showed the engine.
    prompt: PromptRecorder
    #: Next-token logits after the prompt ``[vocab]`` (float32).
    logits: torch.Tensor
    length: int


def record_prefill(model, ids: torch.Tensor, window: Optional[int] = None) -> RecordedPrefill:
    """Runs the prompt ``ids [1, n]`` once through the (unpatched) ``model`` and records it
    (``window``: keep only each layer's last ``window`` queries)."""
    from ..hf import HybridCache, patch, unpatch

    config = HybridConfig(policy="full", max_context=ids.shape[1] + 8)
    patch(model, config)
    try:
        cache = HybridCache(model)
        recorder = cache.engine.on_prefill = PromptRecorder(window=window)
        with torch.inference_mode():
            # Only the last position's logits: a 150K-token vocabulary over a 32K prompt would be 20 GB.
            logits = (
                model(ids.to(model.device), **cache_arg(cache), use_cache=True, logits_to_keep=1).logits[0, -1].float()
            )
    finally:
        unpatch(model)
    return RecordedPrefill(recorder, logits, ids.shape[1])


def replay(model, recorded: RecordedPrefill, config: Optional[HybridConfig]):
    """A cache holding the recorded prompt as ``config``'s policy would after its own prefill
    (the model must be patched with ``config``); ``None``: a DynamicCache (the model's own
    attention)."""
    from transformers import DynamicCache

    from ..hf import HybridCache

    layers = recorded.prompt.layers
    if config is None:
        cache = DynamicCache()
        for i in range(len(layers)):
            cache.update(layers[i].keys, layers[i].values, i)
        return cache
    cache = HybridCache(model, config)
    with torch.inference_mode():
        for i in range(len(layers)):
            recorded.prompt.replay(cache.engine, i, place=cache.place_prompt)
    return cache
