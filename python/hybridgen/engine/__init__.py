"""The framework-free decode engine both integrations share.

- :class:`DeviceTier`: one layer's tokens on the model's device (sinks + recent), chunked and,
  on a GPU, asynchronous eviction to the host store, masks and positions;
- :class:`StepClock`: per-layer records of a step → telemetry → the policy's feedback;
  :func:`decode_with` runs one layer's step through a policy;
- :func:`make_store`: the host store, sized and pinned the same way everywhere;
- the policies (:mod:`hybridgen.policies`): ``decode(tier, q, keep, scale, step) -> (out, record)``.

transformers' :class:`~hybridgen.hf.cache.HybridCache` and FlexGen's cache only translate their
layouts and call these.
"""

from .clock import PolicyRunner, StepClock, decode_with
from .model_info import ModelInfo
from .store import make_store
from .tier import DeviceTier

__all__ = ["DeviceTier", "ModelInfo", "PolicyRunner", "StepClock", "decode_with", "make_store"]
