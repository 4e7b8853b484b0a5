"""What the layers of one patched FlexGen share: the configuration and the decode engine (one
policy and one K for every layer of a step, as in HybridGen's Algorithm 1; one step clock with
its telemetry; one host store).

FlexGen makes a cache per attention layer and GPU batch when ``generate`` starts, in order
(layer by layer, GPU batch by GPU batch). Each becomes one tier of the session's engine:
tier ``layer_id * gpu_batches + k``. Steps end where the engine ends them for every front end
(a tier decoding again starts the next step); the session also closes the step in progress when
a generation starts or ends.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..config import HybridConfig
from ..engine import Engine, ModelInfo, StepClock
from .compat import check_config

__all__ = ["Session"]


class Session:
    """The state of one :func:`hybridgen.flexgen.patch` call.

    Attributes:
        config: the validated :class:`~hybridgen.HybridConfig`.
        budget_given: whether ``gpu_budget`` was chosen explicitly (else FlexGen's cache
            percents may set it, see :mod:`hybridgen.flexgen.compat`).
        engine: the decode engine of the current generation's shape (made with the first cache,
            when the model's shape and FlexGen's split are known; kept while they stay, so the
            scheduler's state carries over from one ``generate`` to the next).
        clock: decode steps, their records and the telemetry, over every generation.
    """

    def __init__(self, config: HybridConfig, *, budget_given: bool = True):
        self.config = check_config(config)
        self.budget_given = budget_given
        self.engine: Optional[Engine] = None
        self.clock = StepClock(self._observe)
        self._shape: Optional[tuple] = None
        self._made: dict[int, int] = {}  # caches made per FlexGen layer in this generation

    def tier_for(
        self,
        layer_id: int,
        *,
        info: ModelInfo,
        sinks: int,
        gpu_budget: int,
        gpu_batches: int,
        batch: int,
        max_tokens: int,
        device,
        dtype: torch.dtype,
    ) -> tuple[Engine, int]:
        """The engine and tier index of the next cache of FlexGen layer ``layer_id``: a cache of a
        layer that already has one per GPU batch starts a new generation (every tier emptied)."""
        device = torch.device(device or "cpu")
        shape = (info, sinks, gpu_budget, gpu_batches, batch, max_tokens, device, dtype)
        if self.engine is None or shape != self._shape:
            self.finish_step()
            config = dataclasses.replace(self.config, sinks=sinks, gpu_budget=gpu_budget)
            self.engine = Engine(config, info, clock=self.clock)
            self.engine.plan(
                batch=batch,
                dtype=dtype,
                device=device,
                max_tokens=max_tokens,
                layers=info.layers * gpu_batches,
                labels=[layer for layer in range(info.layers) for _ in range(gpu_batches)],
            )
            self._shape, self._made = shape, {}
        elif self._made.get(layer_id, 0) >= gpu_batches:  # a new generate()
            self.engine.reset()
            self._made = {}
        k = self._made.get(layer_id, 0)
        self._made[layer_id] = k + 1
        return self.engine, layer_id * gpu_batches + k

    @property
    def policy(self):
        return None if self.engine is None else self.engine.policy

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
        return None if self.engine is None else self.engine.scheduler

    def finish_step(self) -> None:
        """Closes the step in progress (if any layer ran)."""
        self.clock.close_step()

    def _observe(self, t_gpu: float, t_cpu: float, t_tx: float) -> None:
        if self.engine is not None:
            self.engine.policy.observe(t_gpu, t_cpu, t_tx)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Session(policy={c.policy!r}, gpu_budget={c.gpu_budget}, sinks={c.sinks}, merge={c.merge!r}, "
            f"steps={self.step})"
        )
