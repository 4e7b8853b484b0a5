"""What the layers of one patched FlexGen share: the configuration, the feedback scheduler (one K
for every layer of a step, as in HybridGen's Algorithm 1) and the telemetry.

FlexGen runs a decode step as a loop over layers (and GPU batches) without telling anyone where a
step begins, so the session recognises a new step by its length: every attention call of step
``i`` sees a mask of ``prompt_len + i`` tokens. When the length changes, the finished step's summed
times go to the scheduler, which picks K and the strategy for the step that starts.
"""

from __future__ import annotations

from typing import Optional

from .. import _native
from ..config import HybridConfig
from ..telemetry import StepRecord, Telemetry
from .compat import check_config

__all__ = ["Session"]


class Session:
    """The state of one :func:`hybridgen.flexgen.patch` call.

    Attributes:
        config: the validated :class:`~hybridgen.HybridConfig`.
        budget_given: whether ``gpu_budget`` was chosen explicitly (else FlexGen's cache
            percents may set it, see :mod:`hybridgen.flexgen.compat`).
        scheduler: the native feedback scheduler (policy ``scheduler``), else ``None``.
        telemetry: one :class:`~hybridgen.telemetry.StepRecord` per decode step, layer and GPU batch.
        step: decode steps finished so far.
    """

    def __init__(self, config: HybridConfig, *, budget_given: bool = True):
        self.config = check_config(config)
        self.budget_given = budget_given
        self.scheduler = _native.Scheduler(config.k_min, config.k_max) if config.policy == "scheduler" else None
        self.telemetry = Telemetry()
        self.step = 0
        self._length: Optional[int] = None  # sequence length of the step in progress
        self._pending: list = []  # the step's records and their calls' spans, resolved at its end

    def selection(self) -> tuple[str, Optional[int]]:
        """``(strategy, K)`` for the step in progress: ``("all", None)``, the fixed policy and
        ``k``, or the scheduler's current choice."""
        if self.config.policy == "all":
            return "all", None
        if self.scheduler is not None:
            return self.scheduler.strategy, self.scheduler.k
        return self.config.policy, self.config.k

    def begin(self, length: int) -> None:
        """Called by every attention call with its sequence length, before it selects tokens."""
        if length != self._length:
            self.finish_step()
            self._length = length

    def record(self, record: StepRecord, call_span=None) -> None:
        """Adds one layer's record to the step in progress (``call_span``: the whole attention
        call's time; on CUDA, spans are events read once, when the step closes)."""
        record.step = self.step
        self._pending.append((record, call_span))

    def finish_step(self) -> None:
        """Closes the step in progress (if any layer ran): resolves its times and feeds them to
        the scheduler."""
        if self._pending:
            t_gpu = t_cpu = t_tx = 0.0
            for record, span in self._pending:
                self.telemetry.add(record.resolve(span))
                t_gpu, t_cpu, t_tx = t_gpu + record.t_gpu, t_cpu + record.t_cpu - record.t_hidden, t_tx + record.t_tx
            if self.scheduler is not None:
                self.scheduler.observe(t_gpu, t_cpu, t_tx)
            self.step += 1
        self._pending = []
        self._length = None

    def __repr__(self) -> str:
        c = self.config
        return (f"Session(policy={c.policy!r}, gpu_budget={c.gpu_budget}, sinks={c.sinks}, merge={c.merge!r}, "
                f"steps={self.step})")
