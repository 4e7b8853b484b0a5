"""The hybrid KV cache of one FlexGen attention layer and GPU batch.

FlexGen keeps a layer's cache as a pair of ``(s, b*n_head, head_dim)`` float16 tensors and hands
it to ``TorchDevice.mha_gen`` as ``k_cache``/``v_cache``. With the drop-in, the layer's cache home
holds a :class:`LayerState` instead, and the patched ``mha_gen`` recognises it:

* device tier: ``[b, n_head, cap, head_dim]`` buffers on the compute device holding the sink
  tokens and the most recent tokens, in token order, with room for the chunk of tokens waiting to
  be evicted and for the token being decoded;
* host tier: a one-layer :class:`~hybridgen.HostKVStore` with every token in between.

FlexGen writes a step's new key/value after attention (``store_cache``), so attention sees the new
token in a spare slot past the device tier (:meth:`LayerState.with_new`) and :meth:`append`
commits it afterwards.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..host_store import HostKVStore
from .session import Session

__all__ = ["LayerState"]


def _heads(x: torch.Tensor, batch: int, n_head: int) -> torch.Tensor:
    """FlexGen's ``(s, b*n_head, d)`` as hybridgen's ``[b, n_head, s, d]`` (a view)."""
    s, _, d = x.shape
    return x.view(s, batch, n_head, d).permute(1, 2, 0, 3)


class LayerState:
    """Device tier + host store of one layer and GPU batch (see the module docstring).

    Args:
        session: the patch's shared :class:`~hybridgen.flexgen.session.Session`.
        layer_id: FlexGen's layer index (for telemetry).
        batch, n_head, head_dim: the cache's shape (FlexGen's GPU batch size, OPT's heads).
        max_tokens: the sequence length FlexGen's task can reach (``prompt_len + gen_len``).
        sinks, gpu_budget: leading tokens that never leave the device, and recent tokens kept.
        evict_chunk: during decoding, tokens move to the host this many at a time.
        near_capacity_bytes, far_capacity_bytes: host tier budgets of this layer's store
            (``None``: room for ``max_tokens`` in each).
        near_node, far_node: NUMA nodes of the key and value tiers.
    """

    def __init__(
        self,
        session: Session,
        layer_id: int,
        *,
        batch: int,
        n_head: int,
        head_dim: int,
        max_tokens: int,
        sinks: int,
        gpu_budget: int,
        evict_chunk: int = 32,
        near_capacity_bytes: Optional[int] = None,
        far_capacity_bytes: Optional[int] = None,
        near_node: Optional[int] = None,
        far_node: Optional[int] = None,
        dtype: torch.dtype = torch.float16,
    ):
        self.session = session
        self.layer_id = layer_id
        self.batch, self.n_head, self.head_dim = batch, n_head, head_dim
        self.max_tokens = max_tokens
        self.sinks, self.gpu_budget, self.evict_chunk = sinks, gpu_budget, evict_chunk
        room = max(max_tokens, 1) * batch * n_head * head_dim * torch.finfo(dtype).bits // 8
        self.store = HostKVStore(
            1, batch, n_head, head_dim, dtype,
            near_capacity_bytes=near_capacity_bytes or room,
            far_capacity_bytes=far_capacity_bytes or 2 * room,
            sinks=sinks, near_node=near_node, far_node=far_node,
            max_host_tokens=max(max_tokens, 1),
        )
        #: Tokens of the sequence so far (device + host), and how many are on the device.
        self.total = 0
        self.n_dev = 0
        self._k: Optional[torch.Tensor] = None
        self._v: Optional[torch.Tensor] = None

    # --- shape of the tiers -------------------------------------------------------------------
    @property
    def sinks_on_device(self) -> int:
        return min(self.sinks, self.total)

    @property
    def host_len(self) -> int:
        return self.store.host_len(0)

    @property
    def capacity(self) -> int:
        """Device-tier slots: sinks, budget, a chunk waiting for eviction, the token being decoded."""
        return min(self.sinks + self.gpu_budget + self.evict_chunk + 1, max(self.max_tokens, 1))

    def device_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device tier's keys and values ``[b, n_head, n_dev, d]`` (views, sinks first)."""
        return self._k[:, :, : self.n_dev], self._v[:, :, : self.n_dev]

    # --- placing tokens (FlexGen's store_cache) -----------------------------------------------
    def place_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Places the prompt's keys/values ``(s, b*n_head, d)`` (FlexGen's prefill output): the
        sinks and the ``gpu_budget`` most recent tokens on the device, the rest on the host."""
        if self.total:
            raise RuntimeError(f"layer {self.layer_id}: the prompt was already placed (a new generate() makes new caches)")
        kk, vv = _heads(k, self.batch, self.n_head), _heads(v, self.batch, self.n_head)
        n = kk.shape[2]
        self._k = torch.empty((self.batch, self.n_head, self.capacity, self.head_dim), dtype=k.dtype, device=k.device)
        self._v = torch.empty_like(self._k)
        self.store.append(0, n)
        self.total = n
        s = min(self.sinks, n)
        over = max(0, n - s - self.gpu_budget)
        if over:
            self.store.evict(0, self._to_host(kk[:, :, s : s + over]), self._to_host(vv[:, :, s : s + over]))
        kept = n - over
        for buf, src in ((self._k, kk), (self._v, vv)):
            buf[:, :, :s].copy_(src[:, :, :s])
            buf[:, :, s:kept].copy_(src[:, :, s + over :])
        self.n_dev = kept

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commits a decode step's keys/values ``(m, b*n_head, d)`` after the device tier, then
        moves the oldest recent tokens beyond the budget to the host (a chunk at a time)."""
        if self._k is None:
            raise RuntimeError(f"layer {self.layer_id}: a decode token arrived before the prompt was placed")
        m = k.shape[0]
        if self.n_dev + m > self.capacity:
            raise RuntimeError(f"layer {self.layer_id}: {m} tokens do not fit the device tier ({self.n_dev}/{self.capacity})")
        self._k[:, :, self.n_dev : self.n_dev + m].copy_(_heads(k, self.batch, self.n_head))
        self._v[:, :, self.n_dev : self.n_dev + m].copy_(_heads(v, self.batch, self.n_head))
        self.n_dev += m
        self.total += m
        self.store.append(0, m)
        self.evict_overflow()

    def evict_overflow(self, force: bool = False) -> None:
        """Moves the recent tokens beyond ``gpu_budget`` to the host: once they make a whole
        ``evict_chunk`` (one transfer per chunk, not per token), or whatever there is if ``force``."""
        over = self.n_dev - self.sinks_on_device - self.gpu_budget
        if over > 0 and (force or over >= self.evict_chunk):
            self.evict(over)

    def evict(self, m: int) -> None:
        """Moves the ``m`` oldest non-sink device tokens to the host store."""
        s = self.sinks_on_device
        if not 0 <= m <= self.n_dev - s:
            raise ValueError(f"cannot evict {m} tokens: {self.n_dev - s} non-sink tokens are on the device")
        if m == 0:
            return
        self.store.evict(0, self._to_host(self._k[:, :, s : s + m]), self._to_host(self._v[:, :, s : s + m]))
        rest = self.n_dev - s - m
        for buf in (self._k, self._v):  # shift the remaining recent tokens down (clone: the ranges overlap)
            buf[:, :, s : s + rest].copy_(buf[:, :, s + m : self.n_dev].clone())
        self.n_dev -= m

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        return x.to("cpu", self.store.dtype).contiguous()

    # --- what attention reads (FlexGen's mha_gen) ---------------------------------------------
    def with_new(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device tier plus the token being decoded (``k_new``/``v_new [b, n_head, d]``,
        written into the spare slot, not committed): keys, values ``[b, n_head, n_dev + 1, d]``."""
        if self._k is None:
            raise RuntimeError(f"layer {self.layer_id}: decoding before the prompt was placed")
        n = self.n_dev
        self._k[:, :, n].copy_(k_new)
        self._v[:, :, n].copy_(v_new)
        return self._k[:, :, : n + 1], self._v[:, :, : n + 1]

    def masks(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Device and host masks (bool, True = ignore) from FlexGen's attention mask
        ``keep (b, total + 1)`` (True = attend; left padding), for the device tier plus the new
        token and for the host tokens."""
        length = keep.shape[1]
        if length != self.total + 1:
            raise RuntimeError(
                f"layer {self.layer_id}: the attention mask covers {length} tokens but the cache holds {self.total} "
                "(+1 new): FlexGen's store_cache and mha_gen ran out of step"
            )
        s, n_host = self.sinks_on_device, self.host_len
        dev_pos = torch.cat([torch.arange(s), torch.arange(s + n_host, length)]).to(keep.device)
        return ~keep[:, dev_pos], ~keep[:, s : s + n_host]

    # --- FlexGen's cache protocol -------------------------------------------------------------
    def delete(self) -> None:
        """Frees both tiers (FlexGen's ``delete_cache`` calls this at the end of ``generate``) and
        closes the session's step in progress: the generation is over."""
        self.session.finish_step()
        self._k = self._v = None
        self.total = self.n_dev = 0
        self.store.reset()

    def __repr__(self) -> str:
        return (f"LayerState(layer={self.layer_id}, batch={self.batch}, n_head={self.n_head}, head_dim={self.head_dim}, "
                f"total={self.total}, device={self.n_dev}, host={self.host_len}, sinks={self.sinks}, "
                f"gpu_budget={self.gpu_budget})")
