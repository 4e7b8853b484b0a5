"""StepClock: records of a step close together, feed the policy once, and land in telemetry."""

from hybridgen.engine import StepClock
from hybridgen.telemetry import StepRecord


def record(layer: int, t_cpu=1.0, t_gpu=2.0, t_tx=0.5, hidden=0.25) -> StepRecord:
    return StepRecord(
        step=-1,
        layer=layer,
        k=4,
        strategy="post_qkt",
        host_tokens=10,
        device_tokens=5,
        t_cpu=t_cpu,
        t_gpu=t_gpu,
        t_tx=t_tx,
        t_hidden=hidden,
    )


def test_a_step_closes_once_with_summed_times():
    seen = []
    clock = StepClock(lambda *t: seen.append(t))
    clock.close_step()  # nothing recorded: nothing happens
    assert clock.step == 0 and not seen
    for layer in range(3):
        clock.record(record(layer))
    assert clock.open_records == 3 and not clock.telemetry.records
    clock.close_step()
    assert seen == [(6.0, 3 * 0.75, 1.5)], "CPU time hidden by pipelining is not on the critical path"
    assert clock.step == 1 and [r.step for r in clock.telemetry.records] == [0, 0, 0]
    clock.record(record(0))
    clock.close_step()
    assert clock.telemetry.k_per_step() == [(0, 4, "post_qkt"), (1, 4, "post_qkt")]


def test_a_layer_span_becomes_device_time():
    clock = StepClock(lambda *t: None)
    clock.record(record(0, t_cpu=1.0, t_gpu=0.5, t_tx=0.5, hidden=0.0), span=4.0)
    clock.close_step()
    # Everything of the layer's span but the serial CPU stage and the transfer ran on the device.
    assert clock.telemetry.records[0].t_gpu == 2.5
