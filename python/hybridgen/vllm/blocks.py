"""Freeing a request's paged-cache blocks between its sinks and its recent window.

Once a request's prompt is computed, hybrid decode reads its middle tokens from the host store
(the plugin copies every K/V row as vLLM writes it, :mod:`hybridgen.vllm.window`), so the blocks
that held them are dead weight in vLLM's pool. Freeing them is what lets more long requests run
at once on one GPU. vLLM's route for that (the way its R-SWA manager frees a middle gap):

- the backend's ``customize_spec`` turns each layer's :class:`FullAttentionSpec` into a
  :class:`HybridAttentionSpec` (with the sinks and the window the plugin keeps) when hybrid decode
  serves every layer of the engine (:func:`freeing_spec`);
- vLLM's registry gives that spec :class:`HybridAttentionManager`, whose ``remove_skipped_blocks``
  (called by the scheduler before each allocation, on the tokens whose step has finished)
  replaces the blocks wholly inside ``[sinks, processed - window)`` by vLLM's null block and
  returns them to the pool.

A block is freed only for a request whose rows the plugin has recorded from position 0 and whose
remaining steps are single-token decode rows, the rows hybrid decode serves without the paged
cache. Held back (never freed): a request whose first tokens came from vLLM's prefix cache or a
connector (the worker takes vLLM's own attention for it), and a request resumed after a
preemption (its recomputation prefills past the prompt in chunks that read every block). The
worker also refuses, loudly, to let vLLM's attention read a row whose block table holds a freed
block (:meth:`hybridgen.vllm.runtime.Runtime.check_stock_rows`).

The host copy is fenced before a freed block can be reused: the rows are copied into the
windows in ``do_kv_cache_update`` of the step that writes them (synchronously on the CPU
platform), and a block is freed only after the step that wrote its last row has finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

__all__ = [
    "HybridAttentionManager",
    "HybridAttentionSpec",
    "counters",
    "forget",
    "freeable_blocks",
    "freeing_spec",
    "hold",
    "register",
]

log = logging.getLogger("vllm.plugins.hybridgen")

# Requests (ids) whose blocks stay, in the scheduler's process: prefix-cache hits and resumed
# requests. Filled by the manager and the connector, emptied when the request finishes.
_held: set[str] = set()
#: What the managers of this (scheduler's) process did: blocks freed, summed over KV cache groups.
counters = {"blocks_freed": 0, "requests_held": 0}
# The model built in this process: its vLLM configuration, and why hybrid decode does not serve
# some of its layers. The attention implementations report both as vLLM makes them (under the
# model's configuration, which is no longer current when vLLM later asks for the KV cache specs).
_model: dict = {"config": None}
_layers_off: list[str] = []


def hold(req_id: str) -> None:
    """Keeps every block of ``req_id`` until it finishes."""
    if req_id not in _held:
        _held.add(req_id)
        counters["requests_held"] += 1


def forget(req_id: str) -> None:
    """``req_id`` finished: nothing to hold for it any more."""
    _held.discard(req_id)


def layer_made(off: str) -> None:
    """vLLM made an attention implementation of the model in this process; ``off`` says why
    hybrid decode does not serve its layer (``""``: it does). One layer off keeps the blocks of
    every layer (one decision per engine)."""
    config = _current_vllm_config()
    if config is not _model["config"]:  # a new model in this process: start over
        _model["config"] = config
        _layers_off.clear()
    if off:
        _layers_off.append(off)


@dataclass(frozen=True, kw_only=True)
class HybridAttentionSpec(FullAttentionSpec):
    """Full attention whose middle blocks are freed once hybrid decode serves them from the host."""

    #: Leading tokens that stay on the device (hybridgen's ``sinks``).
    sinks: int
    #: Most recent tokens whose blocks stay: the window the plugin keeps on the device
    #: (``gpu_budget``) plus one eviction chunk (``evict_chunk``).
    window: int

    @classmethod
    def merge(cls, specs: list["HybridAttentionSpec"]) -> "HybridAttentionSpec":
        kept = {(s.sinks, s.window) for s in specs}
        if len(kept) != 1:
            raise ValueError(f"hybridgen: layers of one KV cache group keep different sinks/windows: {sorted(kept)}")
        base = FullAttentionSpec.merge(specs)
        sinks, window = kept.pop()
        return cls(**{f.name: getattr(base, f.name) for f in fields(FullAttentionSpec)}, sinks=sinks, window=window)


def freeable_blocks(
    *, sinks: int, window: int, block_size: int, processed: int, prompt: Optional[int]
) -> tuple[int, int]:
    """``(first, end)``: the block indices of a request that may be freed, ``first <= i < end``
    (empty when ``end <= first``). Blocks wholly after the sinks and wholly before the last
    ``window`` processed tokens; nothing before the prompt is processed (its chunks read every
    block) or when the prompt length is unknown."""
    if prompt is None or processed < prompt:
        return 0, 0
    first = -(-sinks // block_size)
    return first, max(first, (processed - window) // block_size)


class HybridAttentionManager(FullAttentionManager):
    """vLLM's full-attention manager that frees a request's middle blocks (see the module)."""

    def __init__(self, kv_cache_spec: HybridAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sinks, self.window = kv_cache_spec.sinks, kv_cache_spec.window

    def add_local_computed_blocks(
        self, request_id, new_computed_blocks, num_local_computed_tokens: int, num_external_computed_tokens: int
    ) -> None:
        super().add_local_computed_blocks(
            request_id, new_computed_blocks, num_local_computed_tokens, num_external_computed_tokens
        )
        if num_local_computed_tokens or num_external_computed_tokens:
            hold(request_id)  # the worker never saw these tokens: vLLM's attention serves it

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: Optional[int] = None
    ) -> None:
        if request_id in _held:
            return
        first, end = freeable_blocks(
            sinks=self.sinks,
            window=self.window,
            block_size=self.block_size,
            processed=processed_computed_tokens,
            prompt=num_prompt_tokens,
        )
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return
        end = min(end, len(blocks))
        if end <= first:
            return
        before = sum(b is self._null_block for b in blocks[first:end])
        self._remove_blocks_in_range(request_id, first, end)
        counters["blocks_freed"] += sum(b is self._null_block for b in blocks[first:end]) - before


def freeing_spec(spec, vllm_config=None):
    """``spec`` as a :class:`HybridAttentionSpec` when this engine's hybrid decode serves every
    layer (:func:`frees_blocks`), else ``spec`` unchanged."""
    if type(spec) is not FullAttentionSpec:
        return spec
    config = vllm_config if vllm_config is not None else (_current_vllm_config() or _model["config"])
    why = keeps_blocks(config, spec)
    if why:
        log.info("hybridgen: vLLM keeps every KV block of each request: %s", why)
        return spec
    from .settings import load_config

    c, _ = load_config()
    values = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
    return HybridAttentionSpec(**values, sinks=c.sinks, window=c.gpu_budget + c.evict_chunk)


def keeps_blocks(vllm_config, spec) -> str:
    """Why the blocks of this engine's requests cannot be freed, or ``""``."""
    from .backend import unsupported
    from .plugin import CONNECTOR

    if vllm_config is None:
        return "no vLLM configuration is current"
    kv = vllm_config.kv_transfer_config
    if kv is None or kv.kv_connector != CONNECTOR:
        return "hybrid decode is off (no hybridgen connector)"
    why = unsupported(vllm_config, spec)
    if why:
        return why
    if _layers_off:
        return f"a layer takes vLLM's own attention ({_layers_off[0]})"
    return ""


def _current_vllm_config():
    from vllm.config import get_current_vllm_config_or_none

    return get_current_vllm_config_or_none()


def register() -> None:
    """Gives :class:`HybridAttentionSpec` its manager in vLLM's registry (grouped with full
    attention, like vLLM's own R-SWA spec). vLLM registers its built-in specs only into an
    empty registry, so they go in first."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(HybridAttentionSpec, HybridAttentionManager, uniform_type_base_spec=FullAttentionSpec)
