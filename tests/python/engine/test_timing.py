"""Step timings on the CPU: marks are wall-clock floats, spans resolve to seconds."""

import time

import pytest
import torch

from hybridgen.timing import OpenSpan, Total, between, mark, seconds, timed

CPU = torch.device("cpu")


def test_cpu_marks_and_spans_are_seconds():
    a = mark(CPU)
    time.sleep(0.01)
    span = between(a, mark(CPU))
    assert isinstance(a, float) and 0.009 < seconds(span) < 1.0


def test_timed_returns_the_result_and_its_time():
    out, t = timed(lambda: sum(range(1000)), CPU)
    assert out == 499500 and 0 <= seconds(t) < 1.0


def test_open_span_is_read_only_once_closed():
    span = OpenSpan(CPU)
    with pytest.raises(RuntimeError, match="before the layer finished"):
        float(span)
    time.sleep(0.005)
    span.close(CPU)
    assert 0.004 < float(span) < 1.0


def test_totals_add_floats_and_spans():
    span = OpenSpan(CPU)
    span.close(CPU)
    total = Total([0.5, span]) + 0.25
    assert abs(float(total) - 0.75 - float(span)) < 1e-12


@pytest.mark.gpu
def test_cuda_spans_are_lazy_events():
    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev)
    _, t = timed(lambda: x @ x, dev)
    assert not isinstance(t, float) and seconds(t) > 0
