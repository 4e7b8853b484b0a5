"""The framework-free decode engine every front end shares.

- :class:`Engine`: config → policy → placement, the step clock and telemetry, the host store,
  the per-layer device tiers and the pipelining worker; ``plan`` once, then ``step`` per layer
  and ``close_step`` per token;
- :class:`DeviceTier`: one layer's tokens on the model's device (sinks + recent), chunked and, on
  a GPU, asynchronous eviction to the host store, masks and positions;
- :class:`StepClock`: per-layer records of a step → telemetry → the policy's feedback;
- :class:`Placement`, :class:`ModelInfo`: where tokens live, the model's attention shape;
- :class:`PromptRecorder`: one prefill recorded and replayed into many engines.

The front ends (:mod:`hybridgen.hf`'s cache, the FlexGen adapter's session) translate their
layouts and call :class:`Engine`; nothing here imports a model framework.
"""

from .clock import StepClock
from .engine import Engine  # last: it makes policies, which use the modules above
from .model_info import ModelInfo
from .placement import Placement
from .prompt import PromptRecorder
from .store import make_store
from .tier import DeviceTier

__all__ = ["DeviceTier", "Engine", "ModelInfo", "Placement", "PromptRecorder", "StepClock", "make_store"]
