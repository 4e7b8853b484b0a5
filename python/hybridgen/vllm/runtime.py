"""The plugin's state in one vLLM worker: the host store, each request's slot and device windows,
and hybrid decode over a vLLM batch. Plain torch and hybridgen only (no vLLM import): the vLLM
classes in :mod:`hybridgen.vllm.backend` and :mod:`hybridgen.vllm.connector` translate into it.

A step, as vLLM runs it:

1. the metadata builder describes the batch row by row (:meth:`Runtime.plan`: where each row's
   tokens are, their first position, the paged-cache slot of the first new token);
2. the connector hands over what the scheduler decided (:meth:`Runtime.begin_step`): which
   request writes which cache slot this step, and which requests finished or were aborted (their
   host slots are released at once);
3. each layer's ``do_kv_cache_update`` (:meth:`Runtime.record`) copies the new K/V rows of every
   tracked request into its windows; rows that leave a window go to the host store;
4. each layer's ``forward`` (:meth:`Runtime.decode`) computes, for every decode row whose request
   has host tokens, attention over the device rows (torch) and over the host rows (the CPU stage,
   per slot), merged by log-sum-exp; every other row takes vLLM's own path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from .._native import CapacityError
from ..attention import device_partial
from ..config import HybridConfig
from ..engine.store import make_store
from ..ops import merge_partials
from .window import Window

__all__ = ["Request", "Runtime", "StepPlan", "current", "stats"]

log = logging.getLogger("vllm.plugins.hybridgen")


@dataclass
class Request:
    """One vLLM request as the plugin tracks it."""

    req_id: str
    #: Host store slot, or ``None``: untracked (its rows take vLLM's own path for its lifetime).
    slot: Optional[int]
    windows: list = field(default_factory=list)
    #: Tokens the plugin has seen (device + host), after the current step.
    total: int = 0
    why_untracked: str = ""


@dataclass
class StepPlan:
    """One forward pass's batch, row by row (CPU lists, built once and shared by every layer)."""

    runtime: "Runtime"
    starts: list[int]
    ends: list[int]
    first_pos: list[int]
    first_slot: list[int]
    #: Per row, after :meth:`Runtime.resolve`: the tracked request, or ``None``.
    requests: Optional[list] = None

    @property
    def num_rows(self) -> int:
        return len(self.starts)


class Runtime:
    """Host store, request slots and hybrid decode for the attention layers of one model.

    Args:
        config: the hybrid configuration (``policy`` ``all`` or ``post_qkt``, ``merge`` ``lse``).
        layer_names: vLLM's attention layer names, in model order (host store layer = index).
        kv_heads, head_dim, dtype: the KV cache's shape and element type.
        max_requests: requests that may run at once (host store slots).
        max_tokens: tokens per request (the host store reserves address space for them).
        engine_id: the vLLM engine served (lets a connector in the same process find it).
    """

    def __init__(
        self,
        config: HybridConfig,
        layer_names: Sequence[str],
        *,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        max_requests: int,
        max_tokens: int,
        engine_id: Optional[str] = None,
    ):
        self.config = config
        #: The vLLM engine the runtime serves (its KV transfer engine id), if known.
        self.engine_id = engine_id
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.store = make_store(
            config,
            layers=len(layer_names),
            batch=max_requests,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            max_tokens=max_tokens,
            sinks=config.sinks,
            device=torch.device("cpu"),
            to_host=True,
        )
        for slot in list(self.store.active_slots):  # a new store has every slot in use
            self.store.release_slot(slot)
        self.requests: dict[str, Request] = {}
        # Which request writes which paged-cache slot this step (set by the connector; None when
        # no scheduler step is bound, e.g. vLLM's warm-up runs: every row then takes the stock path).
        self._owners: Optional[dict[int, str]] = None
        self._lock = threading.RLock()
        #: Counts of what ran (read with :func:`stats`; the tests check them).
        self.counters = {
            "steps": 0,
            "hybrid_calls": 0,  # (layer, step) pairs that ran hybrid decode
            "hybrid_rows": 0,  # decode rows served by hybrid attention (summed over layers)
            "host_tokens_read": 0,  # host tokens attended to (summed over rows and layers)
            "stock_rows": 0,  # rows left to vLLM's own attention (summed over layers)
            "slots_added": 0,
            "slots_released": 0,
            "untracked": 0,
        }

    # --- requests ---------------------------------------------------------------------------------
    def begin_step(self, owners: dict[int, str], finished: Iterable[str]) -> None:
        """The scheduler's view of the step: ``owners`` maps the paged-cache slot of each scheduled
        request's first new token to its id; ``finished`` requests (done or aborted) give their
        host slots back."""
        for req_id in finished:
            self.release(req_id)
        self._owners = dict(owners)
        self.counters["steps"] += 1

    def end_step(self) -> None:
        self._owners = None

    def release(self, req_id: str) -> None:
        """Forgets ``req_id`` and gives its host slot back (no-op for an unknown id)."""
        with self._lock:
            req = self.requests.pop(req_id, None)
            if req is not None and req.slot is not None:
                self.store.release_slot(req.slot)
                self.counters["slots_released"] += 1

    @property
    def active_requests(self) -> dict[str, Optional[int]]:
        """``{req_id: slot}`` of the requests the plugin tracks now (slot ``None``: untracked)."""
        return {r.req_id: r.slot for r in self.requests.values()}

    def _untrack(self, req: Request, why: str) -> None:
        if req.slot is not None:
            self.store.release_slot(req.slot)
            self.counters["slots_released"] += 1
        req.slot, req.windows, req.why_untracked = None, [], why
        self.counters["untracked"] += 1
        log.info("hybridgen: request %s takes vLLM's own attention: %s", req.req_id, why)

    def _start(self, req: Request) -> None:
        """A fresh slot and empty windows for ``req`` (its first tokens, or a recomputation)."""
        if req.slot is not None:
            self.store.reset_slot(req.slot)
        else:
            try:
                req.slot = self.store.add_slot()
            except CapacityError:
                self._untrack(req, "every host store slot is in use")
                return
            self.counters["slots_added"] += 1
        c = self.config
        req.windows = [
            Window(self.store, layer, req.slot, sinks=c.sinks, recent=c.gpu_budget, chunk=c.evict_chunk)
            for layer in range(len(self.layer_index))
        ]
        req.total = 0

    # --- one step -----------------------------------------------------------------------------
    def plan(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor) -> StepPlan:
        """The batch of one forward pass (CPU tensors of vLLM's attention metadata)."""
        qsl = query_start_loc.tolist()
        lens = seq_lens.tolist()
        starts, ends = qsl[:-1], qsl[1:]
        first_pos = [s - (e - b) for s, b, e in zip(lens, starts, ends)]
        slots = slot_mapping[: ends[-1]].tolist() if ends and ends[-1] > 0 else []
        first_slot = [slots[b] if e > b else -1 for b, e in zip(starts, ends)]
        return StepPlan(self, starts, ends, first_pos, first_slot)

    def resolve(self, plan: StepPlan) -> list:
        """Per row, the tracked :class:`Request` (starting or resetting slots as requests appear)
        or ``None``. Once per step (the first layer's call)."""
        if plan.requests is not None:
            return plan.requests
        with self._lock:
            owners = self._owners
            rows: list = [None] * plan.num_rows
            if owners is not None:
                for i in range(plan.num_rows):
                    req_id = owners.get(plan.first_slot[i])
                    if req_id is not None:
                        rows[i] = self._row_request(req_id, plan.first_pos[i], plan.ends[i] - plan.starts[i])
            plan.requests = rows
        return rows

    def _row_request(self, req_id: str, pos: int, n: int) -> Optional[Request]:
        req = self.requests.get(req_id)
        if req is None:
            req = self.requests[req_id] = Request(req_id, None)
            if pos == 0:
                self._start(req)
            else:
                # A prefix-cache hit: its first tokens were computed for another request.
                self._untrack(req, f"its first {pos} tokens came from vLLM's prefix cache")
        elif req.slot is not None and pos != req.total:
            if pos == 0:  # recomputed from the start (e.g. after a preemption)
                self._start(req)
            else:
                self._untrack(req, f"its tokens resume at position {pos}, the plugin has {req.total}")
        if req.slot is None:
            return None
        req.total = pos + n
        return req

    def record(self, layer_name: str, plan: StepPlan, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copies this step's new rows ``[tokens, hkv, d]`` of every tracked request in
        ``layer_name`` into its window (and the rows leaving it into the host store)."""
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        for i, req in enumerate(self.resolve(plan)):
            if req is not None:
                b, e = plan.starts[i], plan.ends[i]
                req.windows[layer].append(key[b:e], value[b:e])

    def hybrid_rows(self, layer_name: str, plan: StepPlan) -> list[int]:
        """Rows this layer serves with hybrid attention: one query token, host tokens present."""
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return []
        rows = self.resolve(plan)
        return [
            i
            for i, req in enumerate(rows)
            if req is not None and plan.ends[i] - plan.starts[i] == 1 and req.windows[layer].host > 0
        ]

    def decode(
        self, layer_name: str, plan: StepPlan, rows: list[int], query: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Hybrid attention of decode ``rows``: ``query [tokens, hq, d]`` → ``[len(rows), hq, d]``
        (float32): device rows (sinks + recent window) in torch, host rows by the CPU stage over
        each request's slot, merged by log-sum-exp."""
        layer = self.layer_index[layer_name]
        reqs = self.resolve(plan)
        q = query[[plan.starts[i] for i in rows]].float()  # [r, hq, d], on the model's device
        dev_out, dev_lse = [], []
        for j, i in enumerate(rows):
            k, v = reqs[i].windows[layer].rows()
            o, lse = device_partial(q[j : j + 1], k.unsqueeze(0), v.unsqueeze(0), scale)
            dev_out.append(o)
            dev_lse.append(lse)
        slots = [reqs[i].slot for i in rows]
        top_k = self.config.k if self.config.policy == "post_qkt" else None
        host = self.store.cpu_stage_slots(layer, slots, q.cpu(), scale, "lse", top_k=top_k)
        out, _ = merge_partials(
            torch.cat(dev_out), torch.cat(dev_lse), host["out"].to(q.device), host["lse"].to(q.device)
        )
        c = self.counters
        c["hybrid_calls"] += 1
        c["hybrid_rows"] += len(rows)
        c["host_tokens_read"] += sum(host["tokens"])
        return out


_current: Optional[Runtime] = None


def install(runtime: Runtime) -> Runtime:
    """Makes ``runtime`` the one this process's connector and :func:`stats` talk to."""
    global _current
    _current = runtime
    return runtime


def current() -> Optional[Runtime]:
    """The runtime of the model this process serves (``None`` before vLLM built one)."""
    return _current


def stats() -> dict:
    """Counters of the current runtime (empty before one exists), plus the requests it tracks."""
    rt = _current
    if rt is None:
        return {}
    return {**rt.counters, "active_requests": rt.active_requests, "active_slots": list(rt.store.active_slots)}
