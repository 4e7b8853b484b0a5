"""The device tier of one layer: the tokens that stay on the model's device, and the moves of
the others to the host store.

The :class:`~hybridgen.engine.Engine` keeps one per layer; every front end's tokens live here
(front ends only translate layouts).

Layout: ``keys``/``values [b, hkv, n_dev, d]`` views of buffers with room to spare; the first
``min(sinks, total)`` are the sink tokens, the rest the most recent ones. Host tokens (layer
``layer_idx`` of the store) sit between the two in logical order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..host_store import HostKVStore
    from .placement import Placement

__all__ = ["DeviceTier"]


class DeviceTier:
    """Sinks + recent tokens of one layer on the device; older tokens in ``store``.

    Args:
        store: the host store; this tier's tokens are its layer ``layer_idx``.
        placement: how many sinks and recent tokens stay (``recent=None``: every token) and the
            eviction chunk.
        window: the layer's sliding attention window (``None``: full attention).
    """

    def __init__(self, store: "HostKVStore", layer_idx: int, placement: "Placement", window: Optional[int] = None):
        self.store = store
        self.layer_idx = layer_idx
        self.placement = placement
        self.window = window
        #: Tokens of the sequence so far (device + host + in flight).
        self.total = 0
        # The tier is the only writer of its layer in the store, so it counts the host tokens
        # itself and reports appended tokens when it next evicts: a decode step then crosses
        # into the native store once (the CPU stage), not for bookkeeping.
        self._host = 0
        self._unreported = 0
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self._buf_k: Optional[torch.Tensor] = None
        self._buf_v: Optional[torch.Tensor] = None
        #: An eviction whose device-to-host copy is still in flight: (event, keys, values) on
        #: the host; the store takes them at the next :meth:`settle`.
        self._in_flight: Optional[tuple] = None
        #: What the serving policy keeps about this layer (e.g. accumulated attention scores);
        #: cleared when the policy changes.
        self.policy_state: Optional[object] = None
        #: Output buffers of the layer's CPU stage, allocated once by the engine's plan.
        self.buffers: Optional[dict] = None

    # --- shape ----------------------------------------------------------------------------------
    @property
    def sinks_on_device(self) -> int:
        return min(self.placement.sinks, self.total)

    def device_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def window_on_device(self) -> bool:
        """A sliding-window layer whose whole window is always on the device: a decode step sees
        at least the ``recent`` newest tokens there plus its own, and the window (the step's token
        included) is no longer, so the host tokens are all outside it and never need reading."""
        recent = self.placement.recent
        return self.window is not None and recent is not None and self.window <= recent + 1

    @property
    def host_tokens(self) -> int:
        return self._host

    def sync_store(self) -> None:
        """Tells the store about tokens appended since the last eviction (its total length)."""
        if self._unreported:
            self.store.append(self.layer_idx, self._unreported)
            self._unreported = 0

    @property
    def in_flight(self) -> int:
        """Tokens evicted from the device tier whose copy the store has not taken yet."""
        return 0 if self._in_flight is None else self._in_flight[1].shape[2]

    def positions(self, device=None) -> torch.Tensor:
        """Logical positions ``[n_dev]`` of the device tokens (sinks, then recent), built where they
        are used (on a GPU: no host-to-device copy, so no synchronisation)."""
        s, n_host = self.sinks_on_device, self.host_tokens
        device = device or "cpu"
        return torch.cat([torch.arange(s, device=device), torch.arange(s + n_host, self.total, device=device)])

    def masks(self, keep: Optional[torch.Tensor]):
        """``(device mask, host mask)``, bool ``[b, n_dev]`` / ``[b, n_host]``, True = ignore, from
        ``keep [b, total]`` (True = attend; ``None``: nothing is masked)."""
        if keep is None:
            return None, None
        if keep.shape[-1] != self.total:
            raise RuntimeError(
                f"layer {self.layer_idx}: the attention mask covers {keep.shape[-1]} tokens, "
                f"the cache holds {self.total}"
            )
        s, n_host = self.sinks_on_device, self.host_tokens
        dev_keep = torch.cat([keep[:, :s], keep[:, s + n_host :]], dim=1)  # no index tensor: no host sync
        return ~dev_keep, ~keep[:, s : s + n_host]

    # --- adding tokens --------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Writes new tokens ``[b, hkv, m, d]`` after the device tier (buffers with room to spare:
        no per-step reallocation of the whole tier). Call :meth:`evict_overflow` after."""
        self.settle()
        n, m = self.device_tokens(), keys.shape[-2]
        if self._buf_k is None or self._buf_k.shape[2] < n + m:
            grow = 2 * n if self.placement.recent is None else 0  # unbounded tier: amortised doubling
            self._reallocate(max(n + m, self._base_capacity(), grow), like=keys)
        self._buf_k[:, :, n : n + m].copy_(keys)
        self._buf_v[:, :, n : n + m].copy_(values)
        self._set_len(n + m)
        self.total += m
        self._unreported += m

    def _base_capacity(self) -> int:
        """Device-tier tokens a layer holds at most while decoding (plus the new one)."""
        p = self.placement
        return p.sinks + (p.recent or 0) + p.evict_chunk + 1

    def _reallocate(self, cap: int, like: torch.Tensor, drop: tuple[int, int] = (0, 0)) -> None:
        """Fresh buffers of ``cap`` tokens holding the device tier without tokens ``[drop[0],
        drop[1])``. Never in place: tensors already handed to attention keep their contents."""
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

    # --- moving tokens to the host ----------------------------------------------------------------
    def evict_overflow(self, force: bool = False) -> None:
        """Moves the oldest recent tokens beyond the budget to the host store — in chunks of
        ``evict_chunk`` tokens during decoding (one transfer per chunk, not per token), all of
        them when ``force``d (after the prompt)."""
        p = self.placement
        if p.recent is None:  # every token stays on the device
            return
        over = self.device_tokens() - self.sinks_on_device - p.recent
        if over > 0 and (force or over >= p.evict_chunk):
            self.evict(over, asynchronous=not force)

    def evict(self, over: int, asynchronous: bool = True) -> None:
        """Moves the ``over`` oldest non-sink device tokens to the host store (on a GPU and
        ``asynchronous``: copied on the side stream, handed over at the next :meth:`settle`)."""
        s, n = self.sinks_on_device, self.device_tokens()
        if not 0 <= over <= n - s:
            raise ValueError(f"cannot evict {over} tokens: {n - s} non-sink tokens are on the device")
        if over == 0:
            return
        self.settle()
        dtype = self.store.dtype
        old_k, old_v = self.keys[:, :, s : s + over], self.values[:, :, s : s + over]
        if self.keys.is_cuda and asynchronous:
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
            self._hand_over(old_k.to("cpu", dtype).contiguous(), old_v.to("cpu", dtype).contiguous())
        self._reallocate(max(n - over + 1, self._base_capacity()), like=self.keys, drop=(s, s + over))

    def settle(self) -> None:
        """Hands an in-flight eviction to the store (waiting for its copy if, unusually, it has
        not finished). Every reader of the layer's tiers runs after this."""
        if self._in_flight is None:
            return
        done, host_k, host_v = self._in_flight
        done.synchronize()
        self._in_flight = None
        self._hand_over(host_k.contiguous(), host_v.contiguous())

    def _hand_over(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The store takes evicted tokens ``[b, hkv, m, d]`` (host memory)."""
        self.sync_store()
        self.store.evict(self.layer_idx, keys, values)
        self._host += keys.shape[2]

    # --- reading every token ----------------------------------------------------------------------
    def logical_kv(self, extra_k: Optional[torch.Tensor] = None, extra_v: Optional[torch.Tensor] = None):
        """Every token's keys and values ``[b, hkv, total (+ extra), d]`` in logical order on the
        device (host tokens copied back), followed by ``extra_k``/``extra_v`` if given."""
        self.settle()
        n_host, s = self.host_tokens, self.sinks_on_device
        keys, values = [self.keys[:, :, :s]], [self.values[:, :, :s]]
        if n_host:
            hk, hv = self.store.read(self.layer_idx, 0, n_host)
            keys.append(hk.to(self.keys.device, self.keys.dtype))
            values.append(hv.to(self.values.device, self.values.dtype))
        keys.append(self.keys[:, :, s:])
        values.append(self.values[:, :, s:])
        if extra_k is not None:
            keys.append(extra_k)
            values.append(extra_v)
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)

    def reset(self) -> None:
        """Forgets the device tokens (the store is reset by its owner)."""
        self.total = self._host = self._unreported = 0
        self.keys = self.values = self._buf_k = self._buf_v = None
        self._in_flight = None
        self.policy_state = None

    def __repr__(self) -> str:
        p = self.placement
        return (
            f"DeviceTier(layer={self.layer_idx}, total={self.total}, device={self.device_tokens()}, "
            f"host={self.host_tokens}, in_flight={self.in_flight}, sinks={p.sinks}, recent={p.recent})"
        )
