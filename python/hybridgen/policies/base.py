"""The interface every decode-time KV policy implements, and the helpers they share.

A policy decides two things for every layer's :class:`~hybridgen.engine.DeviceTier` of the
:class:`~hybridgen.engine.Engine` that serves it (whichever front end drives the engine). It sees
plain tensors only: queries, keys, values, ``keep`` masks and query estimates.

- *placement*: how many leading (sink) and recent tokens each layer keeps on the model's device;
  every other token lives in the host store (nothing is ever lost: policies that "drop" tokens
  simply never read them again);
- *decode*: how one decode query attends — over which tokens, and on which side of the bus.

Prefill always runs the model's own attention over every token; a policy may look at it
(:meth:`Policy.prefill`, e.g. to seed accumulated attention scores).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from ..attention import device_partial, grouped_logits, softmax_rows, weighted_values
from ..config import HybridConfig
from ..engine.placement import Placement
from ..telemetry import StepRecord
from ..timing import timed

if TYPE_CHECKING:  # pragma: no cover
    from concurrent.futures import Executor

    from ..engine.model_info import ModelInfo
    from ..engine.tier import DeviceTier

__all__ = [
    "Placement",
    "Policy",
    "device_only",
    "new_worker",
    "fetch_rows",
    "grouped_logits",
    "softmax_rows",
    "weighted_values",
    "with_chosen",
]


def new_worker() -> "Executor":
    """A thread for pipelined CPU stages (one: the stages of consecutive layers queue)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridgen-cpu")


class Policy:
    """One decode-time attention policy. Subclasses set the class attributes (they make the
    README's comparison table) and implement :meth:`decode`."""

    #: The ``HybridConfig.policy`` names this class serves.
    names: ClassVar[tuple[str, ...]] = ()
    #: What the policy keeps, where its attention runs, what crosses the CPU-device bus per step.
    keeps: ClassVar[str] = ""
    runs: ClassVar[str] = ""
    bus: ClassVar[str] = ""
    #: Whether its output equals full attention (up to rounding); see :meth:`is_exact`.
    exact: ClassVar[bool] = False

    def __init__(self, config: HybridConfig, info: "ModelInfo", worker: Optional["Executor"] = None):
        self.config = config
        self.info = info
        self._worker = worker

    @property
    def worker(self) -> "Executor":
        """The thread for pipelined CPU stages: the engine's (a policy made on its own makes one)."""
        if self._worker is None:
            self._worker = new_worker()
        return self._worker

    @classmethod
    def is_exact(cls, config: HybridConfig) -> bool:
        """Whether this policy under ``config`` equals full attention (up to rounding): the one
        place that decides it."""
        return cls.exact

    @property
    def name(self) -> str:
        return self.config.policy

    def placement(self) -> Placement:
        c = self.config
        return Placement(c.sinks, c.gpu_budget, c.evict_chunk)

    def selection(self) -> tuple[str, Optional[int]]:
        """``(strategy, K)`` of the coming step, as telemetry records it."""
        return self.name, self.config.k

    def observe(self, t_gpu: float, t_cpu: float, t_tx: float) -> None:
        """The summed per-layer times of a finished step (feedback for adaptive policies)."""

    #: Whether the policy must see the prompt's queries (:meth:`prefill`) to work.
    needs_prompt_queries: ClassVar[bool] = False

    @property
    def uses_prompt_queries(self) -> bool:
        """Whether :meth:`prefill` does anything with the prompt's queries (a replay shows them only
        then); a policy that :attr:`needs_prompt_queries` does."""
        return self.needs_prompt_queries

    @property
    def uses_query_estimate(self) -> bool:
        """Whether :meth:`speculate` does anything (front ends skip computing the estimate)."""
        return False

    def prefill(
        self,
        tier: "DeviceTier",
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: Optional[torch.Tensor],
        scale: float,
    ) -> None:
        """Sees a multi-token step: ``query [b, hq, n, d]``, every token's ``keys``/``values
        [b, hkv, total, d]`` in logical order (the step's tokens last) and ``keep`` bool
        ``[b, total]`` (True = a real token; causal order implied). Default: nothing."""

    def speculate(
        self, tier: "DeviceTier", q_estimate: torch.Tensor, keep: Optional[torch.Tensor], scale: float
    ) -> None:
        """An estimate ``[b, hq, d]`` of the coming query of ``tier``'s layer, made before the layer
        runs; ``keep`` bool ``[b, tier.total + 1]`` is the coming step's mask. Default: nothing."""

    def decode(
        self, tier: "DeviceTier", q: torch.Tensor, keep: Optional[torch.Tensor], scale: float, step: int
    ) -> tuple[torch.Tensor, StepRecord]:
        """One decode query ``q [b, hq, d]`` over the layer's tokens: ``tier.keys``/``tier.values``
        ``[b, hkv, n_dev, d]`` (sinks first, this step's token included) and the host tokens.
        ``keep``: bool ``[b, tier.total]`` (True = attend) or ``None``. Returns the attention output
        ``[b, hq, d]`` (float32) and the step's :class:`~hybridgen.telemetry.StepRecord`."""
        raise NotImplementedError


# --- helpers of the policies that attend on the device --------------------------------------
def device_only(tier: "DeviceTier", q, keep, scale: float, step: int, strategy: str):
    """Attention over the layer's device tokens alone (host tokens, if any, are not read):
    ``(out, record)``."""
    dev_k, dev_v = tier.keys, tier.values
    dev_mask, _ = tier.masks(keep)
    out, t_dev = timed(lambda: device_partial(q, dev_k, dev_v, scale, dev_mask)[0], q.device)
    return out, StepRecord(step, tier.layer_idx, 0, strategy, tier.host_tokens, dev_k.shape[-2], 0.0, t_dev, 0.0)


def with_chosen(tier: "DeviceTier", chosen, host_k, host_v, keep):
    """The device tokens plus per-KV-head chosen host tokens, in logical order.

    ``chosen [b, hkv, m]`` host indices (ascending) whose rows are ``host_k``/``host_v
    [b, hkv, m, d]``. Returns keys, values ``[b, hkv, n, d]``, their logical positions
    ``[b, hkv, n]`` (on the keys' device) and the ignore mask (bool ``[b, hkv, n]`` or ``None``).
    """
    dev_k, dev_v = tier.keys, tier.values
    s = tier.sinks_on_device
    b, hkv = dev_k.shape[:2]
    dev_pos = tier.positions(dev_k.device)
    pos = torch.cat([dev_pos[:s].expand(b, hkv, -1), chosen.to(dev_k.device) + s, dev_pos[s:].expand(b, hkv, -1)], -1)
    keys = torch.cat([dev_k[:, :, :s], host_k.to(dev_k.dtype), dev_k[:, :, s:]], dim=2)
    values = torch.cat([dev_v[:, :, :s], host_v.to(dev_v.dtype), dev_v[:, :, s:]], dim=2)
    ignore = None
    if keep is not None:
        ignore = ~keep.gather(1, pos.to(keep.device).reshape(b, -1)).view(b, hkv, -1)
    return keys, values, pos, ignore


def fetch_rows(store, layer_idx: int, chosen: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value rows ``[b, hkv, m, d]`` of host tokens ``chosen [b, hkv, m]`` (CPU int64),
    copied to ``device``."""
    n = int(chosen.max()) + 1 if chosen.numel() else 0
    rows = chosen.unsqueeze(-1).expand(-1, -1, -1, store.head_dim)
    return (
        store.view(layer_idx, "keys", 0, n).gather(2, rows).to(device),
        store.view(layer_idx, "values", 0, n).gather(2, rows).to(device),
    )
