"""The hybrid KV cache of one FlexGen attention layer and GPU batch: FlexGen's layout translated
onto the decode engine (:mod:`hybridgen.engine`).

FlexGen keeps a layer's cache as a pair of ``(s, b*n_head, head_dim)`` float16 tensors and hands
it to ``TorchDevice.mha_gen`` as ``k_cache``/``v_cache``. With the drop-in, the layer's cache home
holds a :class:`FlexGenLayerCache` instead, and the patched ``mha_gen`` recognises it. Its tokens
live in a :class:`~hybridgen.engine.DeviceTier` over a one-layer host store, exactly as a
transformers layer's do: the same placement, chunked (on a GPU asynchronous) eviction, pinned
store and policies.

FlexGen writes a step's new key/value after attention (``store_cache``); the drop-in commits it
when attention runs (the engine attends over committed tokens), so ``store_cache`` only places
the prompt.
"""

from __future__ import annotations

import torch

from ..engine import DeviceTier, ModelInfo, make_store

__all__ = ["FlexGenLayerCache"]


def _heads(x: torch.Tensor, batch: int, n_head: int) -> torch.Tensor:
    """FlexGen's ``(s, b*n_head, d)`` as hybridgen's ``[b, n_head, s, d]`` (a view)."""
    s, _, d = x.shape
    return x.view(s, batch, n_head, d).permute(1, 2, 0, 3)


class FlexGenLayerCache:
    """The tokens of one FlexGen layer and GPU batch (see the module docstring).

    Args:
        session: the patch's shared :class:`~hybridgen.flexgen.session.Session` (policy, clock).
        layer_id: FlexGen's layer index (for telemetry).
        batch, n_head, head_dim: the cache's shape (FlexGen's GPU batch size, OPT's heads).
        max_tokens: the sequence length FlexGen's task can reach (``prompt_len + gen_len``).
        sinks, gpu_budget: FlexGen's token split (:func:`hybridgen.flexgen.compat.placement`); the
            session's policy decides the placement from them.
        layers: the model's layer count.
        device: where FlexGen computes (the store is pinned for a CUDA device).
        share: how many such caches split the config's host tier capacities.
    """

    def __init__(self, session, layer_id: int, *, batch: int, n_head: int, head_dim: int, max_tokens: int,
                 sinks: int, gpu_budget: int, layers: int = 1, device=None, share: int = 1,
                 dtype: torch.dtype = torch.float16):
        self.session = session
        self.layer_id = layer_id
        self.batch, self.n_head, self.head_dim = batch, n_head, head_dim
        info = ModelInfo("opt", layers, n_head, n_head, head_dim, max_tokens)
        _, placement = session.policy_for(info, sinks, gpu_budget)
        store = make_store(
            session.config, layers=1, batch=batch, kv_heads=n_head, head_dim=head_dim, dtype=dtype,
            max_tokens=max_tokens, sinks=placement.sinks, device=torch.device(device or "cpu"),
            to_host=placement.recent is not None, share=share,
        )
        self.tier = DeviceTier(store, 0, placement)

    # --- shape of the tiers -------------------------------------------------------------------
    @property
    def store(self):
        return self.tier.store

    @property
    def total(self) -> int:
        return self.tier.total

    @property
    def n_dev(self) -> int:
        return self.tier.device_tokens()

    @property
    def sinks_on_device(self) -> int:
        return self.tier.sinks_on_device

    @property
    def host_len(self) -> int:
        return self.tier.host_tokens

    def device_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device tier's keys and values ``[b, n_head, n_dev, d]`` (views, sinks first)."""
        return self.tier.keys, self.tier.values

    # --- placing tokens -----------------------------------------------------------------------
    def place_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Places the prompt's keys/values ``(s, b*n_head, d)`` (FlexGen's prefill output): the
        sinks and the most recent tokens on the device, the rest on the host."""
        if self.tier.total:
            raise RuntimeError(f"layer {self.layer_id}: the prompt was already placed (a new generate() makes new caches)")
        self.tier.append(_heads(k, self.batch, self.n_head), _heads(v, self.batch, self.n_head))
        self.tier.evict_overflow(force=True)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commits a decode step's keys/values ``[b, n_head, m, d]``; call :meth:`evict_overflow`
        once attention has read them."""
        if self.tier.keys is None:
            raise RuntimeError(f"layer {self.layer_id}: a decode token arrived before the prompt was placed")
        self.tier.append(k, v)

    def evict_overflow(self) -> None:
        self.tier.evict_overflow()

    def evict(self, m: int) -> None:
        """Moves the ``m`` oldest non-sink device tokens to the host store."""
        self.tier.evict(m, asynchronous=False)

    def keep(self, mask: torch.Tensor) -> torch.Tensor:
        """FlexGen's attention mask ``(b, total)`` (True = attend; left padding), checked."""
        if mask.shape[1] != self.tier.total:
            raise RuntimeError(
                f"layer {self.layer_id}: the attention mask covers {mask.shape[1]} tokens but the cache holds "
                f"{self.tier.total}: FlexGen's store_cache and mha_gen ran out of step"
            )
        return mask

    # --- FlexGen's cache protocol -------------------------------------------------------------
    def delete(self) -> None:
        """Frees both tiers (FlexGen's ``delete_cache`` calls this at the end of ``generate``) and
        closes the session's step in progress: the generation is over."""
        self.session.finish_step()
        self.tier.reset()
        self.tier.store.reset()

    def __repr__(self) -> str:
        p = self.tier.placement
        return (f"FlexGenLayerCache(layer={self.layer_id}, batch={self.batch}, n_head={self.n_head}, "
                f"head_dim={self.head_dim}, total={self.total}, device={self.n_dev}, host={self.host_len}, "
                f"sinks={p.sinks}, gpu_budget={p.recent})")
