"""Freeing a request's paged-cache blocks between its sinks and its recent window.

Hybrid attention reads a request's middle tokens from the host store (the plugin copies every
K/V row as vLLM writes it, :mod:`hybridgen.vllm.window`), so the blocks that held them are dead
weight in vLLM's pool. Freeing them is what lets more long requests run at once on one GPU, and
a request longer than the whole pool run at all. vLLM's route for that (the way its R-SWA
manager frees a middle gap and its sliding-window manager caps admission):

- the backend's ``customize_spec`` turns each layer's :class:`FullAttentionSpec` into a
  :class:`HybridAttentionSpec` (with the sinks, the window the plugin keeps and the tokens in
  flight) when hybrid attention serves every layer of the engine (:func:`freeing_spec`);
- vLLM's registry gives that spec :class:`HybridAttentionManager`, whose ``remove_skipped_blocks``
  (called by the scheduler before each allocation, on the tokens whose step has finished)
  replaces the blocks wholly inside ``[sinks, processed - window)`` by vLLM's null block and
  returns them to the pool.

Which requests free blocks, and when:

- a request that the pool can hold whole keeps vLLM's prefill (its chunks read every earlier
  block) and frees its middle blocks once its prompt is computed; its decode rows are hybrid;
- a request longer than the whole pool is *streamed*: admitted for the blocks it holds at most
  at once (:meth:`HybridAttentionSpec.streamed_blocks`), its blocks freed while its prompt is
  computed, its later prompt chunks served by hybrid attention as well
  (:meth:`hybridgen.vllm.runtime.Runtime.prefill`);
- held back (never freed): a request whose first tokens came from vLLM's prefix cache or a
  connector (the worker takes vLLM's own attention for it), and a request resumed after a
  preemption that is not streamed (its recomputation prefills past the prompt in chunks that
  read every block).

vLLM's worker only ever appends to a request's block table, so a freed block's id stays there
(and may by then hold another request's tokens). The connector therefore tells the worker, each
step, which scheduled requests have freed blocks, and the worker refuses, loudly, to let vLLM's
attention serve any row of such a request (:meth:`hybridgen.vllm.runtime.Runtime.check_stock_rows`).

The host copy is fenced before a freed block can be reused: the rows are copied into the
windows in ``do_kv_cache_update`` of the step that writes them (synchronously on the CPU
platform), and a block is freed only after the step that wrote its last row has finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional

import torch
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .settings import CONNECTOR, load_config

__all__ = [
    "HybridAttentionManager",
    "HybridAttentionSpec",
    "counters",
    "forget",
    "freeable_blocks",
    "freeing_spec",
    "hold",
    "register",
    "unsupported",
]

log = logging.getLogger("vllm.plugins.hybridgen")

#: KV cache dtypes hybrid attention serves.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Requests (ids) whose blocks stay, in the scheduler's process: prefix-cache hits and resumed
# requests. Filled by the manager and the connector, emptied when the request finishes.
_held: set[str] = set()
#: What the managers of this (scheduler's) process did: blocks freed, summed over KV cache groups.
counters = {"blocks_freed": 0, "requests_held": 0, "streamed_blocks_freed": 0}
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
    """Full attention whose middle blocks are freed once hybrid attention serves them from the host."""

    #: Leading tokens that stay on the device (hybridgen's ``sinks``).
    sinks: int
    #: Most recent tokens whose blocks stay: the window the plugin keeps on the device
    #: (``gpu_budget``) plus one eviction chunk (``evict_chunk``).
    window: int
    #: Tokens scheduled but not yet processed, at most (vLLM's ``max_in_flight_tokens``: one
    #: batch per step in flight): blocks are freed behind the processed tokens only.
    in_flight: int

    @property
    def first_freeable(self) -> int:
        """The index of a request's first block that may be freed (the first after its sinks'):
        a request with freed blocks has vLLM's null block there."""
        return -(-self.sinks // self.block_size)

    def streamed_blocks(self, max_model_len: int) -> int:
        """The most blocks a streamed request holds at once: its sinks' blocks, the window and
        the tokens in flight (one more: the window need not start on a block boundary), never
        more than a request of ``max_model_len`` tokens."""
        bs = self.block_size
        held = self.first_freeable + -(-(self.window + self.in_flight) // bs) + 1
        return min(held, -(-max_model_len // bs))

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # vLLM starts only if its pool holds one request of max_model_len: a streamed request
        # holds far fewer blocks, so a max_model_len beyond the pool is served.
        return self.streamed_blocks(vllm_config.model_config.max_model_len) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list["HybridAttentionSpec"]) -> "HybridAttentionSpec":
        kept = {(s.sinks, s.window, s.in_flight) for s in specs}
        if len(kept) != 1:
            raise ValueError(f"hybridgen: layers of one KV cache group keep different sinks/windows: {sorted(kept)}")
        base = FullAttentionSpec.merge(specs)
        sinks, window, in_flight = kept.pop()
        values = {f.name: getattr(base, f.name) for f in fields(FullAttentionSpec)}
        return cls(**values, sinks=sinks, window=window, in_flight=in_flight)


def freeable_blocks(
    *, sinks: int, window: int, block_size: int, processed: int, prompt: Optional[int], streamed: bool = False
) -> tuple[int, int]:
    """``(first, end)``: the block indices of a request that may be freed, ``first <= i < end``
    (empty when ``end <= first``). Blocks wholly after the sinks and wholly before the last
    ``window`` processed tokens. Unless the request is ``streamed``, nothing before its prompt
    is processed (vLLM's attention serves its prompt chunks, reading every block) or when the
    prompt length is unknown."""
    if not streamed and (prompt is None or processed < prompt):
        return 0, 0
    first = -(-sinks // block_size)
    return first, max(first, (processed - window) // block_size)


class HybridAttentionManager(FullAttentionManager):
    """vLLM's full-attention manager that frees a request's middle blocks (see the module).

    A request longer than the whole pool is *streamed*: admitted for the blocks it holds at
    most at once (:meth:`HybridAttentionSpec.streamed_blocks`, as vLLM's sliding-window manager
    admits), its blocks freed while its prompt is computed, its prompt chunks then served by
    hybrid attention too (:meth:`hybridgen.vllm.runtime.Runtime.prefill`). Any other request
    keeps vLLM's prefill and frees its blocks once its prompt is computed.
    """

    def __init__(self, kv_cache_spec: HybridAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sinks, self.window = kv_cache_spec.sinks, kv_cache_spec.window
        self.streamed_blocks = kv_cache_spec.streamed_blocks(1 << 62)
        # Requests longer than this many tokens cannot be held whole by the pool (one block is
        # vLLM's null block): they stream.
        self.stream_above = (self.block_pool.num_gpu_blocks - 1) * self.block_size
        self._streamed: set[str] = set()

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        if apply_admission_cap and request_id not in self.num_cached_block:  # (re)admission
            fresh = not new_computed_blocks and not num_local_computed_tokens
            if num_tokens > self.stream_above and fresh:
                self._streamed.add(request_id)
            else:
                self._streamed.discard(request_id)
        cap = self.max_admission_blocks_per_request
        if request_id in self._streamed:
            self.max_admission_blocks_per_request = self.streamed_blocks
        try:
            return super().get_num_blocks_to_allocate(
                request_id,
                num_tokens,
                new_computed_blocks,
                total_computed_tokens,
                num_local_computed_tokens,
                num_tokens_main_model,
                apply_admission_cap=apply_admission_cap,
                prefill_end=prefill_end,
            )
        finally:
            self.max_admission_blocks_per_request = cap

    def pop_blocks_for_free(self, request_id: str):
        self._streamed.discard(request_id)  # finished or preempted: decided again if it returns
        return super().pop_blocks_for_free(request_id)

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
        streamed = request_id in self._streamed
        if request_id in _held and not streamed:  # a streamed request's chunks are hybrid anyway
            return
        first, end = freeable_blocks(
            sinks=self.sinks,
            window=self.window,
            block_size=self.block_size,
            processed=processed_computed_tokens,
            prompt=num_prompt_tokens,
            streamed=streamed,
        )
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return
        end = min(end, len(blocks))
        # The freed blocks run up from `first`: only those above the highest one are new, so
        # this step costs what it frees, not the request's length (it runs for every request
        # at every scheduling step).
        top = end
        while top > first and blocks[top - 1] is not self._null_block:
            top -= 1
        freed = end - top
        if not freed:
            return
        self._remove_blocks_in_range(request_id, top, end)
        counters["blocks_freed"] += freed
        if streamed:
            counters["streamed_blocks_freed"] += freed


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
    c, _ = load_config()
    values = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
    sched = config.scheduler_config
    in_flight = getattr(config, "max_in_flight_tokens", None) or sched.max_num_batched_tokens
    return HybridAttentionSpec(**values, sinks=c.sinks, window=c.gpu_budget + c.evict_chunk, in_flight=in_flight)


def unsupported(vllm_config, spec) -> str:
    """Why hybrid attention cannot serve this engine's layers of KV cache ``spec``, or ``""``."""
    if type(spec) not in (FullAttentionSpec, HybridAttentionSpec):
        return f"KV cache spec {type(spec).__name__} (only full attention is served)"
    if spec.dtype not in _DTYPES:
        return f"KV cache dtype {spec.dtype} (served: {_DTYPES})"
    if vllm_config.speculative_config is not None:
        return "speculative decoding"
    return ""


def keeps_blocks(vllm_config, spec) -> str:
    """Why the blocks of this engine's requests cannot be freed, or ``""``."""
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
