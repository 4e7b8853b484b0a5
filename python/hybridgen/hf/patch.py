"""``hybridgen.patch(model, config)``: hybrid attention for a transformers model in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import HybridConfig
from ..timing import OpenSpan
from . import attention
from .cache import HybridCache, keep_mask
from .calls import CURRENT_CALL, activate, active_cache, deactivate
from .compat import get_cache, set_cache
from .models import decoder_layers, describe
from .speculation import attention_scale, speculative_query

__all__ = ["patch", "unpatch", "is_patched"]


@dataclass(eq=False)
class PatchState:
    config: HybridConfig
    original_attn_implementation: str
    handles: list = field(default_factory=list)
    #: The cache of the last generate() / forward call that made its own.
    last_cache: Optional[HybridCache] = None
    #: Context-variable tokens of the model calls in progress (restored when each call ends).
    open_calls: list = field(default_factory=list)
    #: Whether the user has been told that a cache of their own bypasses hybrid attention.
    warned_foreign: bool = False


def is_patched(model) -> bool:
    return getattr(model, "_hybridgen", None) is not None


def patch(model, config: Optional[HybridConfig] = None):
    """Makes ``model.generate()`` and forward calls use hybrid attention.

    Prefill runs the model's normal attention and then places the KV (the sinks and the most
    recent ``gpu_budget`` tokens stay on the model's device, the rest go to the host store);
    decode steps run hybrid attention. Returns the model. Undo with :func:`unpatch`.

    All or nothing: when it raises, the model is exactly as it was.
    """
    config = HybridConfig() if config is None else config
    if not isinstance(config, HybridConfig):
        raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
    config.validate()
    info = describe(model, for_patch=True)  # ValueError listing every reason the model is not supported
    if is_patched(model):
        raise RuntimeError("this model is already patched with hybridgen; call hybridgen.unpatch(model) first")
    config.require_cuda_options(next(model.parameters()).device)
    layers = decoder_layers(model)
    if len(layers) != info.layers:
        raise ValueError(f"found {len(layers)} attention layers, the config says {info.layers}")

    attention.register()
    state = PatchState(config=config, original_attn_implementation=model.config._attn_implementation)
    try:
        _install(model, state, layers)
    except BaseException:
        _remove(model, state)
        raise
    return model


def _install(model, state: PatchState, layers) -> None:
    model.set_attn_implementation(attention.NAME)
    decoder_layers = [layer for _, layer, _ in layers]
    for idx, decoder_layer, attn in layers:
        attn._hybridgen_state = state
        state.handles.append(
            decoder_layer.register_forward_pre_hook(_layer_start(idx, decoder_layers), with_kwargs=True)
        )
        state.handles.append(decoder_layer.register_forward_hook(_layer_end(idx)))
    state.handles.append(model.register_forward_pre_hook(_call_start(model, state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(_call_end(state), always_call=True))

    original_generate = model.generate

    def generate(*args, **kwargs):
        cache = get_cache(kwargs)
        if cache is None:
            cache = state.last_cache = HybridCache(model)
        set_cache(kwargs, cache)  # under this transformers release's name only
        return original_generate(*args, **kwargs)

    generate.__doc__ = original_generate.__doc__
    model.generate = generate
    model._hybridgen = state


def _remove(model, state: PatchState) -> None:
    for handle in state.handles:
        handle.remove()
    state.handles.clear()
    for _, _, attn in decoder_layers(model):
        attn.__dict__.pop("_hybridgen_state", None)
    model.__dict__.pop("generate", None)
    if model.config._attn_implementation != state.original_attn_implementation:
        model.set_attn_implementation(state.original_attn_implementation)
    model.__dict__.pop("_hybridgen", None)


def unpatch(model):
    """Restores the model's own attention and releases the caches the patch made. Returns the model."""
    state = getattr(model, "_hybridgen", None)
    if state is None:
        raise ValueError("this model is not patched with hybridgen")
    _remove(model, state)
    state.last_cache = None
    return model


def _call_start(model, state: PatchState):
    def hook(module, args, kwargs):
        cache = get_cache(kwargs)
        if cache is None and kwargs.get("use_cache", True) is not False:
            cache = state.last_cache = HybridCache(model)
        if cache is not None:
            set_cache(kwargs, cache)
        hybrid = cache if isinstance(cache, HybridCache) else None
        foreign = None if cache is None or hybrid is not None else type(cache).__name__
        state.open_calls.append((CURRENT_CALL.set((state, foreign)), activate(hybrid)))
        return args, kwargs

    return hook


def _call_end(state: PatchState):
    def hook(module, args, output):
        if state.open_calls:
            call_token, cache_token = state.open_calls.pop()
            CURRENT_CALL.reset(call_token)
            deactivate(cache_token)

    return hook


def _active_layer(idx):
    cache = active_cache()
    if cache is None or idx >= len(cache.layers):
        return None
    return cache.layers[idx]


def _layer_start(idx, decoder_layers):
    def hook(module, args, kwargs):
        layer = _active_layer(idx)
        tier = None if layer is None else layer.tier
        if tier is None or tier.keys is None:  # the layer holds no tokens yet
            return
        engine = layer.cache.engine
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (
            engine.policy.uses_query_estimate
            and idx + 1 < len(decoder_layers)
            and hidden is not None
            and hidden.shape[1] == 1  # a decode step
            and engine.wants_query_estimate(idx + 1)
        ):
            following = decoder_layers[idx + 1]
            info = layer.cache.info
            with torch.no_grad():
                q_est = speculative_query(following, hidden, kwargs.get("position_embeddings"))
            engine.speculate(
                idx + 1,
                q_est,
                keep_mask(kwargs.get("attention_mask")),
                attention_scale(following, info.model_type, info.head_dim),
            )
        layer.span = OpenSpan(tier.keys.device)

    return hook


def _layer_end(idx):
    def hook(module, args, output):
        layer = _active_layer(idx)
        if layer is None or layer.span is None:
            return
        # The clock turns the layer's span into device time (everything but the serial CPU stage
        # and the transfer) when it resolves the step's timings, after the last layer.
        layer.span.close(layer.tier.keys.device)
        layer.span = None
        if idx == len(layer.cache.layers) - 1:
            layer.cache.engine.close_step()

    return hook
