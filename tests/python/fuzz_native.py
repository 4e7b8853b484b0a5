"""A seeded, time-bounded fuzzer of every public native entry point (``hybridgen._native``), run
in its own process by ``test_hardening.py`` so that a crash fails a test instead of killing the
test runner.

Each case is one call with arguments drawn by hypothesis: random shapes (empties and size-1
dimensions included), dtypes, strides (transposed and sliced views), aliasing outputs, read-only
outputs, huge/negative/bool/numpy integers. Every outcome is classified:

  ok               the call returned, and its result equals a float64 torch reference where one
                   applies (``attend``, ``logits``, ``topk``) — a mismatch is ``garbage``;
  clear            ValueError / TypeError / OverflowError / CapacityError, with a message;
  wrong_exception  any other exception (an internal-error RuntimeError, PyO3's PanicException);
  garbage          a result that differs from the reference, or NaN where the reference has none;
  crash            the process died (seen by the parent: this file's last "case" line names it).

    python tests/python/fuzz_native.py --seed 0 --examples 400 --out counts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridgen import _native

CLEAR = (ValueError, TypeError, OverflowError, _native.CapacityError)
COUNTS: Counter = Counter()
EXAMPLES: list = []

# Integers as a careless or hostile caller passes them.
ints = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**40, 2**62, -(2**63), 2**64, 2**70]),
    st.booleans(),
    st.integers(0, 8).map(np.int64),
)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])


def tensor(draw, shape, dtype=torch.float32, allow_weird=True):
    """A tensor of ``shape``; sometimes non-contiguous, sometimes of another dtype, sometimes a
    read-only numpy array."""
    t = torch.randn(*shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 4, shape, dtype=dtype)
    if allow_weird:
        kind = draw(st.sampled_from(["plain"] * 6 + ["transposed", "sliced", "dtype", "readonly"]))
        if kind == "transposed" and t.dim() >= 2:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif kind == "sliced" and t.dim() >= 1 and t.shape[-1] > 0:
            t = torch.cat([t, t], -1)[..., ::2]
        elif kind == "dtype":
            t = t.to(draw(dtypes))
        elif kind == "readonly" and t.dtype in (torch.float32, torch.int64):
            a = t.numpy().copy()
            a.setflags(write=False)
            return a
    return t


def run(name, fn, check=None):
    """Runs one case and classifies it (the parent process sees crashes)."""
    print(f"case {len(EXAMPLES)}: {name}", flush=True)
    EXAMPLES.append(name)
    try:
        result = fn()
    except CLEAR as e:
        COUNTS["clear" if str(e) else "wrong_exception"] += 1
        return
    except BaseException as e:  # noqa: BLE001 - every other exception is a finding
        COUNTS["wrong_exception"] += 1
        print(f"  WRONG EXCEPTION {type(e).__name__}: {e}", flush=True)
        return
    if check is not None and not check(result):
        COUNTS["garbage"] += 1
        print("  GARBAGE: result differs from the reference", flush=True)
        return
    COUNTS["ok"] += 1


def store_of(layers, batch, kv_heads, head_dim, dtype="float32", **kw):
    return _native.HostKVStore(
        layers,
        batch,
        kv_heads,
        head_dim,
        dtype,
        near_capacity_bytes=kw.pop("near", 1 << 20),
        far_capacity_bytes=kw.pop("far", 1 << 21),
        **kw,
    )


# --- cases --------------------------------------------------------------------------------------
@st.composite
def constructor_case(draw):
    args = [draw(ints) for _ in range(4)]
    kw = dict(sinks=draw(ints), max_host_tokens=draw(st.one_of(st.none(), ints)), near=draw(ints), far=draw(ints))
    return args, kw


@st.composite
def store_ops_case(draw):
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        ops.append(
            (
                draw(st.sampled_from(["append", "evict", "spill", "reset", "token_map", "view", "read"])),
                draw(ints),
                draw(ints),
            )
        )
    return ops


def valid_store(batch=1, kv_heads=2, head_dim=8, n=0, seed=0):
    s = store_of(2, batch, kv_heads, head_dim, max_host_tokens=64)
    if n:
        g = torch.Generator().manual_seed(seed)
        s.append(0, n)
        s.evict(
            0,
            torch.randn(batch, kv_heads, n, head_dim, generator=g),
            torch.randn(batch, kv_heads, n, head_dim, generator=g),
        )
    return s


def keys_of(s, layer=0):
    n = s.host_len(layer)
    return torch.from_dlpack(s.view(layer, "keys", 0, n)) if n else None


@st.composite
def logits_case(draw):
    b, hkv, d = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 8, 17]))
    n = draw(st.integers(0, 20))
    g = draw(st.integers(0, 3))
    q = tensor(draw, (draw(st.sampled_from([b, b + 1])), hkv * g, d))
    with_idx = draw(st.booleans())
    m = draw(st.integers(0, 5))
    idx = tensor(draw, (b, hkv, m), torch.int64) if with_idx else None
    alias = draw(st.sampled_from([None, "q", "idx"]))
    return b, hkv, d, n, q, idx, alias, draw(st.sampled_from([None, "scalar", "avx2", "avx512", "neon", "bogus"]))


def fuzz(seed: int, examples: int, deadline_s: float) -> None:
    start = time.monotonic()
    cfg = settings(
        max_examples=examples, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    torch.manual_seed(seed)

    def budget_left():
        return time.monotonic() - start < deadline_s

    @cfg
    @given(constructor_case())
    def constructors(case):
        if budget_left():
            args, kw = case
            run(f"HostKVStore({args}, {kw})", lambda: store_of(*args, "float16", **kw))

    @cfg
    @given(store_ops_case())
    def store_ops(ops):
        if not budget_left():
            return
        s = valid_store()
        for op, a, b in ops:
            if op == "append":
                run(f"append({a}, {b})", lambda: s.append(a, b))
            elif op == "evict":
                m = b if isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 40 else 1
                run(f"evict({a}, m={m})", lambda: s.evict(a, torch.zeros(1, 2, m, 8), torch.zeros(1, 2, m, 8)))
            elif op == "spill":
                run(f"spill_keys({a}, {b})", lambda: s.spill_keys(a, b))
            elif op == "reset":
                run("reset()", s.reset)
            elif op == "token_map":
                run(f"token_map({a})", lambda: s.token_map(a))
            elif op == "view":
                run(f"view({a}, keys, 0, {b})", lambda: s.view(a, "keys", 0, b))
            else:
                run(f"read({a}, {b})", lambda: s.read(a, b, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)))
        # The invariant every sequence must keep: host + device == total, per layer.
        for layer in range(2):
            run(
                f"invariant layer {layer}", lambda: s.host_len(layer) <= s.total_len(layer), check=lambda ok: ok is True
            )

    @cfg
    @given(logits_case())
    def logits(case):
        if not budget_left():
            return
        b, hkv, d, n, q, idx, alias, isa = case
        s = valid_store(b, hkv, d, n)
        hq = q.shape[1] if len(q.shape) == 3 else 0
        width = idx.shape[2] if idx is not None and hasattr(idx, "shape") and len(idx.shape) == 3 else n
        out = torch.empty(b, hq, width)
        if alias == "q" and isinstance(q, torch.Tensor) and q.numel() >= out.numel() and q.dtype == torch.float32:
            out = q.reshape(-1)[: out.numel()].view(out.shape)
        elif (
            alias == "idx"
            and isinstance(idx, torch.Tensor)
            and idx.dtype == torch.int64
            and idx.is_contiguous()
            and 0 < idx.numel() * 2 >= out.numel()
        ):  # viewing int64 as float32 needs a contiguous, non-empty tensor
            out = idx.view(torch.float32).reshape(-1)[: out.numel()].view(out.shape)

        def check(_):
            if not (isinstance(q, torch.Tensor) and q.dtype == torch.float32 and q.is_contiguous()):
                return True  # accepted only if valid: nothing to compare with
            keys = keys_of(s)
            if keys is None:
                return out.numel() == 0
            g = hq // hkv
            want = (
                torch.einsum("bhgd,bhnd->bhgn", q.double().view(b, hkv, g, d), keys.double()).reshape(b, hq, -1) * 0.5
            )
            if idx is not None:
                sel = torch.as_tensor(idx).long().repeat_interleave(g, 1)
                want = want.gather(2, sel)
            return torch.allclose(out.double(), want, rtol=1e-4, atol=1e-4)

        run(
            f"logits(b={b}, hkv={hkv}, d={d}, n={n}, q={tuple(getattr(q, 'shape', ()))}, idx={None if idx is None else tuple(idx.shape)}, alias={alias}, isa={isa})",
            lambda: s.logits(0, q, 0.5, out, idx, isa),
            check,
        )

    @cfg
    @given(
        st.integers(1, 2),
        st.integers(0, 3),
        st.integers(1, 4),
        st.integers(0, 40),
        st.sampled_from([1, 16, 33]),
        st.sampled_from([None, "out=q", "lse=q", "readonly"]),
        st.booleans(),
    )
    def attend(b, hkv, g, n, d, alias, masked):
        if not budget_left():
            return
        hq = hkv * g
        q = torch.randn(b, hq, d)
        k, v = torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
        out, lse = torch.empty(b, hq, d), torch.empty(b, hq)
        if alias == "out=q":
            out = q
        elif alias == "lse=q" and q.numel() >= lse.numel():
            lse = q.reshape(-1)[: lse.numel()].view(lse.shape)
        elif alias == "readonly":
            out = out.numpy()
            out.setflags(write=False)
        mask = (torch.rand(b, n) < 0.3) if masked else None

        def check(_):
            if hkv == 0:
                return False  # must have been refused
            x = torch.einsum("bhgd,bhnd->bhgn", q.double().view(b, hkv, g, d), k.double()) * 0.25
            if mask is not None:
                x = x.masked_fill(mask[:, None, None, :], float("-inf"))
            want_lse = torch.logsumexp(x, -1).reshape(b, hq)
            p = torch.softmax(x, -1).nan_to_num(0.0)
            want = torch.einsum("bhgn,bhnd->bhgd", p, v.double()).reshape(b, hq, d)
            got_o = torch.as_tensor(out).double()
            return torch.allclose(got_o, want, atol=1e-4) and torch.allclose(lse.double(), want_lse, atol=1e-4)

        run(
            f"attend(b={b}, hkv={hkv}, g={g}, n={n}, d={d}, alias={alias}, masked={masked})",
            lambda: _native.attend(q, k, v, 0.25, out, lse, None if mask is None else mask.to(torch.uint8)),
            check,
        )

    @cfg
    @given(
        st.integers(0, 2),
        st.integers(0, 3),
        st.integers(0, 12),
        ints,
        st.sampled_from([None, "values=logits", "idx=logits"]),
    )
    def topk(rows, heads, n, k, alias):
        if not budget_left():
            return
        x = torch.randn(rows, heads, n)
        kk = k if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 0 <= int(k) <= 64 else 1
        idx, val = torch.empty(rows, heads, int(kk), dtype=torch.int64), torch.empty(rows, heads, int(kk))
        if alias == "values=logits" and x.numel() >= val.numel():
            val = x.reshape(-1)[: val.numel()].view(val.shape)
        elif alias == "idx=logits" and x.numel() >= 2 * idx.numel():
            idx = x.reshape(-1)[: 2 * idx.numel()].view(torch.int64).view(idx.shape)

        def check(_):
            want = torch.topk(x, int(kk), dim=-1).values.sort(-1).values
            return torch.equal(val.sort(-1).values, want) and torch.equal(x.gather(-1, idx), val)

        run(
            f"topk(rows={rows}, heads={heads}, n={n}, k={k!r}, alias={alias})",
            lambda: _native.topk(x, k, idx, val),
            check,
        )

    @cfg
    @given(
        st.integers(1, 2),
        st.integers(1, 3),
        st.integers(0, 20),
        st.sampled_from(["lse", "concat", "bogus"]),
        st.one_of(st.none(), ints),
        st.booleans(),
    )
    def cpu_stage(b, hkv, n, merge, top_k, masked):
        if not budget_left():
            return
        s = valid_store(b, hkv, 8, n)
        q = torch.randn(b, 2 * hkv, 8)
        mask = (torch.rand(b, n) < 0.5) if masked else None
        run(
            f"cpu_stage(b={b}, hkv={hkv}, n={n}, merge={merge}, top_k={top_k!r}, masked={masked})",
            lambda: s.cpu_stage(0, q, 0.3, merge, top_k=top_k, host_mask=mask),
        )

    for test in (constructors, store_ops, logits, attend, topk, cpu_stage):
        test()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=300, help="hypothesis examples per entry point")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds for the whole run")
    p.add_argument("--out", default=None, help="JSON file for the counts per outcome")
    args = p.parse_args(argv)
    fuzz(args.seed, args.examples, args.deadline)
    counts = dict(COUNTS, cases=len(EXAMPLES))
    print(json.dumps(counts), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(counts, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
