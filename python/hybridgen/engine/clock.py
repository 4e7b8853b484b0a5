"""The step clock: per-layer records of a decode step → telemetry → the policy's feedback.

A step's records carry lazy times (CUDA events on a GPU); they are resolved once, when the step
closes, so no layer waits for the device. Closing feeds the summed per-layer times to the policy
(the feedback scheduler picks K and the strategy of the next step from them).
"""

from __future__ import annotations

from typing import Callable, Optional

from ..telemetry import StepRecord, Telemetry

__all__ = ["PolicyRunner", "StepClock", "decode_with"]


def decode_with(policy, tier, q, keep, scale: float, step: int):
    """One decode step of ``tier``'s layer through ``policy``: ``(out, record)``, the record
    completed with what only the engine knows (the layer's page-locked bytes)."""
    out, record = policy.decode(tier, q, keep, scale, step)
    if tier.store.pin_device is not None:  # a Python attribute: no native call on the CPU path
        record.pinned_bytes = tier.store.layer_pinned_bytes(tier.layer_idx)
    return out, record


class StepClock:
    """Counts decode steps and collects their records.

    Args:
        observe: called with ``(t_gpu, t_cpu, t_tx)`` seconds of every closed step (the policy's
            :meth:`~hybridgen.policies.Policy.observe`).
    """

    def __init__(self, observe: Callable[[float, float, float], None], telemetry: Optional[Telemetry] = None):
        self.observe = observe
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        #: Decode steps closed so far.
        self.step = 0
        self._open: list = []  # this step's records and their spans

    @property
    def open_records(self) -> int:
        return len(self._open)

    def record(self, record: StepRecord, span=None) -> None:
        """Adds one layer's record to the step in progress (``span``: the whole layer's or call's
        time, if measured; device time becomes everything but the serial CPU stage and the transfer)."""
        record.step = self.step
        self._open.append((record, span))

    def close_step(self) -> None:
        """Resolves the step's times, adds its records to the telemetry and feeds the policy
        (nothing happens if no layer recorded)."""
        if not self._open:
            return
        t_gpu = t_cpu = t_tx = 0.0
        for record, span in self._open:
            self.telemetry.add(record.resolve(span))
            t_gpu += record.t_gpu
            t_cpu += record.t_cpu - record.t_hidden
            t_tx += record.t_tx
        self._open = []
        self.observe(t_gpu, t_cpu, t_tx)
        self.step += 1


class PolicyRunner:
    """What an integration's owner of a policy and its clock shows users (transformers'
    HybridCache, FlexGen's Session): telemetry, decode steps, the scheduler."""

    clock: StepClock
    policy: object

    @property
    def telemetry(self):
        return self.clock.telemetry

    @property
    def step(self) -> int:
        """Decode steps closed so far (every layer recorded)."""
        return self.clock.step

    @property
    def scheduler(self):
        """The native feedback scheduler of the ``scheduler`` policy, else ``None``."""
        return getattr(self.policy, "scheduler", None)
