"""Step timings that do not stall a GPU.

On a CUDA device a mark is an event recorded on the current stream and a span between two marks
is read (``float(span)``) only when the scheduler needs it, once per step; synchronising around
every timed section would serialise the CPU and the GPU, which is what hybrid attention avoids.
On the CPU a mark is ``time.perf_counter()`` and a span is a plain float.
"""

from __future__ import annotations

import time
from typing import Union

import torch


class Span:
    """Seconds between two CUDA events, resolved on first use."""

    __slots__ = ("start", "end", "_seconds")

    def __init__(self, start: "torch.cuda.Event", end: "torch.cuda.Event"):
        self.start, self.end, self._seconds = start, end, None

    def __float__(self) -> float:
        if self._seconds is None:
            self.end.synchronize()
            self._seconds = self.start.elapsed_time(self.end) / 1e3
        return self._seconds

    def __add__(self, other) -> "Total":
        return Total([self, other])

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"Span({'pending' if self._seconds is None else self._seconds})"


class Total:
    """A sum of spans and floats, resolved on first use."""

    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = list(parts)

    def __float__(self) -> float:
        return sum(float(p) for p in self.parts)

    def __add__(self, other) -> "Total":
        return Total([*self.parts, other])

    __radd__ = __add__


class OpenSpan:
    """A span whose end is marked later, e.g. a decoder layer's forward: started by its pre-hook,
    closed by its post-hook, read (``float``) when the step's records are resolved."""

    __slots__ = ("start", "end")

    def __init__(self, device: torch.device):
        self.start, self.end = mark(device), None

    def close(self, device: torch.device) -> None:
        self.end = mark(device)

    def __float__(self) -> float:
        if self.end is None:
            raise RuntimeError("a layer span was read before the layer finished")
        return float(between(self.start, self.end))


Seconds = Union[float, Span, Total, OpenSpan]


def mark(device: torch.device):
    """A point on ``device``'s timeline (its current stream for CUDA)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def between(start, end) -> Seconds:
    """The time from mark ``start`` to mark ``end``."""
    if isinstance(start, float):
        return end - start
    return Span(start, end)


def seconds(value: Seconds) -> float:
    return float(value)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``: a lazy span between events on CUDA, wall time on the CPU."""
    start = mark(device)
    out = fn()
    return out, between(start, mark(device))
