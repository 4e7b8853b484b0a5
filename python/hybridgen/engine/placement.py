"""Where a layer's tokens live: the one idea every policy and the device tier share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Placement"]


@dataclass(frozen=True)
class Placement:
    """``sinks`` leading tokens and up to ``recent`` (+ ``evict_chunk``) most recent tokens on the
    device, the rest on the host. ``recent=None``: every token stays on the device."""

    sinks: int
    recent: Optional[int]
    evict_chunk: int
