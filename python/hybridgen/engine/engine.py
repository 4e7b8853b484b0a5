"""The decode engine: one object owns everything a decode step needs, for any front end.

``Engine(config, info)`` holds the configuration, the policy it makes and the placement that
policy asks for, the step clock with its telemetry, the host store, one device tier per layer
and (with ``pipeline``) the worker thread that runs CPU stages beside the device. A front end
(:mod:`hybridgen.hf`'s cache, the FlexGen adapter's session, a serving engine) only translates
its layout into these calls::

    engine.plan(batch=b, dtype=torch.float16, device="cuda")   # once: store, tiers, buffers
    engine.place(layer, k, v, prompt=True)                     # the prompt's tokens to their tiers
    engine.prefill(layer, q, k, v, keep, scale)                # optional: show the policy the prompt
    # per decode token, per layer:
    engine.place(layer, k_new, v_new)                          # the step's token, on the device
    out = engine.step(layer, q, keep, scale)                   # policy → attention output
    engine.close_step()                                        # optional: the token is done

Masks are the engine's own: ``keep`` bool ``[b, total]`` (True = attend; ``None``: attend to
every token). Speculation takes a query *estimate* the front end computed
(:meth:`Engine.speculate`). Nothing here knows a model framework.
"""

from __future__ import annotations

import weakref
from concurrent.futures import Executor
from typing import Callable, Optional, Sequence

import torch

from .. import policies
from ..config import HybridConfig
from .clock import StepClock
from .model_info import ModelInfo
from .store import make_store
from .tier import DeviceTier

__all__ = ["Engine"]

#: ``(layer, query, keys, values, keep, scale)``: what a prompt showed the engine (see ``on_prefill``).
PrefillObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], float], None]


class Engine:
    """The decode engine of one model (see the module docstring).

    Args:
        config: budgets, policy, merge, pipelining (:class:`~hybridgen.HybridConfig`).
        info: the model's attention shape.
    """

    def __init__(self, config: HybridConfig, info: ModelInfo, *, clock: Optional[StepClock] = None):
        self.info = info
        self.store = None
        self.tiers: list[DeviceTier] = []
        #: Telemetry label of each tier's records (FlexGen: its own layer ids).
        self.labels: list[int] = []
        #: Steps and telemetry (``clock``: one shared with an earlier engine, e.g. of another
        #: generation's shape; its owner feeds this engine's policy).
        # The clock calls back through a weak reference: the engine owns its clock, and a bound
        # method would make a cycle that keeps the host store's memory until Python's cyclic
        # collector runs.
        self.clock = StepClock(_weak_method(self._observe)) if clock is None else clock
        #: Called with every prompt the engine sees (:meth:`prefill`), e.g. to record it once and
        #: replay it into many engines; stays when the policy changes.
        self.on_prefill: Optional[PrefillObserver] = None
        self._worker: Optional[Executor] = None
        self.policy: Optional[policies.Policy] = None
        self.set_config(config)

    # --- configuration --------------------------------------------------------------------------
    def set_config(self, config: HybridConfig) -> None:
        """Serves the following steps with ``config``'s policy (a fresh one: scores and the
        scheduler's state start over; the step count and telemetry carry on). Once tokens are
        placed, the placement must not change."""
        if not isinstance(config, HybridConfig):
            raise TypeError(f"config must be a HybridConfig, got {type(config).__name__}")
        config.validate()
        policy = policies.make_policy(config, self.info, worker=self.worker if config.pipeline else None)
        placement = policy.placement()
        if self.store is not None and placement != self.placement:
            raise ValueError(
                f"policy {config.policy!r} places tokens as {placement}, but this engine holds them as "
                f"{self.placement}: make a new one"
            )
        self.config, self.policy, self.placement = config, policy, placement
        for tier in self.tiers:
            tier.policy_state = None

    @property
    def exact(self) -> bool:
        """Whether the engine's output equals full attention (up to rounding)."""
        return type(self.policy).is_exact(self.config)

    @property
    def worker(self) -> Executor:
        """The thread that runs this engine's pipelined CPU stages (one: consecutive layers queue)."""
        if self._worker is None:
            self._worker = policies.base.new_worker()
            weakref.finalize(self, self._worker.shutdown, wait=False)
        return self._worker

    # --- plan -----------------------------------------------------------------------------------
    @property
    def planned(self) -> bool:
        return self.store is not None

    def plan(
        self,
        *,
        batch: int,
        dtype: torch.dtype,
        device,
        max_tokens: Optional[int] = None,
        layers: Optional[int] = None,
        labels: Optional[Sequence[int]] = None,
    ) -> None:
        """Sets up what every step reuses: the host store (``layers`` layers, default the model's,
        of ``batch`` sequences of up to ``max_tokens`` tokens, default ``config.max_context`` or
        the model's maximum), one device tier per layer, and the CPU stage's output buffers.
        Planning again with the same shape keeps everything; another shape is an error."""
        layers = self.info.layers if layers is None else layers
        if self.store is not None:  # every layer's update comes here: checks only, nothing built
            if dtype != self.store.dtype:
                raise ValueError(f"keys arrive as {dtype} but this engine stores {self.store.dtype}: make a new one")
            if batch != self.store.batch:
                raise ValueError(f"batch size changed from {self.store.batch} to {batch}: make a new one")
            if layers != self.store.layers:
                raise ValueError(f"this engine was planned for {self.store.layers} layers, not {layers}")
            return
        device = torch.device(device)
        c, info = self.config, self.info
        self.store = make_store(
            c,
            layers=layers,
            batch=batch,
            kv_heads=info.kv_heads,
            head_dim=info.head_dim,
            dtype=dtype,
            max_tokens=max_tokens or c.max_context or info.max_positions,
            sinks=self.placement.sinks,
            device=device,
            to_host=self.placement.recent is not None,
        )
        self.device = device
        if device.type == "cuda" and cuda_kernels_here():
            # Compile and load the kernels now (or read them from the on-disk cache), not in
            # the first decode step.
            from ..cuda import warmup

            warmup(device)
        self.labels = list(range(layers)) if labels is None else list(labels)
        self.tiers = [DeviceTier(self.store, i, self.placement, window=info.window(i)) for i in range(layers)]
        if device.type == "cpu":
            # The LSE merge's host partial, written in place every step (on CUDA the host result is
            # copied to the device asynchronously: reusing its memory would need a fence).
            for tier in self.tiers:
                tier.buffers = {
                    "out": torch.empty((batch, info.q_heads, info.head_dim), dtype=torch.float32),
                    "lse_out": torch.empty((batch, info.q_heads), dtype=torch.float32),
                }

    def tier(self, layer: int) -> DeviceTier:
        if not self.tiers:
            raise RuntimeError("the engine is not planned yet: call plan() (the first tokens do)")
        return self.tiers[layer]

    # --- tokens ---------------------------------------------------------------------------------
    def place(self, layer: int, keys: torch.Tensor, values: torch.Tensor, *, prompt: bool = False) -> None:
        """Adds tokens ``[b, hkv, m, d]`` after ``layer``'s last one. A prompt's overflow goes to
        the host at once; a decode token's after its step (:meth:`step`)."""
        self.tier(layer).append(keys, values)
        if prompt:
            self.evict_overflow(layer, force=True)

    def evict_overflow(self, layer: int, force: bool = False) -> None:
        """Moves ``layer``'s oldest recent tokens beyond the budget to the host (all of them when
        ``force``d, else in chunks of ``evict_chunk``). :meth:`step` does it after each decode."""
        self.tier(layer).evict_overflow(force)

    def prefill(
        self,
        layer: int,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: Optional[torch.Tensor],
        scale: float,
    ) -> None:
        """Shows the policy a multi-token step: ``query [b, hq, n, d]`` and every token's
        ``keys``/``values [b, hkv, total, d]`` in logical order (the step's own last), ``keep``
        bool ``[b, total]`` (True = a real token; causal order is implied)."""
        if self.on_prefill is not None:
            self.on_prefill(layer, query, keys, values, keep, scale)
        self.policy.prefill(self.tier(layer), query, keys, values, keep, scale)

    def place_prompt(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, query=None, keep=None, scale: Optional[float] = None
    ) -> None:
        """Places a prompt recorded elsewhere (``keys``/``values [b, hkv, n, d]``) as the engine's
        own prefill would, and shows the policy ``query`` if given (one prefill replayed into many
        engines: the speed harness, the accuracy evaluations)."""
        self.place(layer, keys, values, prompt=True)
        if query is not None:
            self.policy.prefill(self.tiers[layer], query, keys, values, keep, scale)

    # --- decode ---------------------------------------------------------------------------------
    def wants_query_estimate(self, layer: int) -> bool:
        """Whether :meth:`speculate` for ``layer`` would be used (saves the estimate's projection)."""
        if not (self.policy.uses_query_estimate and self.tiers):
            return False
        tier = self.tiers[layer]
        return tier.host_tokens > 0 and not tier.window_on_device

    def speculate(self, layer: int, q_estimate: torch.Tensor, keep: Optional[torch.Tensor], scale: float) -> None:
        """Hands the policy an estimate ``[b, hq, d]`` of ``layer``'s coming query, made before that
        layer runs (e.g. from the previous layer's input); ``keep`` bool ``[b, total + 1]`` is the
        coming step's mask. A pipelining policy starts the CPU stage from it at once."""
        tier = self.tier(layer)
        tier.settle()
        self.policy.speculate(tier, q_estimate, keep, scale)

    def step(
        self, layer: int, q: torch.Tensor, keep: Optional[torch.Tensor] = None, scale: float = 1.0, span=None
    ) -> torch.Tensor:
        """One decode query ``q [b, hq, d]`` of ``layer`` over its tokens (the step's own token
        placed first): the attention output ``[b, hq, d]`` (float32). ``keep`` bool ``[b, total]``;
        ``span``: the whole layer's time, if the front end measures it. Afterwards the oldest
        recent tokens beyond the budget move to the host."""
        tier = self.tier(layer)
        self.clock.begin(layer)
        out, record = self.policy.decode(tier, q, keep, scale, self.clock.step)
        record.layer = self.labels[layer]
        if self.store.pin_device is not None:  # a Python attribute: no native call on the CPU path
            record.pinned_bytes = self.store.layer_pinned_bytes(layer)
        self.clock.record(record, span, layer)
        tier.evict_overflow()
        return out

    def close_step(self) -> None:
        """Closes the step in progress: its times go to the telemetry and to the policy."""
        self.clock.close_step()

    def _observe(self, t_gpu: float, t_cpu: float, t_tx: float) -> None:
        self.policy.observe(t_gpu, t_cpu, t_tx)

    # --- state ----------------------------------------------------------------------------------
    def settle(self) -> None:
        """Completes every tier's in-flight eviction (e.g. before inspecting the store)."""
        for tier in self.tiers:
            tier.settle()

    def reset(self) -> None:
        """Forgets every token (a new sequence batch); the plan, the policy and the step count stay."""
        self.close_step()
        for tier in self.tiers:
            tier.reset()
        if self.store is not None:
            self.store.reset()

    @property
    def telemetry(self):
        return self.clock.telemetry

    @property
    def steps(self) -> int:
        """Decode steps closed so far."""
        return self.clock.step

    @property
    def scheduler(self):
        """The native feedback scheduler of the ``scheduler`` policy, else ``None``."""
        return getattr(self.policy, "scheduler", None)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Engine(policy={c.policy!r}, gpu_budget={c.gpu_budget}, sinks={c.sinks}, merge={c.merge!r}, "
            f"layers={len(self.tiers) or self.info.layers}, planned={self.planned}, steps={self.steps})"
        )


def cuda_kernels_here() -> bool:
    """Whether the CUDA kernels can run on this machine (driver, device and NVRTC found)."""
    from ..cuda import probe

    return bool(probe()["available"])


def _weak_method(method):
    """``method`` (bound) called through a weak reference to its object (a no-op once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        bound = ref()
        if bound is not None:
            bound(*args, **kwargs)

    return call
