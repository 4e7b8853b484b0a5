"""Decode-time KV policies behind one switch, ``HybridConfig(policy=...)``.

hybridgen's own (``all``, ``post_qkt``, ``pre_qkt``, ``scheduler``) and the baselines it is
measured against (``full``, ``aog``, ``aoc``, ``h2o``, ``keyformer``, ``streaming``,
``infinigen``) run through the same cache plumbing, so a comparison changes nothing but the
policy. :func:`table` describes each: what it keeps, where attention runs, what crosses the bus.
"""

from __future__ import annotations

from ..config import POLICIES, HybridConfig
from ..engine.placement import Placement
from .base import Policy
from .exact import AllOnCpuPolicy, AllOnGpuPolicy, FullPolicy
from .heavy_hitter import HeavyHitterPolicy, KeyformerPolicy
from .hybrid import HybridPolicy
from .infinigen import InfiniGenPolicy
from .streaming import StreamingPolicy

__all__ = ["Placement", "Policy", "make_policy", "policy_class", "table"]

_CLASSES = (
    HybridPolicy,
    FullPolicy,
    AllOnGpuPolicy,
    AllOnCpuPolicy,
    HeavyHitterPolicy,
    KeyformerPolicy,
    StreamingPolicy,
    InfiniGenPolicy,
)
_BY_NAME = {name: cls for cls in _CLASSES for name in cls.names}
assert set(_BY_NAME) == set(POLICIES), "every configurable policy has exactly one implementation"


def policy_class(name: str) -> type[Policy]:
    if name not in _BY_NAME:
        raise ValueError(f"unknown policy {name!r}: expected one of {POLICIES}")
    return _BY_NAME[name]


def make_policy(config: HybridConfig, info, worker=None) -> Policy:
    """The policy object serving one engine (``worker``: the engine's thread for pipelined CPU stages)."""
    return policy_class(config.policy)(config, info, worker)


def table() -> list[dict]:
    """One row per policy name: what it keeps, where attention runs, what crosses the bus."""
    rows = []
    for name in POLICIES:
        cls = _BY_NAME[name]
        exact = cls.is_exact(HybridConfig(policy=name))
        rows.append({"policy": name, "keeps": cls.keeps, "attention": cls.runs, "bus": cls.bus, "exact": exact})
    return rows
