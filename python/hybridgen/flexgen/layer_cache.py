"""The hybrid KV cache of one FlexGen attention layer and GPU batch: FlexGen's layout translated
onto the decode engine (:mod:`hybridgen.engine`).

FlexGen keeps a layer's cache as a pair of ``(s, b*n_head, head_dim)`` float16 tensors and hands
it to ``TorchDevice.mha_gen`` as ``k_cache``/``v_cache``. With the drop-in, the layer's cache home
holds a :class:`FlexGenLayerCache` instead, and the patched ``mha_gen`` recognises it. Its tokens
are one tier of the session's :class:`~hybridgen.engine.Engine`, exactly as a transformers
layer's are: the same placement, chunked (on a GPU asynchronous) eviction, pinned store, policies
and step clock.

FlexGen writes a step's new key/value after attention (``store_cache``); the drop-in commits it
when attention runs (the engine attends over committed tokens), so ``store_cache`` only places
the prompt.
"""

from __future__ import annotations

import torch

from ..engine import ModelInfo

__all__ = ["FlexGenLayerCache"]


def _heads(x: torch.Tensor, batch: int, n_head: int) -> torch.Tensor:
    """FlexGen's ``(s, b*n_head, d)`` as hybridgen's ``[b, n_head, s, d]`` (a view)."""
    s, _, d = x.shape
    return x.view(s, batch, n_head, d).permute(1, 2, 0, 3)


class FlexGenLayerCache:
    """The tokens of one FlexGen layer and GPU batch (see the module docstring).

    Args:
        session: the patch's shared :class:`~hybridgen.flexgen.session.Session` (its engine).
        layer_id: FlexGen's layer index (for telemetry).
        batch, n_head, head_dim: the cache's shape (FlexGen's GPU batch size, OPT's heads).
        max_tokens: the sequence length FlexGen's task can reach (``prompt_len + gen_len``).
        sinks, gpu_budget: FlexGen's token split (:func:`hybridgen.flexgen.compat.placement`); the
            session's policy decides the placement from them.
        layers, gpu_batches: the model's layer count and FlexGen's GPU batches per step.
        device: where FlexGen computes (the store is pinned for a CUDA device).
    """

    def __init__(
        self,
        session,
        layer_id: int,
        *,
        batch: int,
        n_head: int,
        head_dim: int,
        max_tokens: int,
        sinks: int,
        gpu_budget: int,
        layers: int = 1,
        gpu_batches: int = 1,
        device=None,
        dtype: torch.dtype = torch.float16,
    ):
        self.session = session
        self.layer_id = layer_id
        self.batch, self.n_head, self.head_dim = batch, n_head, head_dim
        info = ModelInfo("opt", layers, n_head, n_head, head_dim, max_tokens)
        self.engine, self.index = session.tier_for(
            layer_id,
            info=info,
            sinks=sinks,
            gpu_budget=gpu_budget,
            gpu_batches=gpu_batches,
            batch=batch,
            max_tokens=max_tokens,
            device=device,
            dtype=dtype,
        )
        self.tier = self.engine.tiers[self.index]

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

    def read_host(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the host tier's keys and values ``[b, n_head, host_len, d]``."""
        self.tier.settle()
        return self.store.read(self.index, 0, self.host_len)

    # --- placing tokens -----------------------------------------------------------------------
    def place_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Places the prompt's keys/values ``(s, b*n_head, d)`` (FlexGen's prefill output): the
        sinks and the most recent tokens on the device, the rest on the host."""
        if self.tier.total:
            raise RuntimeError(
                f"layer {self.layer_id}: the prompt was already placed (a new generate() makes new caches)"
            )
        self.engine.place(
            self.index, _heads(k, self.batch, self.n_head), _heads(v, self.batch, self.n_head), prompt=True
        )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commits a decode step's keys/values ``[b, n_head, m, d]`` (the engine's step moves the
        overflow to the host after attention has read them)."""
        if self.tier.keys is None:
            raise RuntimeError(f"layer {self.layer_id}: a decode token arrived before the prompt was placed")
        self.engine.place(self.index, k, v)

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
        """Frees the tier (FlexGen's ``delete_cache`` calls this at the end of ``generate``) and
        closes the step in progress: the generation is over. The host store returns its memory
        once every tier is empty."""
        self.session.finish_step()
        self.tier.reset()
        if all(t.total == 0 for t in self.engine.tiers):
            self.engine.store.reset()

    def __repr__(self) -> str:
        p = self.tier.placement
        return (
            f"FlexGenLayerCache(layer={self.layer_id}, batch={self.batch}, n_head={self.n_head}, "
            f"head_dim={self.head_dim}, total={self.total}, device={self.n_dev}, host={self.host_len}, "
            f"sinks={p.sinks}, gpu_budget={p.recent})"
        )
