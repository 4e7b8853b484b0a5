"""hybridgen's own policies: the CPU attends over the host tokens while the device attends over
the sinks and the recent tokens, and the two partial results are merged.

``all`` attends to every host token (exact); ``post_qkt`` scores every host key and keeps the top
``k`` per head; ``pre_qkt`` scores only ``k`` tokens chosen ahead of time (by the page summaries of
the keys, or by position with ``predictor="positional"``); ``scheduler`` adapts K and switches
between the two from measured step times (paper Algorithm 1, in the Rust core); ``quest`` is
Pre-QKT by page summaries with each query head choosing its own pages (Quest as published).
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Optional

import torch

from .. import _native
from ..attention import cpu_stage, device_combine, device_partial, page_count, pre_qkt_positions, softmax_rows
from ..telemetry import WINDOW, StepRecord
from ..timing import timed
from .base import Policy, device_only

#: Test hook: with this variable set (not "0"), the scheduler sees the CPU side of every step as
#: ten times the device's, so its CPU-bound branch (K down to ``k_min``, then Pre-QKT) runs
#: whatever the machine's load: what a 32K-128K context on a real server does.
FORCE_CPU_BOUND = "HYBRIDGEN_FORCE_CPU_BOUND"


#: Prompt queries whose attention seeds page-summary Pre-QKT's reused tokens (see ``prefill``).
SEED_WINDOW = 16


def page_candidates(k: int, n_host: int) -> int:
    """Host tokens whose exact logits page-summary Pre-QKT computes before keeping the best ``k``:
    twice ``k``, and at least an eighth of the host tokens, so that with the summaries (2 rows a
    page of 16) the CPU reads a quarter of the keys while Post-QKT reads them all."""
    return max(2 * k, n_host // 8)


def cpu_bound_forced() -> bool:
    return os.environ.get(FORCE_CPU_BOUND, "") not in ("", "0")


class HybridPolicy(Policy):
    names = ("all", "post_qkt", "pre_qkt", "scheduler", "quest")
    keeps = "sinks + `gpu_budget` recent tokens on the device; every other token in host memory (keys near, values far)"
    runs = (
        "device over its tokens, CPU over the host tokens (all, top-K after scoring all, or K chosen "
        "ahead: by page summaries or by position); LSE or concat merge"
    )
    bus = "q to the CPU; the CPU's partial output + LSE (or K logits + K value rows) back"

    def __init__(self, config, info, worker=None):
        super().__init__(config, info, worker)
        self.scheduler = _native.Scheduler(config.k_min, config.k_max) if config.policy == "scheduler" else None
        self.force_cpu_bound = self.scheduler is not None and cpu_bound_forced()
        #: Layer index -> future of its speculatively started CPU stage (pipeline + speculative).
        self.speculated: dict = {}
        #: Layer index -> the last step's selection per KV head (int64 ``[b, hkv, k]``), which
        #: page-summary Pre-QKT scores again beside its pages.
        self.previous: dict = {}

    @classmethod
    def is_exact(cls, config) -> bool:
        # Every host token attended (``aoc`` serves them all too), from the true query:
        # speculation starts the CPU stage from an estimate.
        return config.policy in ("all", "aoc") and not config.speculative

    @property
    def uses_query_estimate(self) -> bool:
        return self.config.speculative

    @property
    def uses_prompt_queries(self) -> bool:
        return self.config.predictor == "pages" and self.config.policy in ("pre_qkt", "scheduler")

    def prefill(self, tier, query, keys, values, keep, scale) -> None:
        """Seeds what page-summary Pre-QKT reuses with the tokens the prompt's last queries attend
        to most (SnapKV's observation window): the first decode step then scores them beside its
        pages, as later steps score the previous step's selection."""
        if not self.uses_prompt_queries:
            return
        sinks, w = tier.placement.sinks, min(SEED_WINDOW, query.shape[2])
        end = keys.shape[2] - w  # every window query sees the keys before it
        k = min(self.selection()[1] or self.config.k, end - sinks)
        if k <= 0:
            return
        b, hq, _, d = query.shape
        hkv = keys.shape[1]
        q = query[:, :, -w:].float().reshape(b, hkv, hq // hkv * w, d)
        x = torch.matmul(q, keys[:, :, sinks:end].float().transpose(-1, -2)) * scale  # [b, hkv, g·w, n]
        if keep is not None:
            x = x.masked_fill(~keep[:, None, None, sinks:end].to(x.device), float("-inf"))
        score = softmax_rows(x).sum(dim=2)
        # Logical position p (>= sinks) is host token p - sinks once it leaves the device.
        self.previous[tier.layer_idx] = score.topk(k, dim=-1).indices.sort(dim=-1).values.cpu()

    def selection(self) -> tuple[str, Optional[int]]:
        if self.config.policy == "all":
            return "all", None
        if self.scheduler is not None:
            return self.scheduler.strategy, self.scheduler.k
        return self.config.policy, self.config.k

    def observe(self, t_gpu, t_cpu, t_tx) -> None:
        if self.scheduler is not None:
            if self.force_cpu_bound:
                t_cpu = max(t_cpu, 10 * (t_gpu + t_tx) + 1e-3)
            self.scheduler.observe(t_gpu, t_cpu, t_tx)

    def decode(self, tier, q, keep, scale, step):
        if tier.window_on_device:
            # A sliding-window layer whose window the device tier holds: every host token is
            # outside the window (masked), so the host is never read.
            return device_only(tier, q, keep, scale, step, WINDOW)
        cfg, idx = self.config, tier.layer_idx
        dev_k, dev_v = tier.keys, tier.values
        n_host = tier.host_tokens
        dev_mask, host_mask = tier.masks(keep)
        strategy, k = self.selection()
        kernels = cfg.use_kernels
        if n_host == 0:
            out, t_dev = timed(lambda: device_partial(q, dev_k, dev_v, scale, dev_mask, kernels=kernels)[0], q.device)
            return out, StepRecord(step, idx, 0, strategy, 0, dev_k.shape[-2], 0.0, t_dev, 0.0)
        speculated = self.speculated.pop(idx, None)
        dev_part, t_dev_part = None, 0.0
        if speculated is not None:
            # Started from the previous layer's input while that layer ran (approximate query).
            host, hidden = _wait(speculated)
        elif cfg.pipeline and cfg.merge == "lse":
            # The CPU stage runs on the worker thread (native code, GIL released) while the device
            # computes its own partial; only the remainder of the CPU stage is waited for.
            future = self.worker.submit(self._stage(tier, q, scale, strategy, k, host_mask))
            dev_part, t_dev_part = timed(
                lambda: device_partial(q, dev_k, dev_v, scale, dev_mask, kernels=kernels), q.device
            )
            host, hidden = _wait(future)
        else:
            host, hidden = self._stage(tier, q, scale, strategy, k, host_mask)(), 0.0
        if host.kv_indices is not None:
            self.previous[idx] = host.kv_indices
        moved, t_tx = host.ship(q.device)
        s = tier.sinks_on_device
        out, t_dev = timed(
            lambda: device_combine(
                q, dev_k, dev_v, moved, scale=scale, sinks=s, dev_mask=dev_mask, dev_part=dev_part, kernels=kernels
            ),
            q.device,
        )
        return out, StepRecord(
            step=step,
            layer=idx,
            k=host.tokens,
            strategy=strategy,
            host_tokens=n_host,
            device_tokens=dev_k.shape[-2],
            t_cpu=host.seconds,
            t_gpu=t_dev + t_dev_part,
            t_tx=t_tx,
            t_hidden=hidden,
            tx_bytes=host.nbytes(),
            speculative=speculated is not None,
            keys_read=host.keys_read,
        )

    def _choice(self, strategy: str, k: int, tier) -> dict:
        """How the CPU stage chooses its tokens: ``top_k``, ``positions`` or ``pages`` (with the
        last step's selection as extra tokens), and whether to return the selection for reuse."""
        n_host, reuse = tier.host_tokens, self.config.predictor == "pages"
        if strategy == "post_qkt":
            return {"top_k": k, "kv_selection": reuse}
        if strategy == "pre_qkt" and not reuse:
            return {"positions": pre_qkt_positions(n_host, k)}
        if strategy == "pre_qkt":
            extra = self._reusable(tier)
            e = 0 if extra is None else extra.shape[-1]
            pages = page_count(max(page_candidates(k, n_host) - e, k))
            return {"pages": pages, "top_k": k, "page_extra": extra, "kv_selection": True}
        if strategy == "quest":
            return {"pages": page_count(k), "per_query_head": True}
        return {}

    def _reusable(self, tier):
        """The last step's selection of ``tier``'s layer for this sequence batch; tokens the seed
        from the prompt named that are still on the device become repeats of the newest host
        token (a repeat weighs nothing)."""
        prev = self.previous.get(tier.layer_idx)
        if prev is None or prev.shape[0] != tier.store.batch or prev.numel() == 0 or tier.host_tokens == 0:
            return None
        return prev.clamp(max=tier.host_tokens - 1)

    def keys_read(self, choice: dict, n_host: int) -> int:
        """Host key rows per KV head that the CPU stage making ``choice`` reads."""
        if "positions" in choice:
            return len(choice["positions"])
        pages = choice.get("pages")
        if pages is None or pages * _native.PAGE_TOKENS >= n_host:
            return n_host
        scored = pages * _native.PAGE_TOKENS
        if choice.get("per_query_head"):  # every query head reads its own pages
            scored *= self.info.q_heads // self.info.kv_heads
        extra = choice.get("page_extra")
        scored += 0 if extra is None else extra.shape[-1]
        return min(n_host, 2 * -(-n_host // _native.PAGE_TOKENS) + scored)

    def _stage(self, tier, q, scale, strategy, k, host_mask):
        """The CPU stage of ``tier``'s layer for query ``q`` as a callable (for the worker thread).
        On CUDA, ``q`` and the host mask are copied to page-locked memory here, on the submitting
        thread's stream right after the work producing them; the stage waits on that copy's event
        only, not on the device work queued after it (which it is meant to overlap)."""
        ready, on_cuda = None, q.is_cuda
        if on_cuda:
            from ..cuda import to_host

            (q, host_mask), ready = to_host(q, host_mask)
        choice = self._choice(strategy, k, tier)
        run = partial(
            cpu_stage,
            tier.store,
            tier.layer_idx,
            q,
            scale=scale,
            merge=self.config.merge,
            **choice,
            host_mask=host_mask,
            pinned=on_cuda,
            ready=ready,
            buffers=tier.buffers if self.config.merge == "lse" else None,
        )
        reads = self.keys_read(choice, tier.host_tokens)

        def stage():
            host = run()
            host.keys_read = reads
            return host

        return stage

    def speculate(self, tier, q_estimate, keep, scale) -> None:
        """Submits the CPU stage of ``tier``'s layer, from the query estimate, to the worker
        thread (used by that layer's attention)."""
        if not self.config.speculative or tier.host_tokens == 0 or tier.window_on_device:
            return
        strategy, k = self.selection()
        host_mask = None
        if keep is not None:
            s = min(tier.placement.sinks, tier.total + 1)  # the layer has not taken this step's token yet
            host_mask = ~keep[:, s : s + tier.host_tokens]
        self.speculated[tier.layer_idx] = self.worker.submit(
            self._stage(tier, q_estimate, scale, strategy, k, host_mask)
        )


def _wait(future) -> tuple:
    """The CPU stage's result and how much of it ran before it was waited for (hidden)."""
    t0 = time.perf_counter()
    host = future.result()
    return host, max(0.0, host.seconds - (time.perf_counter() - t0))
