"""The attention shape of a model, as the engine and the policies need it (no framework types)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    #: Per layer, the sliding window of its attention (``None``: full attention); empty: none.
    windows: tuple[Optional[int], ...] = ()

    def window(self, layer: int) -> Optional[int]:
        return self.windows[layer] if layer < len(self.windows) else None
