"""Telemetry: per step/layer records and the run summary computed from them."""

from hybridgen.telemetry import StepRecord, Telemetry


def rec(step, layer, k, strategy="post_qkt", t_cpu=0.002, t_gpu=0.004, t_tx=0.001, hidden=0.0, tx=1024):
    return StepRecord(
        step,
        layer,
        k,
        strategy,
        host_tokens=100 + step,
        device_tokens=20,
        t_cpu=t_cpu,
        t_gpu=t_gpu,
        t_tx=t_tx,
        t_hidden=hidden,
        tx_bytes=tx,
    )


def test_empty_telemetry_says_no_steps():
    t = Telemetry()
    assert t.summary() == {"steps": 0} and t.format_summary() == "no decode steps recorded"


def test_summary_per_step_figures():
    t = Telemetry()
    for step in range(3):
        for layer in range(2):
            t.add(
                rec(
                    step,
                    layer,
                    k=8 * (step + 1),
                    strategy="pre_qkt" if step == 2 else "post_qkt",
                    hidden=0.001 if layer == 0 else 0.0,
                )
            )
    s = t.summary()
    assert s["steps"] == 3 and s["k_last"] == 24 and s["k_mean"] == 16
    assert s["strategy_share"] == {"post_qkt": 4 / 6, "pre_qkt": 2 / 6}
    assert abs(s["t_cpu_per_step_ms"] - 4.0) < 1e-9 and abs(s["t_gpu_per_step_ms"] - 8.0) < 1e-9
    assert abs(s["cpu_hidden_share"] - 0.003 / 0.012) < 1e-9
    assert s["tx_bytes_per_step"] == 2048 and s["host_tokens_last"] == 102
    assert t.k_per_step() == [(0, 8, "post_qkt"), (1, 16, "post_qkt"), (2, 24, "pre_qkt")]
    assert "3 decode steps" in t.format_summary()
    assert len(t.as_dicts()) == 6
    t.clear()
    assert t.summary() == {"steps": 0}
