"""The attention shape of a model, as the engine and the policies need it (no framework types)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
