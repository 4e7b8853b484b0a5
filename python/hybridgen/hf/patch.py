"""``hybridgen.patch(model, config)``: hybrid attention for a transformers model in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import HybridConfig
from . import attention
from ..timing import between, mark
from .cache import ACTIVE_CACHE, HybridCache
from .models import describe

__all__ = ["patch", "unpatch", "is_patched"]


@dataclass(eq=False)
class PatchState:
    config: HybridConfig
    original_attn_implementation: str
    handles: list = field(default_factory=list)
    #: The cache of the last generate() / forward call that made its own.
    last_cache: Optional[HybridCache] = None


def is_patched(model) -> bool:
    return getattr(model, "_hybridgen", None) is not None


def _decoder_layers(model):
    """``(layer_idx, decoder_layer, attention_module)`` for every decoder layer."""
    found = []
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if attn is not None and getattr(attn, "layer_idx", None) is not None:
            found.append((attn.layer_idx, module, attn))
    return sorted(found, key=lambda x: x[0])


def patch(model, config: Optional[HybridConfig] = None):
    """Makes ``model.generate()`` and forward calls use hybrid attention.

    Prefill runs the model's normal attention and then places the KV (the sinks and the most
    recent ``gpu_budget`` tokens stay on the model's device, the rest go to the host store);
    decode steps run hybrid attention. Returns the model. Undo with :func:`unpatch`.
    """
    config = HybridConfig() if config is None else config
    if not isinstance(config, HybridConfig):
        raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
    config.validate()
    info = describe(model)  # ValueError for unsupported models
    if is_patched(model):
        raise RuntimeError("this model is already patched with hybridgen; call hybridgen.unpatch(model) first")
    config.require_cuda_options(next(model.parameters()).device)
    layers = _decoder_layers(model)
    if len(layers) != info.layers:
        raise ValueError(f"found {len(layers)} attention layers, the config says {info.layers}")

    attention.register()
    state = PatchState(config=config, original_attn_implementation=model.config._attn_implementation)
    model.set_attn_implementation(attention.NAME)

    decoder_layers = [layer for _, layer, _ in layers]
    for idx, decoder_layer, attn in layers:
        attn._hybridgen_state = state
        state.handles.append(
            decoder_layer.register_forward_pre_hook(_layer_start(idx, decoder_layers), with_kwargs=True)
        )
        state.handles.append(decoder_layer.register_forward_hook(_layer_end(idx)))
    state.handles.append(model.register_forward_pre_hook(_inject_cache(model, state), with_kwargs=True))

    original_generate = model.generate

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = state.last_cache = HybridCache(model)
        return original_generate(*args, **kwargs)

    generate.__doc__ = original_generate.__doc__
    model.generate = generate
    model._hybridgen = state
    return model


def unpatch(model):
    """Restores the model's own attention. Returns the model."""
    state = getattr(model, "_hybridgen", None)
    if state is None:
        raise ValueError("this model is not patched with hybridgen")
    for handle in state.handles:
        handle.remove()
    for _, _, attn in _decoder_layers(model):
        attn.__dict__.pop("_hybridgen_state", None)
    model.__dict__.pop("generate", None)
    model.set_attn_implementation(state.original_attn_implementation)
    del model._hybridgen
    return model


def _inject_cache(model, state):
    def hook(module, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = state.last_cache = HybridCache(model)
        if isinstance(kwargs.get("past_key_values"), HybridCache):
            ACTIVE_CACHE.set(kwargs["past_key_values"])  # the layer hooks time this cache's layers
        return args, kwargs

    return hook


def _active_layer(idx):
    cache = ACTIVE_CACHE.get()
    if cache is None or idx >= len(cache.layers):
        return None
    return cache.layers[idx]


def _layer_start(idx, decoder_layers):
    def hook(module, args, kwargs):
        layer = _active_layer(idx)
        if layer is not None and layer.keys is not None:
            if idx + 1 < len(decoder_layers):
                hidden = args[0] if args else kwargs.get("hidden_states")
                if hidden is not None and hidden.shape[1] == 1:  # a decode step
                    layer.cache.layers[idx + 1].settle()
                    layer.cache.policy.speculate(layer.cache.layers[idx + 1], decoder_layers[idx + 1], hidden,
                                                 kwargs.get("position_embeddings"), kwargs.get("attention_mask"))
            layer.t_start = mark(layer.keys.device)

    return hook


def _layer_end(idx):
    def hook(module, args, output):
        layer = _active_layer(idx)
        if layer is None or layer.pending is None:
            return
        record, layer.pending = layer.pending, None
        # The cache turns the layer's span into device time (everything but the serial CPU stage
        # and the transfer) when it resolves the step's timings.
        layer.cache.record(idx, record, layer_span=between(layer.t_start, mark(layer.keys.device)))

    return hook
