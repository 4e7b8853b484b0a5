"""Pre-QKT by page summaries: the store's per-page key minima/maxima and the CPU stage's page
selection, against independent float64 torch references.

The references recompute everything from the keys as stored: the summaries by ``amin``/``amax``
over each page, the upper bound ``Σ max(q·max, q·min)``, the page ranking (max over the GQA
group, or per query head) and attention over the chosen pages' tokens.
"""

import pytest
import reference as ref
import torch

import hybridgen
from hybridgen import _native

P = _native.PAGE_TOKENS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = 1e-4


def tensor(x):
    return x if x is None or isinstance(x, torch.Tensor) else torch.from_dlpack(x)


def new_store(b, hkv, d, dtype):
    return hybridgen.HostKVStore(1, b, hkv, d, dtype, near_capacity_bytes=1 << 24, far_capacity_bytes=1 << 25)


def fill(store, keys, values, chunks):
    """Evicts ``keys``/``values [b, hkv, n, d]`` into ``store`` in chunks of the given sizes."""
    start = 0
    for m in chunks:
        store.append(0, m)
        store.evict(0, keys[:, :, start : start + m].contiguous(), values[:, :, start : start + m].contiguous())
        start += m
    assert start == keys.shape[2]


def ref_summaries(keys):
    """``[b, hkv, pages, d]`` maxima and minima of each page of ``P`` tokens (last one partial)."""
    n = keys.shape[2]
    pages = [keys[:, :, p : min(p + P, n)] for p in range(0, n, P)]
    return torch.stack([pg.amax(dim=2) for pg in pages], 2), torch.stack([pg.amin(dim=2) for pg in pages], 2)


def random_chunks(n, gen):
    chunks = []
    while sum(chunks) < n:
        chunks.append(min(int(torch.randint(1, 3 * P, (1,), generator=gen)), n - sum(chunks)))
    return chunks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_summaries_match_pagewise_min_max_after_random_evictions(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, d = 2, 3, 24
    n = int(torch.randint(1, 8 * P, (1,), generator=gen))
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    store = new_store(b, hkv, d, dtype)
    fill(store, keys, keys.clone(), random_chunks(n, gen))
    hi, lo = store.summaries(0)
    want_hi, want_lo = ref_summaries(keys)
    assert hi.shape == (b, hkv, -(-n // P), d)
    # The extremes of stored values are stored values: exact in every dtype.
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)


def test_summaries_forget_a_reset_store_and_follow_new_tokens():
    gen = torch.Generator().manual_seed(7)
    store = new_store(1, 2, 16, torch.float32)
    big = torch.randn((1, 2, 3 * P + 5, 16), generator=gen) + 100.0  # would dominate any max
    fill(store, big, big.clone(), [big.shape[2]])
    store.reset()
    small = torch.randn((1, 2, P + 3, 16), generator=gen)
    fill(store, small, small.clone(), [2, P, 1])
    hi, lo = store.summaries(0)
    want_hi, want_lo = ref_summaries(small)
    assert torch.equal(hi, want_hi) and torch.equal(lo, want_lo)


def ref_pages(keys, q, pages, per_query_head, mask=None):
    """Token lists ``[b, hq, pages·P]`` (ascending, -1 = padding of a partial last page)."""
    b, hkv, n, d = keys.shape
    hq = q.shape[1]
    g = hq // hkv
    hi, lo = ref_summaries(keys.double())
    qd = q.double()
    bound = torch.einsum("bhd,bhpd->bhp", qd.clamp(min=0), ref.expand_kv(hi, g)) + torch.einsum(
        "bhd,bhpd->bhp", qd.clamp(max=0), ref.expand_kv(lo, g)
    )  # [b, hq, pages]
    if not per_query_head:
        bound = bound.view(b, hkv, g, -1).amax(dim=2).repeat_interleave(g, dim=1)
    if mask is not None:
        np_ = bound.shape[-1]
        padded = torch.ones((b, np_ * P), dtype=torch.bool)
        padded[:, :n] = mask.bool()
        dead = padded.view(b, np_, P).all(dim=-1)
        bound = bound.masked_fill(dead.unsqueeze(1), float("-inf"))
    chosen = bound.topk(pages, dim=-1).indices.sort(dim=-1).values  # [b, hq, pages]
    tokens = (chosen.unsqueeze(-1) * P + torch.arange(P)).flatten(2)
    return torch.where(tokens < n, tokens, -1)


def ref_stage(keys, values, q, scale, tokens, mask=None):
    """LSE partial attention of each query head over its token list (padding excluded)."""
    hq, d = q.shape[1], keys.shape[-1]
    g = hq // keys.shape[1]
    safe = tokens.clamp(min=0)
    x = torch.gather(ref.logits(q, keys, scale), 2, safe)
    dead = tokens < 0
    if mask is not None:
        dead = dead | torch.gather(mask.bool().unsqueeze(1).expand(-1, hq, -1), 2, safe)
    x = x.masked_fill(dead, float("-inf"))
    rows = torch.gather(ref.expand_kv(values, g).double(), 2, safe.unsqueeze(-1).expand(-1, -1, -1, d))
    out, lse = ref.attention(x, rows)
    return out, lse, x, rows


def run_stage(store, q, scale, merge, **kw):
    r = store._native.cpu_stage(0, q, scale, merge, **kw)
    return {
        k: tensor(v) if k in ("out", "lse", "logits", "indices", "values", "kv_indices") else v for k, v in r.items()
    }


CASES = [
    # b, hkv, g, d, n, pages
    (1, 2, 3, 32, 10 * P, 2),
    (2, 3, 1, 16, 7 * P + 5, 3),  # partial last page
    (1, 1, 8, 64, 33 * P + 1, 4),
]


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("b,hkv,g,d,n,pages", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_page_stage_attends_the_best_pages(b, hkv, g, d, n, pages, dtype, per_query_head):
    gen = torch.Generator().manual_seed(n + g)
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    # Pages whose keys line up with the query are the ones to find: plant a few.
    q = torch.randn((b, hkv * g, d), generator=gen)
    store = new_store(b, hkv, d, dtype)
    fill(store, keys, values, random_chunks(n, gen))
    scale = d**-0.5
    want_tokens = ref_pages(keys, q, pages, per_query_head)
    want_out, want_lse, want_x, want_rows = ref_stage(keys, values, q, scale, want_tokens)
    lse_run = run_stage(store, q, scale, "lse", pages=pages, per_query_head=per_query_head, indices_out=None)
    assert lse_run["tokens"] == pages * P
    err = (lse_run["out"].double() - want_out).abs().max() / want_out.abs().max()
    assert err < TOL, f"out differs by {err:.2e}"
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse_run["lse"].double()[finite], want_lse[finite], atol=TOL * 10)
    concat = run_stage(store, q, scale, "concat", pages=pages, per_query_head=per_query_head)
    idx = concat["indices"]
    real = want_tokens >= 0
    assert torch.equal(idx[real], want_tokens[real])
    got_x = concat["logits"].double()
    assert torch.equal(torch.isinf(got_x), torch.isinf(want_x))
    live = torch.isfinite(want_x)
    assert torch.allclose(got_x[live], want_x[live], atol=TOL * 10)
    assert torch.equal(concat["values"].double()[real], want_rows[real])


@pytest.mark.parametrize("per_query_head", [False, True])
@pytest.mark.parametrize("top_k", [1, 20, 47, 48, 60])
def test_top_k_keeps_the_best_scored_tokens_of_the_chosen_pages(top_k, per_query_head):
    gen = torch.Generator().manual_seed(top_k)
    b, hkv, g, d, n, pages = 2, 2, 3, 32, 12 * P + 9, 3
    keys = torch.randn((b, hkv, n, d), generator=gen)
    values = torch.randn((b, hkv, n, d), generator=gen)
    q = torch.randn((b, hkv * g, d), generator=gen)
    store = new_store(b, hkv, d, torch.float32)
    fill(store, keys, values, [n])
    scale = d**-0.5
    lists = ref_pages(keys, q, pages, per_query_head)  # [b, hq, 48]
    x = torch.gather(ref.logits(q, keys, scale), 2, lists.clamp(min=0)).masked_fill(lists < 0, float("-inf"))
    k = min(top_k, lists.shape[-1])
    order = torch.sort(-x, dim=-1, stable=True).indices[..., :k].sort(dim=-1).values
    chosen = torch.gather(lists, 2, order)
    want_out, want_lse, *_ = ref_stage(keys, values, q, scale, chosen)
    got = run_stage(store, q, scale, "lse", pages=pages, top_k=top_k, per_query_head=per_query_head, indices_out=None)
    assert got["tokens"] == k
    assert (got["out"].double() - want_out).abs().max() < TOL
    assert torch.allclose(got["lse"].double(), want_lse, atol=TOL * 10)
    concat = run_stage(store, q, scale, "concat", pages=pages, top_k=top_k, per_query_head=per_query_head)
    assert torch.equal(concat["indices"], chosen)


def test_the_bound_is_an_upper_bound_of_every_logit_in_the_page():
    gen = torch.Generator().manual_seed(3)
    b, hkv, g, d, n = 1, 2, 4, 32, 20 * P + 7
    keys = torch.randn((b, hkv, n, d), generator=gen)
    q = torch.randn((b, hkv * g, d), generator=gen)
    hi, lo = ref_summaries(keys.double())
    bound = torch.einsum("bhd,bhpd->bhp", q.double().clamp(min=0), ref.expand_kv(hi, g)) + torch.einsum(
        "bhd,bhpd->bhp", q.double().clamp(max=0), ref.expand_kv(lo, g)
    )
    x = ref.logits(q, keys, 1.0)
    padded = torch.full((b, hkv * g, bound.shape[-1] * P), float("-inf"), dtype=torch.float64)
    padded[..., :n] = x
    assert (padded.view(b, hkv * g, -1, P).amax(dim=-1) <= bound + 1e-9).all()
    # ...so a page holding a key aligned with a query head's query ranks first for that head.
    planted = [37, 250]  # one token per KV head
    for kh, t in enumerate(planted):
        keys[0, kh, t] = 4 * q[0, kh * g]
    store = new_store(b, hkv, d, torch.float32)
    fill(store, keys, keys.clone(), [n])
    for per_query_head in (False, True):
        chosen = run_stage(store, q, 1.0, "concat", pages=2, per_query_head=per_query_head)["indices"]
        for kh, t in enumerate(planted):
            assert t in set(chosen[0, kh * g].tolist())


def test_masked_pages_rank_last_and_masked_tokens_weigh_nothing():
    gen = torch.Generator().manual_seed(11)
    b, hkv, g, d, n, pages = 2, 2, 2, 16, 9 * P + 3, 3
    keys = torch.randn((b, hkv, n, d), generator=gen)
    values = torch.randn((b, hkv, n, d), generator=gen)
    q = torch.randn((b, hkv * g, d), generator=gen)
    mask = torch.zeros((b, n), dtype=torch.bool)
    mask[0, : 4 * P] = True  # sequence 0: left padding over whole pages
    mask[1, 5] = True  # sequence 1: one token inside a page
    store = new_store(b, hkv, d, torch.float32)
    fill(store, keys, values, [n])
    want_tokens = ref_pages(keys, q, pages, False, mask)
    want_out, want_lse, *_ = ref_stage(keys, values, q, d**-0.5, want_tokens, mask)
    got = run_stage(store, q, d**-0.5, "lse", pages=pages, host_mask=mask)
    assert (got["out"].double() - want_out).abs().max() < TOL
    assert torch.allclose(got["lse"].double(), want_lse, atol=TOL * 10)
    assert (run_stage(store, q, 1.0, "concat", pages=pages, host_mask=mask)["indices"][0] >= 4 * P).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_keeping_every_page_is_exact(dtype):
    gen = torch.Generator().manual_seed(5)
    b, hkv, g, d, n = 1, 2, 3, 32, 5 * P + 2
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    q = torch.randn((b, hkv * g, d), generator=gen)
    store = new_store(b, hkv, d, dtype)
    fill(store, keys, values, [n])
    x = ref.logits(q, keys, d**-0.5)
    want_out, want_lse = ref.attention(x, ref.expand_kv(values, g))
    for pages in (6, 100):
        got = run_stage(store, q, d**-0.5, "lse", pages=pages)
        assert got["tokens"] == n
        assert (got["out"].double() - want_out).abs().max() < TOL
        assert torch.allclose(got["lse"].double(), want_lse, atol=TOL * 10)


def test_bad_page_arguments_are_value_errors():
    gen = torch.Generator().manual_seed(0)
    store = new_store(1, 2, 8, torch.float32)
    keys = torch.randn((1, 2, 4 * P, 8), generator=gen)
    fill(store, keys, keys.clone(), [4 * P])
    q = torch.randn((1, 4, 8), generator=gen)
    with pytest.raises(ValueError, match="pages"):
        store._native.cpu_stage(0, q, 1.0, "lse", pages=0)
    with pytest.raises(ValueError, match="no positions"):
        store._native.cpu_stage(0, q, 1.0, "lse", pages=2, positions=torch.arange(3))


def ref_kv_top(x, tokens, g, k):
    """Per KV head the ``k`` entries with the highest logit over the group (stable), as tokens."""
    b, hq, m = x.shape
    best = x.view(b, hq // g, g, m).amax(dim=2)
    order = torch.sort(-best, dim=-1, stable=True).indices[..., :k]
    return torch.gather(tokens, 2, order).sort(dim=-1).values


@pytest.mark.parametrize("seed", range(3))
def test_extra_tokens_are_scored_once_beside_the_pages(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    b, hkv, g, d, n, pages, top_k = 2, 2, 3, 32, 11 * P + 7, 2, 24
    keys = torch.randn((b, hkv, n, d), generator=gen)
    values = torch.randn((b, hkv, n, d), generator=gen)
    q = torch.randn((b, hkv * g, d), generator=gen)
    store = new_store(b, hkv, d, torch.float32)
    fill(store, keys, values, random_chunks(n, gen))
    scale = d**-0.5
    paged = ref_pages(keys, q, pages, False)[:, ::g]  # [b, hkv, pages·P], -1 = padding
    extra = torch.randint(0, n, (b, hkv, 20), generator=gen)
    extra[..., 1] = extra[..., 0]  # a repeat
    extra[..., 2] = paged[..., 3]  # a token of a chosen page
    lists = torch.cat([paged, extra], dim=-1)
    dead = lists < 0
    for i in range(b):
        for h in range(hkv):
            seen = set(paged[i, h][paged[i, h] >= 0].tolist())
            for j, t in enumerate(extra[i, h].tolist()):
                dead[i, h, paged.shape[-1] + j] = t in seen
                seen.add(t)
    x = torch.gather(ref.logits(q, keys, scale), 2, lists.clamp(min=0).repeat_interleave(g, 1))
    x = x.masked_fill(dead.repeat_interleave(g, 1), float("-inf"))
    order = torch.sort(-x, dim=-1, stable=True).indices[..., :top_k].sort(dim=-1).values
    chosen = torch.gather(lists.repeat_interleave(g, 1), 2, order)
    want_out, want_lse, *_ = ref_stage(keys, values, q, scale, chosen)
    kv_out = torch.empty((b, hkv, top_k), dtype=torch.int64)
    got = run_stage(
        store, q, scale, "lse", pages=pages, top_k=top_k, page_extra=extra, indices_out=None, kv_indices_out=kv_out
    )
    assert got["tokens"] == top_k
    assert (got["out"].double() - want_out).abs().max() < TOL
    assert torch.allclose(got["lse"].double(), want_lse, atol=TOL * 10)
    assert torch.equal(got["kv_indices"], ref_kv_top(x, lists, g, top_k))
    assert got["kv_indices"] is kv_out


def test_post_qkt_ranks_the_kv_heads_and_no_narrowing_writes_no_ranking():
    gen = torch.Generator().manual_seed(9)
    b, hkv, g, d, n, top_k = 1, 3, 2, 16, 5 * P, 10
    keys = torch.randn((b, hkv, n, d), generator=gen)
    q = torch.randn((b, hkv * g, d), generator=gen)
    store = new_store(b, hkv, d, torch.float32)
    fill(store, keys, keys.clone(), [n])
    x = ref.logits(q, keys, 1.0)
    got = run_stage(store, q, 1.0, "lse", top_k=top_k, kv_indices_out=torch.empty(b * hkv * top_k, dtype=torch.int64))
    assert torch.equal(got["kv_indices"], ref_kv_top(x, torch.arange(n).expand(b, hkv, n), g, top_k))
    whole = run_stage(store, q, 1.0, "lse", top_k=n, kv_indices_out=torch.empty(b * hkv * n, dtype=torch.int64))
    assert whole["kv_indices"] is None
    with pytest.raises(ValueError, match="page_extra needs pages"):
        store._native.cpu_stage(0, q, 1.0, "lse", top_k=4, page_extra=torch.zeros((1, 3, 2), dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        store._native.cpu_stage(0, q, 1.0, "lse", pages=1, page_extra=torch.full((1, 3, 2), n, dtype=torch.int64))
