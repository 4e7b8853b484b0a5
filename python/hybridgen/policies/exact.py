"""Exact baselines: every token attended to, only the placement and the bus traffic differ.

- ``full``: all KV stays on the device and the device attends to it (the oracle; also what an
  unpatched model does, here through the same cache plumbing).
- ``aog`` (all-on-GPU attention, FlexGen-style): all KV is offloaded to host memory and streamed
  back to the device every step; attention runs on the device.
- ``aoc`` (all-on-CPU attention, MoE-Lightning-style): all KV lives in host memory and the CPU
  attends to it; only the query and the output (with its log-sum-exp) cross the bus.
"""

from __future__ import annotations

from ..attention import device_partial
from ..ops import merge_partials
from ..telemetry import StepRecord
from ..timing import timed
from .base import Placement, Policy, device_only
from .hybrid import HybridPolicy


class FullPolicy(Policy):
    names = ("full",)
    keeps = "every token on the device"
    runs = "device"
    bus = "nothing"
    exact = True

    def placement(self) -> Placement:
        return Placement(sinks=0, recent=None, evict_chunk=self.config.evict_chunk)

    def selection(self):
        return "full", None

    def decode(self, tier, q, keep, scale, step):
        return device_only(tier, q, keep, scale, step, "full")


class _AllOnHost:
    """The placement of the baselines that keep every token in host memory (the step's new token
    goes there after its step)."""

    keeps = "every token in host memory (only the step's new token on the device)"

    def placement(self) -> Placement:
        return Placement(sinks=0, recent=0, evict_chunk=1)

    def selection(self):
        return "all", None


class AllOnGpuPolicy(_AllOnHost, Policy):
    names = ("aog",)
    runs = "device, after streaming all KV from the host"
    bus = "all keys and values to the device, every step and layer"
    exact = True

    def decode(self, tier, q, keep, scale, step):
        store, idx = tier.store, tier.layer_idx
        n_host = tier.host_tokens
        dev_k, dev_v = tier.keys, tier.values
        dev_mask, host_mask = tier.masks(keep)

        def stream():
            keys, values = store.view(idx, "keys", 0, n_host), store.view(idx, "values", 0, n_host)
            if q.is_cuda:  # asynchronous, strip by strip from the page-locked store
                from ..cuda import copy_to_device

                return copy_to_device(keys, q.device), copy_to_device(values, q.device)
            return keys.to(q.device), values.to(q.device)

        (hk, hv), t_tx = timed(stream, q.device)

        def attend():
            o_host, lse_host = device_partial(q, hk, hv, scale, host_mask)
            o_dev, lse_dev = device_partial(q, dev_k, dev_v, scale, dev_mask)
            return merge_partials(o_host, lse_host, o_dev, lse_dev)[0]

        out, t_dev = timed(attend, q.device)
        return out, StepRecord(
            step=step,
            layer=idx,
            k=n_host,
            strategy="all",
            host_tokens=n_host,
            device_tokens=dev_k.shape[-2],
            t_cpu=0.0,
            t_gpu=t_dev,
            t_tx=t_tx,
            tx_bytes=(hk.numel() + hv.numel()) * hk.element_size(),
            keys_read=n_host,
        )


class AllOnCpuPolicy(_AllOnHost, HybridPolicy):
    """Exact unless speculative (:meth:`HybridPolicy.is_exact`)."""

    names = ("aoc",)
    runs = "CPU over all stored tokens (the new token's share on the device, LSE-merged)"
    bus = "q to the CPU, the output + LSE back"
