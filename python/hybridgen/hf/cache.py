"""HybridCache: a transformers ``Cache`` over the decode engine (:mod:`hybridgen.engine`).

Each layer's tokens live in a :class:`~hybridgen.engine.DeviceTier` (sinks + recent tokens on the
model's device, ``[b, hkv, n_dev, d]``) and the cache's host store (every token in between). A
multi-token step (the prompt) runs the model's own attention over all tokens and then places
them; a one-token step (decode) runs the policy (:meth:`HybridCache.decode`, called by
:mod:`hybridgen.hf.attention`), after which the oldest recent tokens beyond the budget move to
the host.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar, Token
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..config import HybridConfig
from ..engine import DeviceTier, PolicyRunner, StepClock, decode_with, make_store
from ..host_store import HostKVStore
from ..policies import make_policy
from ..policies.base import keep_mask
from ..timing import OpenSpan
from .models import describe

#: The HybridCache whose layer was updated last: the attention function (which transformers does
#: not hand the cache) reads it right after the update of the same layer. Held weakly, so it never
#: keeps a cache (and its host memory) alive; a patched model's call restores it when it ends.
ACTIVE_CACHE: ContextVar[Optional[weakref.ref]] = ContextVar("hybridgen_active_cache", default=None)

#: ``(patch state, name of a non-hybrid cache type or None)`` of the patched model call in
#: progress: tells the attention function whether a decode step without a HybridCache is the
#: user's choice (they passed another cache) or a bypass (an error).
CURRENT_CALL: ContextVar[Optional[tuple]] = ContextVar("hybridgen_current_call", default=None)


def activate(cache: Optional["HybridCache"]) -> Token:
    """Makes ``cache`` the active one; returns the token that restores the previous one."""
    return ACTIVE_CACHE.set(None if cache is None else weakref.ref(cache))


def deactivate(token: Token) -> None:
    ACTIVE_CACHE.reset(token)


def active_cache() -> Optional["HybridCache"]:
    ref = ACTIVE_CACHE.get()
    return None if ref is None else ref()


class HybridLayer(DynamicLayer):
    """transformers' view of one layer: its tokens live in a :class:`~hybridgen.engine.DeviceTier`
    (device) and the cache's host store; this class only speaks the ``Cache`` layer protocol."""

    def __init__(self, cache: "HybridCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        #: The layer's tokens (made with the store, at the first update).
        self.tier: Optional[DeviceTier] = None
        #: Decode steps this layer's attention ran through the cache's policy.
        self.policy_calls = 0
        #: The keys returned by the latest update: the attention function recognises its call by them.
        self.returned_keys: Optional[torch.Tensor] = None
        #: The layer's forward in progress (set by the patch's layer hooks).
        self.span: Optional[OpenSpan] = None

    # --- the transformers layer protocol ---------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store = self.cache.ensure_store(key_states)
        if self.tier is None:
            self.tier = DeviceTier(store, self.layer_idx, self.cache.placement)
        tier = self.tier
        tier.settle()
        n_new = key_states.shape[-2]
        full = None
        if n_new > 1 and tier.host_tokens > 0:
            # A multi-token step after tokens went to the host: it attends to every token (exact).
            full = tier.logical_kv(key_states, value_states)
        tier.append(key_states, value_states)
        self.keys, self.values = tier.keys, tier.values
        returned = (self.keys, self.values) if full is None else full
        self.returned_keys = returned[0]
        if n_new > 1:
            # The prompt: place it now (the returned tensors keep the step's tokens alive).
            self.evict_overflow(force=True)
        return returned

    def evict_overflow(self, force: bool = False) -> None:
        if self.tier is not None:
            self.tier.evict_overflow(force)
            self.keys, self.values = self.tier.keys, self.tier.values

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


class HybridCache(Cache, PolicyRunner):
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
        super().__init__(layers=[HybridLayer(self, i) for i in range(self.info.layers)])
        self.store: Optional[HostKVStore] = None
        self.clock: Optional[StepClock] = None
        self.set_config(config)

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

    def ensure_store(self, key_states: torch.Tensor) -> HostKVStore:
        if self.store is None:
            c, info = self.config, self.info
            self.store = make_store(
                c, layers=info.layers, batch=key_states.shape[0], kv_heads=info.kv_heads, head_dim=info.head_dim,
                dtype=key_states.dtype, max_tokens=c.max_context or info.max_positions, sinks=self.placement.sinks,
                device=key_states.device, to_host=self.placement.recent is not None,
            )
        elif key_states.dtype != self.store.dtype:
            raise ValueError(
                f"keys arrive as {key_states.dtype} but this HybridCache stores {self.store.dtype}: use a new HybridCache"
            )
        elif key_states.shape[0] != self.store.batch:
            raise ValueError(
                f"batch size changed from {self.store.batch} to {key_states.shape[0]}: use a new HybridCache"
            )
        return self.store

    # --- the policy --------------------------------------------------------------------------
    def set_config(self, config: HybridConfig) -> None:
        """Serves the following steps with ``config``'s policy (a fresh one: scores, the
        scheduler's state start over). Once tokens are placed, the placement must not change."""
        config.validate()
        policy = make_policy(config, self.info)
        placement = policy.placement()
        if self.store is not None and placement != self.placement:
            raise ValueError(
                f"policy {config.policy!r} places tokens as {placement}, but this cache holds them as "
                f"{self.placement}: use a new HybridCache"
            )
        self.config, self.policy, self.placement = config, policy, placement
        if self.clock is None:
            self.clock = StepClock(policy.observe)
        else:  # the step count and telemetry carry on; the feedback goes to the new policy
            self.clock.observe = policy.observe
        for layer in self.layers:
            if layer.tier is not None:
                layer.tier.policy_state = None

    @property
    def decode_steps(self) -> int:
        """Decode steps whose every layer ran this cache's policy (and was recorded)."""
        return self.clock.step

    def host_tokens(self, layer_idx: int = 0) -> int:
        """Tokens of a layer in the host tier (or on their way there)."""
        tier = self.layers[layer_idx].tier
        return 0 if tier is None else tier.host_tokens + tier.in_flight

    def policy_calls(self) -> list[int]:
        """Per layer, the decode steps its attention ran through the policy."""
        return [layer.policy_calls for layer in self.layers]

    def decode(self, layer_idx: int, q: torch.Tensor, attention_mask, scale: float, span=None) -> torch.Tensor:
        """One decode step of layer ``layer_idx`` through the policy: ``q [b, hq, d]`` → attention
        output ``[b, hq, d]`` (float32); the step's record goes to the clock (``span``: the whole
        layer's forward, closed by the patch's hooks; without one the step closes after the last
        layer's attention)."""
        layer = self.layers[layer_idx]
        keep = keep_mask(attention_mask) if attention_mask is not None else None
        out, record = decode_with(self.policy, layer.tier, q, keep, scale, self.clock.step)
        layer.policy_calls += 1
        self.clock.record(record, span)
        layer.evict_overflow()
        if span is None and layer_idx == self.info.layers - 1:
            self.clock.close_step()
        return out

    def place_prompt(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, query=None,
                     attention_mask=None, scale: Optional[float] = None) -> None:
        """Places a prompt recorded elsewhere (``keys``/``values [b, hkv, n, d]`` in logical order)
        as this cache's own prefill would: the tokens go to their tiers, and a policy that looks
        at the prompt sees ``query [b, hq, n, d]`` (if given). One prefill, replayed into many
        policies' caches (the speed harness, the accuracy evaluations)."""
        layer = self.layers[layer_idx]
        self.update(keys, values, layer_idx)
        layer.returned_keys = None  # nothing attends to this step: let the prompt's tensors go
        if query is not None:
            self.policy.prefill(layer.tier, query, keys, values, attention_mask, scale)

    def settle(self) -> None:
        """Completes every layer's in-flight eviction (e.g. before inspecting the store)."""
        for layer in self.layers:
            layer.settle()
