"""What the layers of one patched FlexGen share: the configuration, the policy (one K for every
layer of a step, as in HybridGen's Algorithm 1) and the step clock with its telemetry.

FlexGen runs a decode step as a loop over layers (and GPU batches) without telling anyone where a
step begins, so the session recognises a new step by its length: every attention call of step
``i`` sees a mask of ``prompt_len + i`` tokens. When the length changes, the finished step's
records close (:class:`~hybridgen.engine.StepClock`): their summed times go to the policy, whose
scheduler picks K and the strategy for the step that starts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import HybridConfig
from ..engine import ModelInfo, PolicyRunner, StepClock
from ..policies import Placement, Policy, make_policy
from .compat import check_config

__all__ = ["Session"]


class Session(PolicyRunner):
    """The state of one :func:`hybridgen.flexgen.patch` call.

    Attributes:
        config: the validated :class:`~hybridgen.HybridConfig`.
        budget_given: whether ``gpu_budget`` was chosen explicitly (else FlexGen's cache
            percents may set it, see :mod:`hybridgen.flexgen.compat`).
        policy: the policy serving every layer (made with the first cache, when the model's shape
            and FlexGen's split are known).
        clock: decode steps, their records and the telemetry.
    """

    def __init__(self, config: HybridConfig, *, budget_given: bool = True):
        self.config = check_config(config)
        self.budget_given = budget_given
        self.policy: Optional[Policy] = None
        self.clock = StepClock(self._observe)
        self._length: Optional[int] = None  # sequence length of the step in progress

    def policy_for(self, info: ModelInfo, sinks: int, gpu_budget: int) -> tuple[Policy, Placement]:
        """The session's policy (made on first use, then kept: the scheduler's state carries over
        from one ``generate`` to the next) and its placement for FlexGen's split."""
        if self.policy is None or self.policy.info != info or (self.policy.config.sinks, self.policy.config.gpu_budget) != (sinks, gpu_budget):
            config = dataclasses.replace(self.config, sinks=sinks, gpu_budget=gpu_budget)
            self.policy = make_policy(config, info)
        return self.policy, self.policy.placement()

    def begin(self, length: int) -> None:
        """Called by every attention call with its sequence length, before it selects tokens."""
        if length != self._length:
            self.finish_step()
            self._length = length

    def record(self, record, call_span=None) -> None:
        """Adds one layer's record to the step in progress (``call_span``: the whole attention
        call's time; on CUDA, spans are events read once, when the step closes)."""
        self.clock.record(record, call_span)

    def finish_step(self) -> None:
        """Closes the step in progress (if any layer ran)."""
        self.clock.close_step()
        self._length = None

    def _observe(self, t_gpu: float, t_cpu: float, t_tx: float) -> None:
        if self.policy is not None:
            self.policy.observe(t_gpu, t_cpu, t_tx)

    def __repr__(self) -> str:
        c = self.config
        return (f"Session(policy={c.policy!r}, gpu_budget={c.gpu_budget}, sinks={c.sinks}, merge={c.merge!r}, "
                f"steps={self.step})")
