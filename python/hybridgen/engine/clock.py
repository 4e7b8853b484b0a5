"""The step clock: per-layer records of a decode step → telemetry → the policy's feedback.

A step's records carry lazy times (CUDA events on a GPU); they are resolved once, when the step
closes, so no layer waits for the device. Closing feeds the summed per-layer times to the policy
(the feedback scheduler picks K and the strategy of the next step from them).

Where a step ends is decided here, the same way for every front end: a step closes when a tier
that already recorded in it records again (the next token has started), or when the front end
says so (:meth:`StepClock.close_step`: the end of a forward, of a generation).
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional

from ..telemetry import StepRecord, Telemetry

__all__ = ["StepClock"]


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
        self._seen: set = set()  # the tiers that recorded in the open step

    @property
    def open_records(self) -> int:
        return len(self._open)

    @property
    def last_record(self) -> Optional[StepRecord]:
        """The latest record of the step in progress (its times may still be lazy)."""
        return self._open[-1][0] if self._open else None

    def begin(self, tier: Hashable) -> None:
        """Called before ``tier`` decodes: a tier that already recorded in the open step starts
        the next one, so the open step closes first."""
        if tier in self._seen:
            self.close_step()

    def record(self, record: StepRecord, span=None, tier: Hashable = None) -> None:
        """Adds one layer's record to the step in progress (``span``: the whole layer's or call's
        time, if measured; device time becomes everything but the serial CPU stage and the transfer)."""
        record.step = self.step
        self._open.append((record, span))
        self._seen.add(tier)

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
        self._seen = set()
        self.observe(t_gpu, t_cpu, t_tx)
        self.step += 1
