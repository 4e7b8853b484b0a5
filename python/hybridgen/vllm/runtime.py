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
   per slot), merged by log-sum-exp; every other row takes vLLM's own path;
5. the step closes (the next :meth:`Runtime.begin_step`, or :meth:`Runtime.end_step`): the
   summed CPU-stage and device-part times of its layers go to the policy's feedback scheduler.

Which host tokens the CPU stage attends to is the policy's (:class:`~hybridgen.policies.hybrid.HybridPolicy`:
its selection, its scheduler, its positional Pre-QKT prediction); the runtime only applies it to a
ragged batch of slots.

Telemetry: :func:`stats` in the worker's process; with ``HYBRIDGEN_VLLM_STATS=DIR`` each runtime
also writes its stats to ``DIR/hybridgen-stats-<pid>.json`` (for processes a caller cannot reach:
vLLM's engine core or its workers).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .._native import CapacityError
from ..attention import device_partial, page_count, pre_qkt_positions
from ..config import HybridConfig
from ..engine.store import make_store
from ..ops import merge_partials
from ..policies.hybrid import HybridPolicy, page_candidates
from ..timing import timed
from .window import Window

__all__ = ["STATS_ENV", "Request", "Runtime", "StepPlan", "causal_partial", "current", "stats"]

log = logging.getLogger("vllm.plugins.hybridgen")

#: A directory: each runtime writes its :func:`stats` there as ``hybridgen-stats-<pid>.json``.
STATS_ENV = "HYBRIDGEN_VLLM_STATS"
#: Finished requests whose telemetry the stats keep (the most recent).
FINISHED_KEPT = 256
#: Seconds between two writes of the stats file (the last state is always written).
STATS_INTERVAL = 0.5


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
    #: Decode rows served by hybrid attention, summed over layers.
    hybrid_rows: int = 0
    #: Host tokens attended to, summed over rows and layers.
    host_tokens_read: int = 0

    def summary(self) -> dict:
        """Telemetry of the request: tokens seen, host tokens (first layer), what hybrid decode did."""
        host = self.windows[0].host if self.windows else 0
        return {
            "req_id": self.req_id,
            "tokens": self.total,
            "host_tokens": host,
            "hybrid_rows": self.hybrid_rows,
            "host_tokens_read": self.host_tokens_read,
            "untracked": self.why_untracked or None,
        }


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
    #: Rows, after :meth:`Runtime.resolve`, of requests some of whose blocks vLLM freed
    #: (:mod:`hybridgen.vllm.blocks`): vLLM's own attention must not serve them.
    freed: frozenset = frozenset()

    @property
    def num_rows(self) -> int:
        return len(self.starts)


class Runtime:
    """Host store, request slots and hybrid decode for the attention layers of one model.

    Args:
        config: the hybrid configuration (a policy of :data:`~hybridgen.vllm.settings.SUPPORTED_POLICIES`,
            ``merge`` ``lse``).
        layer_names: vLLM's attention layer names, in model order (host store layer = index).
        kv_heads, head_dim, dtype: the KV cache's shape and element type.
        max_requests: requests that may run at once (host store slots).
        max_tokens: tokens per request (the host store reserves address space for them).
        engine_id: the vLLM engine served (lets a connector in the same process find it).
        rank: the worker's tensor-parallel rank (its KV heads are the ones it sees), for telemetry.
        frees_blocks: vLLM frees the paged-cache blocks between a request's sinks and its recent
            window (:mod:`hybridgen.vllm.blocks`): every step then checks that vLLM's own
            attention serves no row of a request with freed blocks.
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
        rank: Optional[int] = None,
        frees_blocks: bool = False,
    ):
        self.config = config
        self.frees_blocks = frees_blocks
        #: The vLLM engine the runtime serves (its KV transfer engine id), if known.
        self.engine_id = engine_id
        self.rank = rank
        #: Selection and feedback scheduler: hybridgen's own policy (no model info needed).
        self.policy = HybridPolicy(config, None)
        self.kv_heads, self.head_dim = kv_heads, head_dim
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
        self._blocks_freed: frozenset = frozenset()
        self._lock = threading.RLock()
        # The open step's (strategy, K), fixed at its first hybrid layer, and its summed times.
        self._selection: Optional[tuple] = None
        self._times: Optional[list] = None
        self._worker = None  # the CPU stage's thread (pipeline)
        self._stats_dir = os.environ.get(STATS_ENV) or None
        self._stats_written = 0.0
        self._stats_timer: Optional[threading.Timer] = None
        #: Telemetry of the most recent finished requests (:meth:`Request.summary`).
        self.finished = collections.deque(maxlen=FINISHED_KEPT)
        #: Counts of what ran (read with :func:`stats`; the tests check them).
        self.counters = {
            "steps": 0,
            "hybrid_calls": 0,  # (layer, step) pairs that ran hybrid decode
            "hybrid_rows": 0,  # decode rows served by hybrid attention (summed over layers)
            "prefill_rows": 0,  # prompt tokens of streamed chunks served by hybrid attention (idem)
            "host_tokens_read": 0,  # host tokens attended to (summed over rows and layers)
            "host_keys_scored": 0,  # host key rows the CPU computed logits for (idem)
            "stock_rows": 0,  # rows left to vLLM's own attention (summed over layers)
            "slots_added": 0,
            "slots_released": 0,
            "untracked": 0,
            "peak_batch_requests": 0,  # most tracked requests in one step's batch
            # Hybrid rows per strategy that ran ("all", "post_qkt", "pre_qkt"; summed over layers).
            "rows_by_strategy": {"all": 0, "post_qkt": 0, "pre_qkt": 0},
            "observed_steps": 0,  # steps whose times went to the feedback scheduler
        }

    # --- requests ---------------------------------------------------------------------------------
    def begin_step(self, owners: dict[int, str], finished: Iterable[str], blocks_freed: Iterable[str] = ()) -> None:
        """The scheduler's view of the step: ``owners`` maps the paged-cache slot of each scheduled
        request's first new token to its id; ``finished`` requests (done or aborted) give their
        host slots back; ``blocks_freed`` names the scheduled requests some of whose blocks vLLM
        freed (the worker's block table does not show it: vLLM only appends to it)."""
        self._close_step()
        for req_id in finished:
            self.release(req_id)
        self._owners = dict(owners)
        self._blocks_freed = frozenset(blocks_freed)
        self.counters["steps"] += 1

    def end_step(self) -> None:
        self._owners = None
        self._close_step()

    def _close_step(self) -> None:
        """Feeds the step's summed times (CPU stage, device part, transfer) to the policy."""
        times, self._times, self._selection = self._times, None, None
        if times is not None:
            t_gpu, t_cpu, t_tx = (float(t) for t in times)
            self.policy.observe(t_gpu, t_cpu, t_tx)
            self.counters["observed_steps"] += 1
        self._write_stats()

    def release(self, req_id: str) -> None:
        """Forgets ``req_id`` and gives its host slot back (no-op for an unknown id)."""
        with self._lock:
            req = self.requests.pop(req_id, None)
            if req is None:
                return
            if req.slot is not None:
                self.store.release_slot(req.slot)
                self.counters["slots_released"] += 1
            summary = req.summary()
            self.finished.append(summary)
            log.debug("hybridgen: request finished: %s", summary)
            self._write_stats(force=not self.requests)

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

    def check_stock_rows(self, plan: StepPlan, hybrid: list[int]) -> None:
        """Raises if vLLM's own attention is about to serve a row of a request some of whose
        blocks vLLM freed (it would read blocks that now hold other requests' tokens)."""
        reqs = self.resolve(plan)
        bad = sorted(plan.freed - set(hybrid))
        if bad:
            who = [reqs[i].req_id if reqs[i] is not None else f"row {i} (untracked)" for i in bad]
            raise RuntimeError(
                f"hybridgen: vLLM's attention would read freed KV blocks of {who}: their rows are not hybrid "
                f"decode rows this step ({[plan.ends[i] - plan.starts[i] for i in bad]} tokens). This is a bug "
                "in the plugin's block freeing (hybridgen.vllm.blocks); please report it"
            )

    def resolve(self, plan: StepPlan) -> list:
        """Per row, the tracked :class:`Request` (starting or resetting slots as requests appear)
        or ``None``. Once per step (the first layer's call)."""
        if plan.requests is not None:
            return plan.requests
        with self._lock:
            owners = self._owners
            rows: list = [None] * plan.num_rows
            freed = []
            if owners is not None:
                for i in range(plan.num_rows):
                    req_id = owners.get(plan.first_slot[i])
                    if req_id is not None:
                        rows[i] = self._row_request(req_id, plan.first_pos[i], plan.ends[i] - plan.starts[i])
                        if req_id in self._blocks_freed:
                            freed.append(i)
            plan.freed = frozenset(freed)
            plan.requests = rows
            tracked = sum(r is not None for r in rows)
            self.counters["peak_batch_requests"] = max(self.counters["peak_batch_requests"], tracked)
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
        """Rows this layer serves with hybrid attention: rows of tracked requests with host
        tokens that are one query token (decode, :meth:`decode`) or whose blocks vLLM freed (a
        streamed prompt's chunk, :meth:`prefill`)."""
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return []
        rows = self.resolve(plan)
        return [
            i
            for i, req in enumerate(rows)
            if req is not None
            and req.windows[layer].host > 0
            and (plan.ends[i] - plan.starts[i] == 1 or i in plan.freed)
        ]

    def selection(self) -> tuple[str, Optional[int]]:
        """``(strategy, K)`` of the open step: the policy's, fixed for every layer of the step."""
        if self._selection is None:
            self._selection = self.policy.selection()
        return self._selection

    def decode(
        self, layer_name: str, plan: StepPlan, rows: list[int], query: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Hybrid attention of decode ``rows``: ``query [tokens, hq, d]`` → ``[len(rows), hq, d]``
        (float32): device rows (sinks + recent window) in torch, host rows by the CPU stage over
        each request's slot (the tokens the policy selects), merged by log-sum-exp. With
        ``pipeline`` the CPU stage runs on a worker thread (GIL released) while the device part runs."""
        layer = self.layer_index[layer_name]
        reqs = self.resolve(plan)
        if query.is_cuda:
            from ..cuda import refuse_capture

            refuse_capture("hybridgen's vLLM backend (run vLLM with enforce_eager=True)")
        q = query[[plan.starts[i] for i in rows]].float()  # [r, hq, d], on the model's device
        strategy, k = self.selection()
        slots = [reqs[i].slot for i in rows]
        host_lens = [reqs[i].windows[layer].host for i in rows]
        q_host = q.cpu()

        def stage():
            return self._host_stage(layer, slots, host_lens, q_host, scale, strategy, k)

        def device_part():
            dev_out, dev_lse = [], []
            for j, i in enumerate(rows):
                kd, vd = reqs[i].windows[layer].rows()
                o, lse = device_partial(q[j : j + 1], kd.unsqueeze(0), vd.unsqueeze(0), scale)
                dev_out.append(o)
                dev_lse.append(lse)
            return torch.cat(dev_out), torch.cat(dev_lse)

        if self.config.pipeline:
            future = self._thread().submit(stage)
            (dev_out, dev_lse), t_dev = timed(device_part, q.device)
            host_out, host_lse, tokens, scored, t_cpu = future.result()
        else:
            host_out, host_lse, tokens, scored, t_cpu = stage()
            (dev_out, dev_lse), t_dev = timed(device_part, q.device)
        (host_out, host_lse), t_tx = timed(lambda: (host_out.to(q.device), host_lse.to(q.device)), q.device)
        (out, _), t_merge = timed(lambda: merge_partials(dev_out, dev_lse, host_out, host_lse), q.device)

        times = self._times if self._times is not None else [0.0, 0.0, 0.0]
        self._times = [times[0] + t_dev + t_merge, times[1] + t_cpu, times[2] + t_tx]
        c = self.counters
        c["hybrid_calls"] += 1
        c["hybrid_rows"] += len(rows)
        c["host_tokens_read"] += sum(tokens)
        c["host_keys_scored"] += sum(scored)
        c["rows_by_strategy"][strategy] += len(rows)
        for j, i in enumerate(rows):
            reqs[i].hybrid_rows += 1
            reqs[i].host_tokens_read += tokens[j]
        return out

    def prefill(self, layer_name: str, plan: StepPlan, row: int, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Exact causal attention of a prompt chunk (row ``row``, its tokens already recorded)
        whose earlier blocks vLLM freed: ``query [tokens, hq, d]`` → ``[n, hq, d]`` (float32).
        Each query token attends to the device rows and the host rows at its position or
        before (the device part in torch, the host part by the CPU stage over the request's slot,
        one row per query token, masked by position), merged by log-sum-exp. The policies'
        selections are for decode steps: a chunk attends to every host token before it."""
        layer = self.layer_index[layer_name]
        req = self.resolve(plan)[row]
        window = req.windows[layer]
        b, e = plan.starts[row], plan.ends[row]
        q = query[b:e].float()  # [n, hq, d]
        pos = torch.arange(plan.first_pos[row], plan.first_pos[row] + (e - b))
        k_dev, v_dev = window.rows()
        after_dev = (window.positions()[None, :] > pos[:, None]).to(q.device)
        dev_out, dev_lse = causal_partial(q, k_dev, v_dev, scale, after_dev)
        host_pos = window.host_start + torch.arange(window.host)
        after_host = host_pos[None, :] > pos[:, None]
        res = self.store.cpu_stage_slots(layer, [req.slot] * (e - b), q.cpu(), scale, "lse", host_mask=after_host)
        out, _ = merge_partials(dev_out, dev_lse, res["out"].to(q.device), res["lse"].to(q.device))
        c = self.counters
        c["prefill_rows"] += e - b
        c["host_tokens_read"] += sum(res["tokens"])
        c["host_keys_scored"] += sum(res["tokens"])
        return out

    def _host_stage(self, layer, slots, host_lens, q, scale, strategy, k):
        """The CPU stage of one layer's hybrid rows: ``(out [r, hq, d], lse [r, hq], tokens
        attended per row, key rows scored per row, seconds)``. ``all`` attends to every host
        token; ``post_qkt`` scores them all and keeps the top ``k`` per head; ``pre_qkt`` scores
        the tokens the policy's predictor names: by page summaries, the pages of ``max(2k,
        n/8)`` tokens whose bounds are highest, then the top ``k`` (the policy's choice, without
        the previous step's selection as extra tokens); by position, ``k`` tokens (every host
        token where a row has no more than ``k``)."""
        t0 = time.perf_counter()
        store, r = self.store, len(slots)
        if strategy == "pre_qkt" and self.config.predictor == "pages":
            pages = [page_count(max(page_candidates(k, n), k)) for n in host_lens]
            res = store.cpu_stage_slots(layer, slots, q, scale, "lse", top_k=k, pages=pages)
            scored = [self.policy.keys_read({"pages": p}, n) for p, n in zip(pages, host_lens)]
            return res["out"], res["lse"], res["tokens"], scored, time.perf_counter() - t0
        picked = [j for j, n in enumerate(host_lens) if n > k] if strategy == "pre_qkt" else []
        if not picked:
            top_k = k if strategy == "post_qkt" else None
            res = store.cpu_stage_slots(layer, slots, q, scale, "lse", top_k=top_k)
            return res["out"], res["lse"], res["tokens"], list(host_lens), time.perf_counter() - t0
        out = torch.empty(r, q.shape[1], self.head_dim, dtype=torch.float32)
        lse = torch.empty(r, q.shape[1], dtype=torch.float32)
        tokens, scored = [0] * r, list(host_lens)
        rest = [j for j in range(r) if host_lens[j] <= k]
        positions = torch.stack([pre_qkt_positions(host_lens[j], k) for j in picked])  # [r', k]
        for part, pos in ((picked, positions), (rest, None)):
            if not part:
                continue
            res = store.cpu_stage_slots(layer, [slots[j] for j in part], q[part], scale, "lse", positions=pos)
            out[part], lse[part] = res["out"], res["lse"]
            for j, t in zip(part, res["tokens"]):
                tokens[j] = t
        for j in picked:
            scored[j] = k
        return out, lse, tokens, scored, time.perf_counter() - t0

    def _thread(self):
        if self._worker is None:
            from ..policies.base import new_worker

            self._worker = new_worker()
        return self._worker

    def stats(self) -> dict:
        """Counters, the requests tracked now, the slots in use, the scheduler's state and the
        telemetry of the most recent finished requests."""
        with self._lock:
            strategy, k = self.policy.selection()
            return {
                **{key: (dict(v) if isinstance(v, dict) else v) for key, v in self.counters.items()},
                "policy": self.config.policy,
                "strategy": strategy,
                "k": k,
                "rank": self.rank,
                "pid": os.getpid(),
                "active_requests": self.active_requests,
                "active_slots": list(self.store.active_slots),
                "finished_requests": list(self.finished),
            }

    def _write_stats(self, force: bool = False) -> None:
        """Writes :meth:`stats` to ``$HYBRIDGEN_VLLM_STATS/hybridgen-stats-<pid>.json``,
        atomically (a reader never sees half a file): at once if ``force``, else at most every
        :data:`STATS_INTERVAL` seconds, a skipped write being made by a timer when the interval
        ends (a non-daemon thread: a process that exits writes its last state first)."""
        if self._stats_dir is None:
            return
        with self._lock:
            wait = self._stats_written + STATS_INTERVAL - time.monotonic()
            if not force and wait > 0:
                if self._stats_timer is None:
                    self._stats_timer = threading.Timer(wait, self._write_stats, kwargs={"force": True})
                    self._stats_timer.start()
                return
            if self._stats_timer is not None and self._stats_timer is not threading.current_thread():
                self._stats_timer.cancel()
            self._stats_timer = None
            self._stats_written = time.monotonic()
            try:
                path = Path(self._stats_dir) / f"hybridgen-stats-{os.getpid()}.json"
                tmp = path.with_suffix(".tmp")
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(self.stats()))
                os.replace(tmp, path)
            except OSError as e:  # telemetry must never stop serving
                log.warning("hybridgen: cannot write stats to %s: %s", self._stats_dir, e)
                self._stats_dir = None


def causal_partial(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, masked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [n, hq, d]`` over ``keys``/``values [hkv, m, d]`` (GQA), where
    ``masked [n, m]`` (True) hides a key from a query: ``(out [n, hq, d], lse [n, hq])``, float32;
    a query that sees no key gets zeros and ``-inf``."""
    n, hq, d = q.shape
    hkv, m = keys.shape[0], keys.shape[1]
    qg = q.float().view(n, hkv, hq // hkv, d).permute(1, 2, 0, 3)  # [hkv, g, n, d]
    x = torch.einsum("hgnd,hmd->hgnm", qg, keys.float()) * scale
    x = x.masked_fill(masked.view(1, 1, n, m), float("-inf"))
    lse = torch.logsumexp(x, dim=-1)  # [hkv, g, n]
    p = torch.exp(x - lse[..., None]).nan_to_num_(0.0)  # a query with no key: all -inf
    out = torch.einsum("hgnm,hmd->hgnd", p, values.float())
    return out.permute(2, 0, 1, 3).reshape(n, hq, d), lse.permute(2, 0, 1).reshape(n, hq)


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
    """Counters of the current runtime (empty before one exists), plus the requests it tracks
    (:meth:`Runtime.stats`)."""
    rt = _current
    if rt is None:
        return {}
    return rt.stats()
