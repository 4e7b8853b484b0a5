"""One prefill, replayed into many engines.

Prefill is the same for every policy — the model's own attention over the whole prompt; a policy
only decides afterwards where the tokens go and may look at the prompt's queries
(:meth:`~hybridgen.policies.Policy.prefill`). So a comparison of many policies on one prompt runs
the prompt once with a :class:`PromptRecorder` as the engine's ``on_prefill`` and places the
recording into each policy's fresh engine (:meth:`PromptRecorder.replay`), exactly as its own
prefill would have. Decoding then runs for real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

__all__ = ["PromptRecorder", "RecordedLayer"]


@dataclass
class RecordedLayer:
    #: ``[b, hq, n, d]``: the prompt's queries (the last ``window`` of them, if bounded).
    query: torch.Tensor
    #: ``[b, hkv, total, d]`` every token's keys and values in logical order (``None``: not kept).
    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    #: bool ``[b, total]`` (True = a real token) or ``None``, and the attention scale.
    keep: Optional[torch.Tensor]
    scale: float


class PromptRecorder:
    """Records what each layer's prompt showed an engine; use as ``engine.on_prefill``.

    Args:
        window: keep only each layer's last ``window`` queries (a prompt run in chunks gives
            several calls per layer: their queries are joined); ``None`` keeps all.
        kv: keep the keys and values too (else the replay takes them from elsewhere, e.g. the
            recording engine's own tiers, and holds no second copy).
    """

    def __init__(self, *, window: Optional[int] = None, kv: bool = True):
        self.window, self.kv = window, kv
        self.layers: dict[int, RecordedLayer] = {}

    def __call__(self, layer: int, query, keys, values, keep, scale: float) -> None:
        prev = self.layers.get(layer)
        q = query if prev is None else torch.cat([prev.query, query], dim=2)
        if self.window is not None:
            q = q[:, :, -self.window :]
        self.layers[layer] = RecordedLayer(
            q.clone(), keys.clone() if self.kv else None, values.clone() if self.kv else None, keep, scale
        )

    def replay(self, engine: "Engine", layer: int, keys=None, values=None, *, place=None) -> None:
        """Places layer ``layer``'s prompt into ``engine`` (``keys``/``values``: the tokens, if not
        recorded here); its policy sees the recorded queries if it looks at prompts. ``place``:
        the front end's own placing call with :meth:`Engine.place_prompt`'s signature."""
        rec = self.layers[layer]
        keys = rec.keys if keys is None else keys
        values = rec.values if values is None else values
        if keys is None:
            raise ValueError(f"layer {layer}: the recorder kept no keys (kv=False): pass them")
        shows_query = engine.policy.uses_prompt_queries
        (place or engine.place_prompt)(layer, keys, values, *((rec.query, rec.keep, rec.scale) if shows_query else ()))
