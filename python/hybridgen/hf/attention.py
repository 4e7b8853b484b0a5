"""The attention function registered with transformers as ``"hybridgen"``.

Multi-token steps (the prompt) run the model's usual SDPA attention over every token the cache
returns (the cache's policy may look at them first, e.g. to seed attention scores). One-token
steps (decode) with a :class:`HybridCache` run its engine's step (:mod:`hybridgen.engine`), after
which the layer's overflow moves to the host. A decode step of a patched model that does
not reach its HybridCache is an error (:class:`~hybridgen.guard.HybridPathError`), unless the
caller chose another cache on purpose (then a warning, once).
"""

from __future__ import annotations

import warnings

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..guard import HybridPathError
from .cache import keep_mask
from .calls import CURRENT_CALL, active_cache, warn_foreign_cache

NAME = "hybridgen"

_warned_unpatched = False


def register() -> None:
    """Registers the attention function and its mask builder (idempotent)."""
    AttentionInterface.register(NAME, hybridgen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _own_layer(module, key):
    """The HybridLayer whose update returned ``key`` for this very call, or ``None``."""
    cache = active_cache()
    if cache is None or module.layer_idx >= len(cache.layers):
        return None
    candidate = cache.layers[module.layer_idx]
    if candidate.returned_keys is not key:
        return None
    candidate.returned_keys = None
    return candidate


def hybridgen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layer = _own_layer(module, key)
    state = getattr(module, "_hybridgen_state", None)
    if layer is not None and layer.cache.owner is not None and state is not None and layer.cache.owner is not state:
        raise ValueError("this HybridCache was created for another model: make one per model")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is None or query.shape[2] > 1:
        if layer is not None:
            layer.cache.engine.prefill(module.layer_idx, query, key, value, keep_mask(attention_mask), scale)
        elif query.shape[2] == 1:
            _decode_without_hybrid_cache(module, state)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # Patched: the layer hooks time the whole layer (its span). Through attn_implementation=
    # "hybridgen" without patch() there are no hooks: device time is the attention's own.
    span = layer.span if state is not None else None
    out = layer.cache.decode(module.layer_idx, query[:, :, 0], attention_mask, scale, span=span)
    return out.unsqueeze(1).to(query.dtype), None


def _decode_without_hybrid_cache(module, state) -> None:
    """A one-token query whose keys did not come from a HybridCache: the user's choice (another
    cache, or no cache at all) is said once; anything else is a bypass and raises."""
    global _warned_unpatched
    call = CURRENT_CALL.get()
    if state is None:
        # attn_implementation="hybridgen" without patch(): the caller manages the cache.
        if not _warned_unpatched:
            _warned_unpatched = True
            warnings.warn(
                "attn_implementation='hybridgen' ran a decode step without a HybridCache: the model's own "
                "attention served it (pass cache=HybridCache(model, config))",
                stacklevel=4,
            )
        return
    if call is not None and call[0] is state:
        foreign = call[1]
        if foreign is not None:
            warn_foreign_cache(state, foreign)
            return
        if active_cache() is None:
            return  # called with use_cache=False: attention over the call's own tokens, nothing cached
    raise HybridPathError(
        f"layer {module.layer_idx}: a decode step of this patched model did not go through its HybridCache "
        "(the cache was replaced, dropped, or not handed to the model under the keyword this transformers "
        "release reads); its own attention would have served it silently"
    )
