"""Request lifecycle for the plugin: a vLLM KV connector that tells the worker, each step, which
request is which row and which requests finished.

vLLM's attention metadata describes a batch by position only (query offsets, sequence lengths,
block tables); request ids and finished or aborted requests are the scheduler's. A KV connector
is vLLM's documented route between the two: its scheduler side builds per-step metadata from the
scheduler's output, its worker side receives it before the model runs. This one moves no KV:

- scheduler side (:meth:`HybridgenConnector.build_connector_meta`): for every scheduled request,
  the paged-cache slot its first new token is written to (a slot being written belongs to one
  request, prefix caching or not), whether some of its blocks were freed, and the ids of the
  requests that finished or were aborted;
- worker side (:meth:`HybridgenConnector.bind_connector_metadata`): hands both to the
  :class:`~hybridgen.vllm.runtime.Runtime`, which maps batch rows to requests by that slot and
  releases the finished requests' host slots (in a single-process engine with synchronous
  scheduling, :meth:`HybridgenConnector.request_finished` releases them as they finish).

While ``HYBRIDGEN_CONFIG`` is set the plugin makes it vLLM's default connector
(:mod:`hybridgen.vllm.plugin`); otherwise enable it with
``LLM(..., kv_transfer_config=hybridgen.vllm.kv_transfer_config())``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import blocks
from . import runtime as _runtime

if TYPE_CHECKING:  # pragma: no cover
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["HybridgenConnector", "HybridgenConnectorMetadata"]

#: The id of vLLM's null block, which stands in for a freed block in a request's block list (the
#: first block of vLLM's pool, never handed to a request).
NULL_BLOCK = 0


@dataclass
class HybridgenConnectorMetadata(KVConnectorMetadata):
    #: Paged-cache slot of each scheduled request's first new token → request id.
    owners: dict[int, str] = field(default_factory=dict)
    #: Requests that finished or were aborted since the previous step.
    finished: frozenset = frozenset()
    #: Scheduled requests some of whose blocks were freed (hybridgen.vllm.blocks).
    blocks_freed: frozenset = frozenset()


class HybridgenConnector(KVConnectorBase_V1):
    """Tells hybridgen's runtime which request each batch row is, and which requests ended."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        # The scheduler's block size of the first KV cache group (the attention layers').
        self._block_size = groups[0].kv_cache_spec.block_size if groups else vllm_config.cache_config.block_size
        # Where a request's freed blocks begin, when this engine frees blocks at all.
        spec = groups[0].kv_cache_spec if groups else None
        self._first_freeable = spec.first_freeable if isinstance(spec, blocks.HybridAttentionSpec) else None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # nothing is handed off: a preempted request is simply recomputed

    # --- scheduler side ---------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request, new_blocks, num_external_tokens: int) -> None:
        if request.num_preemptions > 0:
            # Resumed after a preemption: its recomputation prefills past the prompt in chunks
            # that read every block, so none is freed (hybridgen.vllm.blocks).
            blocks.hold(request.request_id)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, None]:
        blocks.forget(request.request_id)
        # The worker releases the request's slot when the next step's metadata arrives; a serving
        # engine runs that step at once (it steps while finished requests are pending), but vLLM's
        # in-process LLM class stops stepping when its last request finishes. When the worker's
        # runtime lives in this process for this engine and steps are synchronous (nothing of
        # this request can still be running), release now.
        rt = _runtime.current()
        if (
            rt is not None
            and rt.engine_id == self._kv_transfer_config.engine_id
            and not self._vllm_config.scheduler_config.async_scheduling
        ):
            rt.release(request.request_id)
        return False, None

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> HybridgenConnectorMetadata:
        first_pos = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        first_pos.update(zip(cached.req_ids, cached.num_computed_tokens))
        owners: dict[int, str] = {}
        freed = []
        size = self._block_size
        manager = self._kv_cache_manager
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            pos = first_pos.get(req_id)
            if not n or pos is None or manager is None:
                continue
            ids = manager.get_block_ids(req_id)[0]
            if pos // size < len(ids):
                owners[ids[pos // size] * size + pos % size] = req_id
            first = self._first_freeable
            if first is not None and first < len(ids) and ids[first] == NULL_BLOCK:
                freed.append(req_id)
        return HybridgenConnectorMetadata(
            owners=owners, finished=frozenset(scheduler_output.finished_req_ids), blocks_freed=frozenset(freed)
        )

    # --- worker side ------------------------------------------------------------------------------
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        rt = _runtime.current()
        if rt is not None and isinstance(connector_metadata, HybridgenConnectorMetadata):
            rt.begin_step(connector_metadata.owners, connector_metadata.finished, connector_metadata.blocks_freed)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        rt = _runtime.current()
        if rt is not None:
            rt.end_step()

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None
