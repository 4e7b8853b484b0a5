"""The host store of a cache, sized and (on CUDA) page-locked the same way for every integration."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import HybridConfig
from ..host_store import HostKVStore

__all__ = ["make_store"]


def make_store(
    config: HybridConfig,
    *,
    layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    max_tokens: int,
    sinks: int,
    device: torch.device,
    to_host: bool,
) -> HostKVStore:
    """A :class:`HostKVStore` for ``layers`` layers of ``max_tokens`` tokens per sequence.

    Tier capacities default to room for every token in each tier. The store is pinned
    (registered page-locked) when the model is on CUDA and the policy moves tokens to the host
    (``to_host``), or when ``config.pin_host`` says so.
    """
    max_tokens = max(int(max_tokens), 1)
    token_bytes = batch * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    room = layers * max_tokens * token_bytes
    store = HostKVStore(
        layers,
        batch,
        kv_heads,
        head_dim,
        dtype,
        sinks=sinks,
        near_capacity_bytes=config.near_capacity_bytes or room,
        far_capacity_bytes=config.far_capacity_bytes or 2 * room,
        near_node=config.near_node,
        far_node=config.far_node,
        max_host_tokens=max_tokens,
    )
    if config.pin_host or (config.pin_host is None and device.type == "cuda" and to_host):
        from ..cuda import kernel_cache_dir, require

        require("pin_host", device, compiler=False)
        index: Optional[int] = device.index if device.index is not None else torch.cuda.current_device()
        store.pin(index, kernel_cache_dir())
    return store
