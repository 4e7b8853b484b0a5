"""CPU attention operations against an independent float64 torch reference.

The reference sees the same inputs as the kernels (keys and values as stored, i.e. rounded to
the storage dtype) and computes in float64. Tolerances, relative to the largest reference
magnitude: 1e-5 for float32 storage, 2e-3 for float16/bfloat16 storage.
"""

import pytest
import reference as ref
import torch

import hybridgen

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (batch, kv_heads, group, head_dim, host tokens)
    (1, 2, 1, 64, 97),
    (3, 1, 2, 80, 33),
    (1, 2, 4, 128, 257),
    (3, 2, 7, 64, 11),
    (1, 4, 2, 128, 1),
]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-3


def assert_close(got, want, rel, what=""):
    scale = max(want.abs().max().item(), 1e-6)
    err = (got.double() - want).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:.0e} × {scale:.3e}"


def store_from_f32(b, hkv, d, n, dtype, gen):
    """A store of ``n`` random host tokens in ``dtype``; returns it with K and V as stored
    (widened to float32)."""
    k = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    v = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    store = hybridgen.HostKVStore(1, b, hkv, d, dtype, near_capacity_bytes=1 << 26, far_capacity_bytes=1 << 27)
    store.append(0, n)
    store.evict(0, k, v)
    return store, k.float(), v.float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,hkv,g,d,n", SHAPES)
def test_logits_all_and_indexed(b, hkv, g, d, n, dtype, rng):
    store, k32, _ = store_from_f32(b, hkv, d, n, dtype, rng)
    q = torch.randn((b, hkv * g, d), generator=rng)
    scale = d**-0.5
    want = ref.logits(q, k32, scale)
    for isa in hybridgen.available_isas():
        assert_close(store.logits(0, q, scale, isa=isa), want, tol(dtype), f"all tokens, {isa}")
    # Pre-QKT: a strided index list per (sequence, kv head), in any order.
    idx = torch.arange(n - 1, -1, -3).expand(b, hkv, -1).contiguous()
    got = store.logits(0, q, scale, idx)
    want_idx = torch.gather(want, 2, ref.expand_kv(idx.unsqueeze(-1), g).squeeze(-1))
    assert_close(got, want_idx, tol(dtype), "indexed")


def test_logits_accept_any_float_query_and_out(rng):
    store, k32, _ = store_from_f32(1, 2, 64, 50, torch.float32, rng)
    q = torch.randn((1, 4, 64), generator=rng)
    out = torch.full((1, 4, 50), float("nan"))
    res = store.logits(0, q.to(torch.bfloat16), 0.5, out=out)
    assert res is out and not out.isnan().any()
    assert_close(out, ref.logits(q.to(torch.bfloat16).float(), k32, 0.5), 1e-5)


@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_matches_torch(k, rng):
    x = torch.randn((3, 5, 64), generator=rng)
    idx, val = hybridgen.topk(x, k)
    want = torch.topk(x, k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx, want)
    assert torch.equal(val, torch.gather(x, 2, want))
    assert (idx[..., 1:] > idx[..., :-1]).all(), "ascending token order"


def test_topk_ties_and_nan_are_deterministic():
    x = torch.tensor([[[1.0, float("nan"), 1.0, 0.5, 1.0]]])
    idx, val = hybridgen.topk(x, 2)
    assert idx.tolist() == [[[0, 2]]]
    assert val.tolist() == [[[1.0, 1.0]]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,hkv,g,d,n", SHAPES)
def test_gather_values(b, hkv, g, d, n, dtype, rng):
    store, _, v32 = store_from_f32(b, hkv, d, n, dtype, rng)
    k = min(n, 6)
    idx = torch.stack([torch.randperm(n, generator=rng)[:k].sort().values for _ in range(b * hkv * g)]).view(
        b, hkv * g, k
    )
    got = store.gather_values(0, idx)
    stored = ref.expand_kv(v32.to(dtype), g)
    want = torch.gather(stored, 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,hkv,g,d,n", SHAPES)
def test_partial_attention_and_merge_equal_full_attention(b, hkv, g, d, n, dtype, rng):
    """Exact mode: CPU partial over host tokens ⊕ partial over 'device' tokens == full softmax."""
    store, k32, v32 = store_from_f32(b, hkv, d, n, dtype, rng)
    hq = hkv * g
    q = torch.randn((b, hq, d), generator=rng)
    scale = d**-0.5
    dev_n = 13  # tokens that stay on the device (computed here with torch)
    dev_k = torch.randn((b, hkv, dev_n, d), generator=rng)
    dev_v = torch.randn((b, hkv, dev_n, d), generator=rng)

    full_logits = ref.logits(q, torch.cat([k32, dev_k], 2), scale)
    full_out, full_lse = ref.attention(full_logits, ref.expand_kv(torch.cat([v32, dev_v], 2), g))

    for isa in hybridgen.available_isas():
        host_logits = store.logits(0, q, scale, isa=isa)
        o_cpu, lse_cpu = store.partial_attention(0, host_logits, isa=isa)
        want_o, want_lse = ref.attention(host_logits, ref.expand_kv(v32.to(dtype), g))
        assert_close(o_cpu, want_o, 1e-5, f"cpu partial {isa}")
        assert_close(lse_cpu, want_lse, 1e-5, f"cpu lse {isa}")

        dev_logits = torch.einsum("bhd,bhnd->bhn", q, ref.expand_kv(dev_k, g)) * scale
        o_dev = torch.einsum("bhn,bhnd->bhd", torch.softmax(dev_logits, -1), ref.expand_kv(dev_v, g))
        lse_dev = torch.logsumexp(dev_logits, -1)
        out, lse = hybridgen.merge_partials(o_dev, lse_dev, o_cpu, lse_cpu)
        assert_close(out, full_out, tol(dtype), f"merged {isa}")
        assert_close(lse, full_lse, tol(dtype), f"merged lse {isa}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_selected_partial_attention_per_head(dtype, rng):
    """Post-QKT: each query head attends over its own top-k tokens."""
    b, hkv, g, d, n, k = 3, 2, 2, 64, 101, 17
    store, _, v32 = store_from_f32(b, hkv, d, n, dtype, rng)
    q = torch.randn((b, hkv * g, d), generator=rng)
    logits = store.logits(0, q, d**-0.5)
    idx, picked = hybridgen.topk(logits, k)
    out, lse = store.partial_attention(0, picked, idx)
    vals = torch.gather(ref.expand_kv(v32.to(dtype), g), 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
    want_o, want_lse = ref.attention(picked, vals)
    assert_close(out, want_o, 1e-5)
    assert_close(lse, want_lse, 1e-5)


def test_fully_masked_partial_is_neutral(rng):
    store, _, _ = store_from_f32(1, 1, 64, 5, torch.float32, rng)
    masked = torch.full((1, 2, 5), float("-inf"))
    out, lse = store.partial_attention(0, masked)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    other = torch.randn((1, 2, 64), generator=rng)
    merged, merged_lse = hybridgen.merge_partials(other, torch.zeros(1, 2), out, lse)
    assert torch.allclose(merged, other) and torch.equal(merged_lse, torch.zeros(1, 2))


def test_merge_of_cpu_tensors_runs_in_the_core_and_equals_float64(monkeypatch):
    """merge_partials of CPU tensors is the core's merge (one CPU implementation), exact against
    the formula in float64, with empty parts and broadcast leading dimensions."""
    from hybridgen import _native, ops

    calls = []
    real = _native.merge_into
    monkeypatch.setattr(_native, "merge_into", lambda *a: (calls.append(1), real(*a))[1])
    g = torch.Generator().manual_seed(3)
    o_a, o_b = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 5, 16, generator=g).half()
    l_a, l_b = torch.randn(2, 3, 5, generator=g) * 4, torch.randn(2, 3, 5, generator=g) * 4
    l_b[0, 0, :2] = float("-inf")
    out, lse = ops.merge_partials(o_a, l_a, o_b, l_b)
    assert calls, "the core's merge ran"
    la, lb = l_a.double(), l_b.double()
    want_lse = torch.logaddexp(la, lb)
    want = torch.exp(la - want_lse)[..., None] * o_a.double() + torch.exp(lb - want_lse)[..., None] * o_b.double()
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert out.dtype == torch.float32 and out.shape == o_a.shape
