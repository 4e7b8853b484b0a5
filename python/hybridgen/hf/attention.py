"""The attention function registered with transformers as ``"hybridgen"``.

Multi-token steps (the prompt) run the model's usual SDPA attention over every token the cache
returns (the cache's policy may look at them first, e.g. to seed attention scores). One-token
steps (decode) with a :class:`HybridCache` run the cache's policy (:mod:`hybridgen.policies`),
after which the layer's overflow moves to the host.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import ACTIVE_CACHE

NAME = "hybridgen"


def register() -> None:
    """Registers the attention function and its mask builder (idempotent)."""
    AttentionInterface.register(NAME, hybridgen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def hybridgen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = ACTIVE_CACHE.get()
    layer = None
    if cache is not None:
        candidate = cache.layers[module.layer_idx]
        if candidate.returned_keys is key:  # the cache that was just updated for this very call
            layer, candidate.returned_keys = candidate, None
    state = getattr(module, "_hybridgen_state", None)
    if layer is not None and cache.owner is not None and state is not None and cache.owner is not state:
        raise ValueError("this HybridCache was created for another model: make one per model")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is None or query.shape[2] > 1:
        if layer is not None:
            cache.policy.prefill(layer, query, key, value, attention_mask, scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = cache.policy.decode(layer, query[:, :, 0], key, value, attention_mask, scale)
    if state is None:
        # Used through attn_implementation="hybridgen" without patch(): no layer hooks time the
        # whole layer, so the record (device time = the attention's) is complete now.
        layer.cache.record(module.layer_idx, layer.pending)
        layer.pending = None
    layer.evict_overflow()
    return out.unsqueeze(1).to(query.dtype), None
