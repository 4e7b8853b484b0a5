"""HybridCache: a transformers ``Cache`` whose layers keep the sinks and the most recent tokens on
the model's device and move older tokens to the host store.

Per layer, the device tier is ``keys``/``values`` ``[b, hkv, n_dev, d]``: the first
``min(sinks, total)`` are the sink tokens, the rest the most recent ones. Host tokens sit between
them in logical order. A multi-token step (the prompt) runs the model's own attention over all
tokens and then places them; a one-token step (decode) runs hybrid attention
(:mod:`hybridgen.hf.attention`), after which the oldest recent tokens beyond the budget move to
the host.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar, Token
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..config import HybridConfig
from ..host_store import HostKVStore
from ..policies import make_policy
from ..telemetry import StepRecord, Telemetry
from ..timing import timed
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
    """One layer's device tier; host tokens live in the cache's shared store."""

    def __init__(self, cache: "HybridCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.total = 0
        self.pending: Optional[StepRecord] = None
        #: Decode steps this layer's attention ran through the cache's policy.
        self.policy_calls = 0
        #: The keys returned by the latest update: the attention function recognises its call by them.
        self.returned_keys: Optional[torch.Tensor] = None
        self.t_start = 0.0  # when this layer's forward began (set by the patch's hooks)
        self._buf_k: Optional[torch.Tensor] = None
        self._buf_v: Optional[torch.Tensor] = None
        #: An eviction whose device-to-host copy is still in flight: (event, keys, values) on
        #: the host; the store takes them at the next :meth:`settle`.
        self._in_flight: Optional[tuple] = None

    # --- the transformers layer protocol ---------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store = self.cache.ensure_store(key_states)
        self.settle()
        n_new = key_states.shape[-2]
        full = None
        if n_new > 1 and store.host_len(self.layer_idx) > 0:
            full = self._with_host_tokens(key_states, value_states)
        self._append(key_states, value_states)
        self.total += n_new
        store.append(self.layer_idx, n_new)
        returned = (self.keys, self.values) if full is None else full
        self.returned_keys = returned[0]
        if n_new > 1:
            # The prompt: place it now (the returned tensors keep the step's tokens alive).
            self.evict_overflow(force=True)
        return returned

    def _append(self, key_states, value_states) -> None:
        """Writes new tokens after the device tier, in a buffer with room to spare: no
        per-step reallocation of the whole tier."""
        n, n_new = self.device_tokens(), key_states.shape[-2]
        if self._buf_k is None or self._buf_k.shape[2] < n + n_new:
            grow = 2 * n if self.cache.placement.recent is None else 0  # unbounded tier: amortised doubling
            self._reallocate(max(n + n_new, self._base_capacity(), grow), like=key_states)
        self._buf_k[:, :, n : n + n_new].copy_(key_states)
        self._buf_v[:, :, n : n + n_new].copy_(value_states)
        self._set_len(n + n_new)

    def _base_capacity(self) -> int:
        """Device-tier tokens a layer holds at most while decoding (plus the new one)."""
        p = self.cache.placement
        return p.sinks + (p.recent or 0) + p.evict_chunk + 1

    def _reallocate(self, cap: int, like: torch.Tensor, drop: tuple[int, int] = (0, 0)) -> None:
        """Fresh buffers of ``cap`` tokens holding the device tier without tokens
        ``[drop[0], drop[1])``. Never in place: tensors already handed to attention (the
        prompt's) keep their contents."""
        b, h, _, d = like.shape
        new_k = torch.empty((b, h, cap, d), dtype=like.dtype, device=like.device)
        new_v = torch.empty_like(new_k)
        n, (lo, hi), kept = self.device_tokens(), drop, 0
        for a, z in ((0, lo), (hi, n)):
            if z > a:
                new_k[:, :, kept : kept + z - a].copy_(self.keys[:, :, a:z])
                new_v[:, :, kept : kept + z - a].copy_(self.values[:, :, a:z])
                kept += z - a
        self._buf_k, self._buf_v = new_k, new_v
        self._set_len(kept)

    def _set_len(self, n: int) -> None:
        self.keys = self._buf_k[:, :, :n]
        self.values = self._buf_v[:, :, :n]

    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask spans every logical position: host and device tokens, plus the new ones.
        return self.total + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.total = 0
        self._buf_k = self._buf_v = None
        self._in_flight = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("HybridCache cannot crop: tokens on the host are final")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HybridCache does not support beam search; use greedy or sampling")

    # --- tiers -------------------------------------------------------------------------------
    @property
    def sinks_on_device(self) -> int:
        return min(self.cache.placement.sinks, self.total)

    def device_tokens(self) -> int:
        return 0 if self._buf_k is None else self.keys.shape[-2]

    def evict_overflow(self, force: bool = False) -> None:
        """Moves the oldest recent tokens beyond ``gpu_budget`` to the host store — in chunks of
        ``evict_chunk`` tokens during decoding (one transfer per chunk, not per token), all of
        them when ``force``d (after the prompt)."""
        p = self.cache.placement
        if p.recent is None:  # the policy keeps every token on the device
            return
        s = self.sinks_on_device
        n = self.device_tokens()
        over = n - s - p.recent
        if over <= 0 or (not force and over < p.evict_chunk):
            return
        self.settle()
        dtype = self.cache.store.dtype
        old_k, old_v = self.keys[:, :, s : s + over], self.values[:, :, s : s + over]
        if self.keys.is_cuda and not force:
            # Decoding on a GPU: copy to page-locked host memory on the side stream and free the
            # device rows at once; the store takes the tokens at the next settle() (the start of
            # this layer's next step), long after the copy finished. The step never waits.
            from ..cuda import side_stream

            device = self.keys.device
            side, main = side_stream(device.index), torch.cuda.current_stream(device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                host_k = torch.empty(old_k.shape, dtype=dtype, pin_memory=True)
                host_v = torch.empty(old_v.shape, dtype=dtype, pin_memory=True)
                host_k.copy_(old_k, non_blocking=True)
                host_v.copy_(old_v, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            for buf in (self._buf_k, self._buf_v):
                buf.record_stream(side)  # the old buffer outlives the copy that reads it
            self._in_flight = (done, host_k, host_v)
        else:
            self.cache.store.evict(self.layer_idx, old_k.to("cpu", dtype).contiguous(), old_v.to("cpu", dtype).contiguous())
        self._reallocate(max(n - over + 1, self._base_capacity()), like=self.keys, drop=(s, s + over))

    def settle(self) -> None:
        """Hands an in-flight eviction to the store (waiting for its copy if, unusually, it has
        not finished). Every reader of the layer's tiers runs after this."""
        if self._in_flight is None:
            return
        done, host_k, host_v = self._in_flight
        done.synchronize()
        self.cache.store.evict(self.layer_idx, host_k.contiguous(), host_v.contiguous())
        self._in_flight = None

    @property
    def in_flight(self) -> int:
        """Tokens evicted from the device tier whose copy the store has not taken yet."""
        return 0 if self._in_flight is None else self._in_flight[1].shape[2]

    def _with_host_tokens(self, key_states, value_states):
        """Every token in logical order (host tokens copied back): exact attention for a
        multi-token step after tokens went to the host."""
        store, s = self.cache.store, self.sinks_on_device
        hk, hv = store.read(self.layer_idx, 0, store.host_len(self.layer_idx))
        hk, hv = hk.to(self.keys.device, self.keys.dtype), hv.to(self.keys.device, self.keys.dtype)
        keys = torch.cat([self.keys[:, :, :s], hk, self.keys[:, :, s:], key_states], dim=-2)
        values = torch.cat([self.values[:, :, :s], hv, self.values[:, :, s:], value_states], dim=-2)
        return keys, values


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
        super().__init__(layers=[HybridLayer(self, i) for i in range(self.info.layers)])
        self.store: Optional[HostKVStore] = None
        self.telemetry = Telemetry()
        self.set_config(config)
        self.step = 0
        #: This step's records and their layers' spans, resolved after the last layer.
        self._step_records: list = []

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
            b = key_states.shape[0]
            max_context = c.max_context or info.max_positions
            token_bytes = b * info.kv_heads * info.head_dim * key_states.element_size()
            room = info.layers * max_context * token_bytes
            self.store = HostKVStore(
                info.layers, b, info.kv_heads, info.head_dim, key_states.dtype,
                sinks=self.placement.sinks,
                near_capacity_bytes=c.near_capacity_bytes or room,
                far_capacity_bytes=c.far_capacity_bytes or 2 * room,
                near_node=c.near_node, far_node=c.far_node,
                max_host_tokens=max_context,
            )
            device = key_states.device
            # Pin only where tokens go to the host and are read from there (pinning commits the
            # store's reserved room): never for a policy that keeps everything on the device.
            to_host = self.placement.recent is not None
            if c.pin_host or (c.pin_host is None and device.type == "cuda" and to_host):
                from ..cuda import kernel_cache_dir, require

                require("pin_host", device)
                self.store.pin(device.index if device.index is not None else torch.cuda.current_device(),
                               kernel_cache_dir())
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

    @property
    def decode_steps(self) -> int:
        """Decode steps whose every layer ran this cache's policy (and was recorded)."""
        return self.step

    def policy_calls(self) -> list[int]:
        """Per layer, the decode steps its attention ran through the policy."""
        return [layer.policy_calls for layer in self.layers]

    @property
    def scheduler(self):
        """The feedback scheduler of the ``scheduler`` policy (``None`` for other policies)."""
        return getattr(self.policy, "scheduler", None)

    def record(self, layer_idx: int, record: StepRecord, layer_span=None) -> None:
        """Adds one layer's record (``layer_span``: the whole layer's time, if measured); after
        the last layer, resolves the step's timings (one wait for the device per step) and feeds
        them to the scheduler."""
        self._step_records.append((record, layer_span))
        if layer_idx != self.info.layers - 1:
            return
        t_gpu = t_cpu = t_tx = 0.0
        for rec, span in self._step_records:
            self.telemetry.add(rec.resolve(span))
            t_gpu += rec.t_gpu
            t_cpu += rec.t_cpu - rec.t_hidden
            t_tx += rec.t_tx
        self._step_records = []
        self.policy.observe(t_gpu, t_cpu, t_tx)
        self.step += 1

    def timed(self, fn, device: torch.device):
        """``(fn(), seconds)``: on CUDA a lazy span between events on the current stream (read
        once per step), on the CPU wall time."""
        return timed(fn, device)

    def settle(self) -> None:
        """Completes every layer's in-flight eviction (e.g. before inspecting the store)."""
        for layer in self.layers:
            layer.settle()
