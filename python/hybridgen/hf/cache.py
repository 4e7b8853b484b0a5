"""HybridCache: a transformers ``Cache`` whose layers are the decode engine's
(:class:`hybridgen.engine.Engine`).

This module only speaks transformers' ``Cache`` protocol and translates its masks: the tokens,
the policy, the clock and the host store are the engine's. A multi-token step (the prompt) runs
the model's own attention over all tokens and then places them; a one-token step (decode) runs
:meth:`Engine.step <hybridgen.engine.Engine.step>` (called by :mod:`hybridgen.hf.attention`).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..config import HybridConfig
from ..engine import DeviceTier, Engine
from ..timing import OpenSpan
from .calls import activate
from .models import describe

__all__ = ["HybridCache", "HybridLayer", "keep_mask"]


def keep_mask(attention_mask) -> Optional[torch.Tensor]:
    """The engine's mask, bool ``[b, total]`` (True = attend), from transformers' 4-D mask: its
    last query row (causal order is the engine's rule). ``None`` stays ``None``."""
    if attention_mask is None:
        return None
    keep = attention_mask[:, 0, -1, :]
    if keep.dtype != torch.bool:  # additive float mask: 0 attends, a large negative masks
        keep = keep > torch.finfo(keep.dtype).min / 2
    return keep


def _in_cache_terms(e: ValueError) -> ValueError:
    """The engine's "make a new one" is a new HybridCache here."""
    if "make a new one" not in str(e):
        return e
    text = str(e).replace("this engine", "this HybridCache").replace("make a new one", "use a new HybridCache")
    return ValueError(text)


class HybridLayer(DynamicLayer):
    """transformers' view of one layer: its tokens are the engine's tier ``layer_idx``; this
    class only speaks the ``Cache`` layer protocol."""

    def __init__(self, cache: "HybridCache", layer_idx: int):
        super().__init__()
        # A weak reference: the cache owns its layers, and a layer owning its cache back would
        # make a cycle that keeps the host store's memory until Python's cyclic collector runs.
        self._cache = weakref.ref(cache)
        self.layer_idx = layer_idx
        #: Decode steps this layer's attention ran through the engine.
        self.policy_calls = 0
        #: The keys returned by the latest update: the attention function recognises its call by them.
        self.returned_keys: Optional[torch.Tensor] = None
        #: The layer's forward in progress (set by the patch's layer hooks).
        self.span: Optional[OpenSpan] = None
        self._tier: Optional[DeviceTier] = None

    @property
    def cache(self) -> "HybridCache":
        cache = self._cache()
        if cache is None:
            raise RuntimeError("this layer's HybridCache no longer exists")
        return cache

    @property
    def tier(self) -> Optional[DeviceTier]:
        """The layer's tokens (``None`` until the first update plans the engine)."""
        if self._tier is None and self.cache.engine.tiers:
            self._tier = self.cache.engine.tiers[self.layer_idx]
        return self._tier

    # --- the transformers layer protocol ---------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        engine = self.cache.engine
        try:
            engine.plan(batch=key_states.shape[0], dtype=key_states.dtype, device=key_states.device)
        except ValueError as e:
            raise _in_cache_terms(e) from None
        tier = self._tier = engine.tiers[self.layer_idx]
        tier.settle()
        n_new = key_states.shape[-2]
        full = None
        if n_new > 1 and tier.host_tokens > 0:
            # A multi-token step after tokens went to the host: it attends to every token (exact).
            full = tier.logical_kv(key_states, value_states)
        engine.place(self.layer_idx, key_states, value_states)
        self._sync()
        returned = (self.keys, self.values) if full is None else full
        self.returned_keys = returned[0]
        if n_new > 1:
            # The prompt: place it now (the returned tensors keep the step's tokens alive).
            engine.evict_overflow(self.layer_idx, force=True)
            self._sync()
        return returned

    def _sync(self) -> None:
        """transformers reads ``keys``/``values``: the tier's device tokens."""
        tier = self.tier
        if tier is not None:
            self.keys, self.values = tier.keys, tier.values

    def settle(self) -> None:
        if self.tier is not None:
            self.tier.settle()

    @property
    def total(self) -> int:
        return 0 if self.tier is None else self.tier.total

    @property
    def sinks_on_device(self) -> int:
        return 0 if self.tier is None else self.tier.sinks_on_device

    def device_tokens(self) -> int:
        return 0 if self.tier is None else self.tier.device_tokens()

    @property
    def in_flight(self) -> int:
        return 0 if self.tier is None else self.tier.in_flight

    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask spans every logical position: host and device tokens, plus the new ones.
        return self.total + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        if self.tier is not None:
            self.tier.reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("HybridCache cannot crop: tokens on the host are final")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HybridCache does not support beam search; use greedy or sampling")


class HybridCache(Cache):
    """Pass as the cache (``cache=`` from transformers 5.24, ``past_key_values=`` before; see
    :func:`hybridgen.hf.compat.cache_arg`) to a model patched with :func:`hybridgen.patch` (its
    ``generate`` and forward make one by themselves when given none).

    Args:
        model: the patched model this cache serves (its shape is checked on every update).
        config: overrides the configuration given to ``patch``.
    """

    def __init__(self, model, config: Optional[HybridConfig] = None):
        state = getattr(model, "_hybridgen", None)
        if config is None:
            if state is None:
                raise ValueError("the model is not patched: call hybridgen.patch(model, HybridConfig(...)) first")
            config = state.config
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        self.info = describe(model)
        self.owner = state
        #: The decode engine: policy, clock and telemetry, host store, device tiers.
        self.engine = Engine(config, self.info)
        super().__init__(layers=[HybridLayer(self, i) for i in range(self.info.layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not 0 <= layer_idx < self.info.layers:
            raise ValueError(f"layer {layer_idx} out of range: this HybridCache serves {self.info.layers} layers")
        if key_states.shape[1] != self.info.kv_heads or key_states.shape[-1] != self.info.head_dim:
            raise ValueError(
                f"this HybridCache was made for a model with {self.info.kv_heads} KV heads of dim "
                f"{self.info.head_dim}, got keys of shape {tuple(key_states.shape)}: use one cache per model"
            )
        activate(self)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # --- the engine's state, as users of a cache look for it --------------------------------------
    config = property(lambda self: self.engine.config)
    policy = property(lambda self: self.engine.policy)
    placement = property(lambda self: self.engine.placement)
    store = property(lambda self: self.engine.store)
    clock = property(lambda self: self.engine.clock)
    telemetry = property(lambda self: self.engine.telemetry)
    scheduler = property(lambda self: self.engine.scheduler)

    @property
    def step(self) -> int:
        """Decode steps closed so far (every layer recorded)."""
        return self.engine.steps

    decode_steps = step

    def set_config(self, config: HybridConfig) -> None:
        """Serves the following steps with ``config``'s policy (:meth:`Engine.set_config`)."""
        try:
            self.engine.set_config(config)
        except ValueError as e:
            raise _in_cache_terms(e) from None

    def host_tokens(self, layer_idx: int = 0) -> int:
        """Tokens of a layer in the host tier (or on their way there)."""
        tier = self.layers[layer_idx].tier
        return 0 if tier is None else tier.host_tokens + tier.in_flight

    def policy_calls(self) -> list[int]:
        """Per layer, the decode steps its attention ran through the engine."""
        return [layer.policy_calls for layer in self.layers]

    def decode(self, layer_idx: int, q: torch.Tensor, attention_mask, scale: float, span=None) -> torch.Tensor:
        """One decode step of layer ``layer_idx``: ``q [b, hq, d]`` → attention output ``[b, hq, d]``
        (float32) through the engine (``span``: the whole layer's forward, closed by the patch's
        hooks, which also close the step; without them the step closes after the last layer)."""
        layer = self.layers[layer_idx]
        out = self.engine.step(layer_idx, q, keep_mask(attention_mask), scale, span=span)
        layer.policy_calls += 1
        layer._sync()
        if span is None and layer_idx == self.info.layers - 1:
            self.engine.close_step()
        return out

    def place_prompt(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        query=None,
        keep=None,
        scale: Optional[float] = None,
    ) -> None:
        """Places a prompt recorded elsewhere (``keys``/``values [b, hkv, n, d]`` in logical order)
        as this cache's own prefill would; a policy that looks at prompts sees ``query`` (see
        :class:`hybridgen.engine.PromptRecorder`)."""
        layer = self.layers[layer_idx]
        self.update(keys, values, layer_idx)
        layer.returned_keys = None  # nothing attends to this step: let the prompt's tensors go
        if query is not None:
            self.engine.policy.prefill(layer.tier, query, keys, values, keep, scale)

    def settle(self) -> None:
        """Completes every layer's in-flight eviction (e.g. before inspecting the store)."""
        self.engine.settle()
