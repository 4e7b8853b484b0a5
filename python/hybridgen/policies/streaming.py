"""``streaming`` (StreamingLLM): the attention sinks plus a window of recent tokens, nothing else.

Tokens that leave the window go to the host store like in any policy but are never read again:
a Pre-QKT choice made by position alone, the baseline that any selection has to beat.
"""

from __future__ import annotations

from .base import Policy, device_only


class StreamingPolicy(Policy):
    names = ("streaming",)
    keeps = "sinks + `gpu_budget` recent tokens on the device; older tokens are never read again"
    runs = "device"
    bus = "nothing (evicted tokens only leave)"

    def selection(self):
        return "streaming", 0

    def decode(self, tier, q, keep, scale, step):
        return device_only(tier, q, keep, scale, step, "streaming")
