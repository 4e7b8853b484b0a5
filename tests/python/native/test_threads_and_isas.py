"""The CPU kernels' settings seen from Python: ``HYBRIDGEN_THREADS`` sizes the pool (read once,
at first use, so each setting runs in a fresh interpreter), and every instruction set the CPU
runs gives the fused partial attention within float32 rounding of a float64 reference."""

import os
import subprocess
import sys

import pytest
import torch

import hybridgen
from hybridgen import _native


def threads_in_child(value):
    env = dict(os.environ)
    env.pop("HYBRIDGEN_THREADS", None)
    if value is not None:
        env["HYBRIDGEN_THREADS"] = value
    code = "import hybridgen; print(hybridgen.num_threads())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip()), done.stderr


def test_hybridgen_threads_sets_the_pool_size():
    assert threads_in_child("1")[0] == 1
    assert threads_in_child("3")[0] == 3
    default = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads_in_child(None)[0] == default
    n, err = threads_in_child("lots")
    assert n == default and "HYBRIDGEN_THREADS" in err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_partial_attention_on_every_isa(dtype):
    gen = torch.Generator().manual_seed(3)
    b, hkv, g, d, n = 2, 2, 4, 64, 5000  # more than one task block of rows
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    store = hybridgen.HostKVStore(1, b, hkv, d, dtype, near_capacity_bytes=1 << 26, far_capacity_bytes=1 << 26)
    store.append(0, n)
    store.evict(0, keys, values)
    q = torch.randn((b, hkv * g, d), generator=gen)
    scale = d**-0.5
    mask = torch.rand((b, n), generator=gen) < 0.1
    kf, vf = keys.double().repeat_interleave(g, 1), values.double().repeat_interleave(g, 1)
    x = torch.einsum("bhd,bhnd->bhn", q.double(), kf) * scale
    x = x.masked_fill(mask[:, None, :], float("-inf"))
    want_lse = torch.logsumexp(x, -1)
    want = torch.einsum("bhn,bhnd->bhd", torch.softmax(x, -1), vf)
    for isa in hybridgen.available_isas():
        r = store.cpu_stage(0, q, scale, "lse", host_mask=mask.to(torch.uint8), isa_name=isa)
        out, lse = (torch.from_dlpack(r[k]) if not isinstance(r[k], torch.Tensor) else r[k] for k in ("out", "lse"))
        assert torch.allclose(out.double(), want, atol=2e-5 * want.abs().max().item()), isa
        assert torch.allclose(lse.double(), want_lse, rtol=2e-5), isa


def test_unknown_or_unsupported_isa_is_an_error():
    store = hybridgen.HostKVStore(1, 1, 1, 8, torch.float16, near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 20)
    q = torch.zeros((1, 1, 8))
    with pytest.raises(ValueError, match="unknown isa"):
        store.logits(0, q, 1.0, isa="sse9")
    missing = [i for i in ("scalar", "avx2", "avx512", "neon") if i not in _native.available_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match="not supported"):
            store.logits(0, q, 1.0, isa=isa)
