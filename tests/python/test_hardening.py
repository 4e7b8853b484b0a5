"""No input crashes the process, no panic crosses into Python, no output aliases an input, types are
strict, numerics follow torch, and memory stays bounded. Cases that once crashed or panicked run
in a child process, so a regression fails a test instead of killing the runner."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridgen import HostKVStore, HybridConfig, _native
from hybridgen.ops import merge_partials
from hybridgen.telemetry import StepRecord, Telemetry

HERE = Path(__file__).parent


def child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=HERE,
        env=dict(os.environ, RUST_BACKTRACE="0"),
        timeout=300,
    )


# The calls a fuzzing campaign found crashing (SIGSEGV/SIGABRT) or panicking, with the exception
# each must raise now.
KNOWN = {
    "HostKVStore(layers=2**31)": ("ValueError", "layers", "S(layers=2**31)"),
    "batch whose token size overflows": ("ValueError", "batch", "S(batch=2**61 + 1, far=2**62)"),
    "append 2**40 then token_map": (
        "ValueError",
        "tokens a layer may hold",
        "s = S(); s.append(0, 2**40); s.token_map(0)",
    ),
    "appends that wrap the total": (
        "ValueError",
        "tokens a layer may hold",
        "s = S(); [s.append(0, 2**62) for _ in range(4)]",
    ),
    "attend with zero KV heads": (
        "ValueError",
        "KV heads",
        "_native.attend(z(1,2,8), z(1,0,4,8), z(1,0,4,8), 1.0, z(1,2,8), z(1,2))",
    ),
    "logits out aliasing indices": (
        "ValueError",
        "share memory",
        "s = filled(); buf = torch.zeros(64, dtype=torch.long); "
        "s.logits(0, z(1,2,8), 1.0, buf.view(torch.float32)[:8].view(1,2,4), buf[:8].view(1,2,4))",
    ),
    "gather_values out aliasing indices": (
        "ValueError",
        "share memory",
        "s = filled(); buf = torch.zeros(64, dtype=torch.long); "
        "s.gather_values(0, buf[:8].view(1,2,4), buf.view(torch.float32)[:64].view(1,2,4,8))",
    ),
    "read-only np.memmap output": (
        "ValueError",
        "read-only",
        "a = np.zeros((1,2,8), np.float32); a.setflags(write=False); "
        "_native.attend(z(1,2,8), z(1,1,4,8), z(1,1,4,8), 1.0, a, z(1,2))",
    ),
    "bytes-backed output": (
        "ValueError",
        "read-only",
        "a = np.frombuffer(bytes(64), np.float32).reshape(1,2,8); "
        "_native.attend(z(1,2,8), z(1,1,4,8), z(1,1,4,8), 1.0, a, z(1,2))",
    ),
    "huge int names its argument": ("OverflowError", "layer", "S().host_len(2**70)"),
    "bool as a layer": ("TypeError", "layer", "S().host_len(True)"),
    "bool as a node": ("TypeError", "near_node", "S(near_node=True)"),
}
PRELUDE = """
import numpy as np, torch
from hybridgen import _native
z = torch.zeros
def S(layers=2, batch=1, far=1 << 20, **kw):
    return _native.HostKVStore(layers, batch, 2, 8, "float32", near_capacity_bytes=1 << 20, far_capacity_bytes=far, **kw)
def filled():
    s = S(); s.append(0, 10); s.evict(0, z(1, 2, 10, 8), z(1, 2, 10, 8)); return s
"""


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_crash_and_panic_paths_raise_clear_errors(case):
    kind, words, code = KNOWN[case]
    run = child(
        PRELUDE
        + f"""
try:
    {code}
except BaseException as e:
    print(type(e).__name__, "|", e)
else:
    print("no error")
"""
    )
    assert run.returncode == 0, f"{case}: the process died ({run.returncode}): {run.stderr[-400:]}"
    got = run.stdout.strip()
    assert got.startswith(kind + " |") and words in got, f"{case}: {got}"


def test_a_panic_in_the_core_is_a_runtime_error_not_a_panic_exception():
    with pytest.raises(RuntimeError, match="internal error in hybridgen's core .*deliberate panic"):
        _native._raise_internal_error()


@pytest.mark.slow
def test_the_fuzzer_finds_no_crash_wrong_exception_or_garbage(tmp_path):
    out = tmp_path / "counts.json"
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "fuzz_native.py"),
            "--seed",
            "0",
            "--examples",
            "60",
            "--deadline",
            "90",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, RUST_BACKTRACE="0"),
    )
    last_case = [line for line in run.stdout.splitlines() if line.startswith("case ")][-1:]
    assert run.returncode == 0, f"crash (exit {run.returncode}) at {last_case}: {run.stderr[-600:]}"
    counts = json.loads(out.read_text())
    findings = [line for line in run.stdout.splitlines() if "WRONG EXCEPTION" in line or "GARBAGE" in line]
    assert counts.get("wrong_exception", 0) == 0 and counts.get("garbage", 0) == 0, findings[:10]
    # The run exercised both sides: valid calls checked against torch, and refused ones.
    assert counts["ok"] > 100 and counts["clear"] > 100, counts


# --- types ----------------------------------------------------------------------------------------
def store(**kw):
    return HostKVStore(2, 1, 2, 8, torch.float32, near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 20, **kw)


def test_bools_are_refused_where_integers_are_expected_and_numpy_integers_accepted():
    s = store()
    with pytest.raises(TypeError, match="layer must be an integer, got a bool"):
        s._native.host_len(True)
    with pytest.raises(TypeError, match="k must be an integer"):
        _native.topk(torch.zeros(1, 1, 4), False, torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1))
    assert s._native.host_len(np.int64(1)) == 0
    idx, val = torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2)
    _native.topk(torch.arange(4.0).view(1, 1, 4), np.int32(2), idx, val)
    assert idx.tolist() == [[[2, 3]]]
    with pytest.raises(TypeError, match="layers must be an integer, got str"):
        _native.HostKVStore("2", 1, 2, 8, "float32", near_capacity_bytes=1, far_capacity_bytes=1 << 20)


def test_every_config_field_is_type_checked_by_name():
    for field, value in [
        ("pipeline", "no"),
        ("speculative", 1),
        ("gpu_budget", True),
        ("k", 2.0),
        ("policy", 3),
        ("merge", None),
        ("kernels", b"cuda"),
        ("pin_host", "yes"),
        ("near_node", False),
        ("max_context", "4096"),
        ("sinks", 1.5),
    ]:
        with pytest.raises(TypeError, match=field):
            HybridConfig(**{field: value})
    cfg = HybridConfig(k=np.int64(8), k_min=np.int32(4), gpu_budget=np.uint16(64), near_node=np.int64(0))
    assert type(cfg.k) is int and cfg.k == 8 and type(cfg.gpu_budget) is int and cfg.near_node == 0


def test_documented_store_limits_name_the_argument():
    for kw, word in [
        (dict(layers=5000), "layers"),
        (dict(batch=1 << 17), "batch"),
        (dict(kv_heads=1 << 13), "kv_heads"),
    ]:
        args = dict(layers=2, batch=1, kv_heads=2)
        args.update(kw)
        with pytest.raises(ValueError, match=word):
            HostKVStore(
                args["layers"],
                args["batch"],
                args["kv_heads"],
                8,
                torch.float16,
                near_capacity_bytes=1 << 20,
                far_capacity_bytes=1 << 40,
            )


# --- outputs ----------------------------------------------------------------------------------------
def filled(n=10, seed=0):
    s = store(max_host_tokens=64)
    g = torch.Generator().manual_seed(seed)
    s.append(0, n)
    s.evict(0, torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g))
    return s


def test_outputs_may_not_overlap_any_input():
    s = filled()  # 10 host tokens, 2 KV heads, head_dim 8
    buf = torch.randn(64)
    with pytest.raises(ValueError, match="out must not share memory with q"):
        s._native.logits(0, buf[:16].view(1, 2, 8), 1.0, buf[10:30].view(1, 2, 10))
    with pytest.raises(ValueError, match="out must not share memory with logits"):
        s._native.partial_attention(0, buf[:20].view(1, 2, 10), buf[16:32].view(1, 2, 8), torch.empty(1, 2))
    idx = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="lse must not share memory with indices"):
        s._native.partial_attention(
            0, torch.zeros(1, 2, 4), torch.empty(1, 2, 8), idx.view(torch.float32).view(-1)[:2].view(1, 2), idx
        )
    with pytest.raises(ValueError, match="share memory"):
        _native.topk(buf[:8].view(1, 1, 8), 2, torch.zeros(1, 1, 2, dtype=torch.long), buf[2:4].view(1, 1, 2))
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="share memory"):
        _native.attend(q, torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 1.0, q, torch.empty(1, 2))


def test_read_only_outputs_are_refused():
    s = filled()
    out = np.zeros((1, 2, 10), np.float32)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        s._native.logits(0, torch.randn(1, 2, 8), 1.0, out)
    keys = np.zeros((1, 2, 3, 8), np.float32)
    keys.setflags(write=False)
    with pytest.raises(ValueError, match="keys_out is read-only"):
        s._native.read(0, 0, keys, np.zeros((1, 2, 3, 8), np.float32))


# --- numerics like torch --------------------------------------------------------------------------------
def test_merge_partials_checks_shapes():
    o, l = torch.zeros(2, 3, 8), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="one shape"):
        merge_partials(o, l, torch.zeros(1, 3, 8), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="without the last dimension"):
        merge_partials(o, l, o, torch.zeros(2, 3, 1))
    with pytest.raises(TypeError, match="floating-point"):
        merge_partials(o, l.long(), o, l)


def test_merge_partials_follows_torch_on_empty_nan_and_inf_parts():
    d = 4
    ones = torch.ones(1, d)
    # An empty part (lse -inf) contributes nothing, even if its output holds NaN.
    out, lse = merge_partials(
        torch.full((1, d), float("nan")), torch.tensor([float("-inf")]), ones, torch.tensor([0.0])
    )
    assert torch.equal(out, ones) and lse.item() == 0.0
    # NaN in an attended part propagates; a +inf logit part dominates the LSE, as in torch.
    out, _ = merge_partials(torch.full((1, d), float("nan")), torch.tensor([0.0]), ones, torch.tensor([0.0]))
    assert torch.isnan(out).all()
    _, lse = merge_partials(ones, torch.tensor([float("inf")]), ones, torch.tensor([0.0]))
    assert lse.item() == torch.logsumexp(torch.tensor([float("inf"), 0.0]), 0).item() == float("inf")


def test_non_finite_attention_inputs_are_refused_where_torch_would_give_nan():
    s = filled()
    host_before = s.host_len(0)
    bad = torch.zeros(1, 2, 4, 8)
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="keys holds NaN"):
        s.evict(0, bad, torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="values holds NaN or infinity"):
        s.evict(0, torch.zeros(1, 2, 4, 8), bad.abs() + float("inf"))
    assert s.host_len(0) == host_before  # nothing was stored
    q = torch.randn(1, 2, 8)
    q[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="q holds NaN"):
        s.cpu_stage(0, q, 1.0, "lse")
    with pytest.raises(ValueError, match="q holds NaN"):
        s.logits(0, q, 1.0)
    logits = torch.randn(1, 2, 10)
    logits[0, 1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"logits holds NaN or \+infinity"):
        s.partial_attention(0, logits)
    logits[0, 1, 4] = float("inf")
    with pytest.raises(ValueError, match="logits holds"):
        s.partial_attention(0, logits)
    # -inf is "masked", as everywhere: a fully masked row is zeros with lse -inf, like SDPA.
    logits[:] = float("-inf")
    out, lse = s.partial_attention(0, logits)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


# --- memory ---------------------------------------------------------------------------------------
def test_telemetry_memory_is_bounded_and_summaries_cover_every_step():
    t = Telemetry(max_records=20)
    for step in range(1000):
        for layer in range(2):
            t.add(
                StepRecord(
                    step,
                    layer,
                    k=step % 7,
                    strategy="post_qkt",
                    host_tokens=step,
                    device_tokens=8,
                    t_cpu=0.001,
                    t_gpu=0.002,
                    t_tx=0.0,
                    tx_bytes=10,
                )
            )
    assert len(t.records) == 20 and t.records[-1].step == 999 and len(t.records[:3]) == 3
    s = t.summary()
    assert s["steps"] == 1000 and abs(s["t_cpu_per_step_ms"] - 2.0) < 1e-9 and s["tx_bytes_per_step"] == 20
    assert abs(s["k_mean"] - sum(step % 7 for step in range(1000)) / 1000) < 1e-9
    assert len(t.k_per_step()) == 20 and t.k_per_step()[-1] == (999, 999 % 7, "post_qkt")
    with pytest.raises(ValueError, match="max_records"):
        Telemetry(max_records=0)


# --- concurrency --------------------------------------------------------------------------------------
def test_logits_with_indices_never_fail_while_another_thread_evicts():
    s = store(max_host_tokens=4096)
    s.append(0, 64)
    s.evict(0, torch.ones(1, 2, 64, 8), torch.ones(1, 2, 64, 8))
    idx = torch.arange(16).view(1, 1, 16).expand(1, 2, 16).contiguous()
    q = torch.ones(1, 2, 8)
    errors, stop = [], threading.Event()

    def evictor():
        while not stop.is_set():
            s.append(0, 4)
            s.evict(0, torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8))
            if s.host_len(0) > 3000:
                break

    t = threading.Thread(target=evictor)
    t.start()
    try:
        for _ in range(2000):
            out = torch.empty(1, 2, 16)
            try:
                s.logits(0, q, 1.0, indices=idx, out=out)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            assert errors or torch.all(out == 8.0)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
