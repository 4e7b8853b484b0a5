"""The heavy-hitter baselines' prompt scores (``HeavyHitterPolicy.prefill``, causal blocks of
queries) against an independent float64 reference: the full causal softmax over the whole step,
summed over the GQA group and the queries; padding queries hand out nothing, padding keys get
nothing, and the block size changes nothing but float32 rounding."""

import pytest
import torch

from hybridgen import HybridConfig
from hybridgen.engine import Engine, ModelInfo
from hybridgen.policies import heavy_hitter


def reference_scores(q, k, keep, scale):
    """``[b, hkv, n]`` float64: every query ``q [b, hq, nq, d]`` (the last ``nq`` of the ``n``
    tokens) spreads one unit per query head over the keys ``k [b, hkv, n, d]`` it sees."""
    b, hq, nq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    x = torch.einsum("bhqd,bhnd->bhqn", q.double(), k.double().repeat_interleave(g, dim=1)) * scale
    pos = torch.arange(n - nq, n)
    seen = torch.arange(n)[None, :] <= pos[:, None]  # [nq, n]
    real = torch.ones(b, n, dtype=torch.bool) if keep is None else keep
    seen = seen[None] & real[:, None, :]  # [b, nq, n]
    p = torch.softmax(x.masked_fill(~seen[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    p = p * real[:, None, n - nq :, None]  # a padding query hands out no score
    return p.view(b, hkv, g, nq, n).sum(dim=(2, 3))


def prompt_scores(policy, q, k, keep, scale, cached=0):
    """``acc`` after an engine's prefill of ``q``'s tokens, with ``cached`` of ``k``'s tokens
    already in the cache (placed by an earlier step the policy was not shown)."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    info = ModelInfo("llama", layers=1, q_heads=hq, kv_heads=hkv, head_dim=d, max_positions=4 * n)
    eng = Engine(HybridConfig(policy=policy, gpu_budget=8, sinks=2, k=4), info)
    eng.plan(batch=b, dtype=torch.float32, device="cpu", max_tokens=n + 1)
    v = torch.zeros_like(k)
    if cached:
        eng.place(0, k[:, :, :cached], v[:, :, :cached], prompt=True)
    eng.place(0, k[:, :, cached:], v[:, :, cached:], prompt=True)
    eng.prefill(0, q, k, v, keep, scale)
    assert eng.tiers[0].total == n
    return eng.tiers[0].policy_state.acc


def block_budget(b, hq, entries):
    """A block budget (bytes) of ``entries`` logits per query head."""
    return 4 * b * hq * entries


def padding(b, n):
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, :7] = False  # left padding
    keep[-1, n // 2 : n // 2 + 3] = False  # a hole, queries and keys alike
    return keep


CASES = [  # b, hq, hkv, nq, cached, padded
    (1, 4, 4, 40, 0, False),  # no GQA
    (2, 6, 2, 300, 0, False),  # GQA g = 3, many blocks
    (2, 14, 2, 130, 70, False),  # g = 7, the cache holds 70 tokens already
    (3, 6, 2, 200, 0, True),  # padding
    (3, 4, 2, 90, 50, True),  # padding and a cache holding tokens
]


@pytest.mark.parametrize("b, hq, hkv, nq, cached, padded", CASES)
def test_h2o_prompt_scores_equal_the_float64_causal_softmax(monkeypatch, rng, b, hq, hkv, nq, cached, padded):
    d, n = 16, cached + nq
    q = torch.randn(b, hq, nq, d, generator=rng) * 2
    k = torch.randn(b, hkv, n, d, generator=rng)
    keep = padding(b, n) if padded else None
    monkeypatch.setitem(heavy_hitter.PROMPT_BLOCK_BYTES, "cpu", block_budget(b, hq, 150))
    assert len(list(heavy_hitter.prompt_blocks(nq, cached, 4 * b * hq, block_budget(b, hq, 150)))) >= 4
    got = prompt_scores("h2o", q, k, keep, d**-0.5, cached)
    want = reference_scores(q, k, keep, d**-0.5)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    real = torch.full((b,), nq) if keep is None else keep[:, cached:].sum(dim=1)
    total = got.double().sum(dim=-1)  # each real query hands out one unit per query head
    assert torch.allclose(total, (hq // hkv) * real[:, None].double().expand_as(total), rtol=1e-5)
    if keep is not None:
        assert (got[~keep[:, None, :].expand_as(got)] == 0).all(), "padding keys get exactly nothing"


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_the_block_size_changes_nothing_but_rounding(monkeypatch, rng, policy):
    b, hq, hkv, d, n = 2, 6, 2, 16, 160
    q, k = torch.randn(b, hq, n, d, generator=rng), torch.randn(b, hkv, n, d, generator=rng)
    keep = padding(b, n)
    runs = []
    for entries in (1, 300, 5000, None):  # one query per block, a few, several, the default
        if entries is not None:
            monkeypatch.setitem(heavy_hitter.PROMPT_BLOCK_BYTES, "cpu", block_budget(b, hq, entries))
        else:
            monkeypatch.undo()
        runs.append(prompt_scores(policy, q, k, keep, d**-0.5))
        assert torch.isfinite(runs[-1]).all()
    first = runs[0]
    if policy == "h2o":
        for other in runs[1:]:
            assert (other - first).abs().max().item() <= 1e-6 * first.abs().max().item()
    else:
        # Keyformer's noise goes to the entries in block order, so another schedule gives other
        # draws; the totals (each real query hands out one unit per head) stay.
        for other in runs[1:]:
            assert torch.allclose(other.sum(dim=-1), first.sum(dim=-1), rtol=1e-5)
        assert (first[~keep[:, None, :].expand_as(first)] == 0).all()


def test_keyformer_prompt_scores_are_reproducible_and_regularised(rng):
    b, hq, hkv, d, n = 2, 6, 2, 16, 120
    q, k = torch.randn(b, hq, n, d, generator=rng) * 3, torch.randn(b, hkv, n, d, generator=rng)
    keep = padding(b, n)
    a = prompt_scores("keyformer", q, k, keep, d**-0.5)
    assert torch.equal(a, prompt_scores("keyformer", q, k, keep, d**-0.5)), "seeded noise: same scores twice"
    h2o = prompt_scores("h2o", q, k, keep, d**-0.5)
    assert not torch.allclose(a, h2o, atol=1e-3), "the Gumbel noise changes the scores"
    assert torch.allclose(a.sum(dim=-1), h2o.sum(dim=-1), rtol=1e-5), "still one unit per real query and head"
    assert (a[~keep[:, None, :].expand_as(a)] == 0).all(), "padding keys get nothing"


def test_keyformer_prompt_noise_is_one_seeded_gumbel_draw_per_visible_entry(rng):
    """In one block, the draws are the generator's first, in the block's (KV head, group member,
    query, key) order: the float64 reference replays them."""
    b, hq, hkv, d, n = 1, 6, 2, 16, 50
    q, k = torch.randn(b, hq, n, d, generator=rng), torch.randn(b, hkv, n, d, generator=rng)
    assert len(list(heavy_hitter.prompt_blocks(n, 0, 4 * b * hq, heavy_hitter.PROMPT_BLOCK_BYTES["cpu"]))) == 1
    got = prompt_scores("keyformer", q, k, None, d**-0.5)
    g = hq // hkv
    u = torch.rand((b, hkv, g * n, n), generator=torch.Generator().manual_seed(0)).clamp_(1e-20, 1.0)
    zeta = -torch.log(-torch.log(u.double()))  # τ = 1 before any decode step
    x = torch.einsum("bhqd,bhnd->bhqn", q.double(), k.double().repeat_interleave(g, dim=1)) * d**-0.5
    x = x.reshape(b, hkv, g * n, n) + zeta
    future = torch.ones(n, n, dtype=torch.bool).triu(1).repeat(g, 1)  # rows: (group member, query)
    want = torch.softmax(x.masked_fill(future, float("-inf")), dim=-1).sum(dim=2)
    assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_prompt_blocks_cover_the_queries_within_the_budget():
    for nq, before, cap in [(0, 0, 100), (1, 0, 1), (50, 0, 1), (1000, 0, 5000), (300, 4000, 5000), (7, 3, 10**9)]:
        blocks = list(heavy_hitter.prompt_blocks(nq, before, 4, 4 * cap))
        assert [lo for lo, _ in blocks] == [0, *(hi for _, hi in blocks)][: len(blocks)], "contiguous"
        assert (blocks[-1][1] if blocks else 0) == nq
        for lo, hi in blocks:
            assert hi > lo and ((hi - lo) * (before + hi) <= cap or hi - lo == 1)
        lengths = [hi - lo for lo, hi in blocks[:-1]]
        assert lengths == sorted(lengths, reverse=True), "the first block is the longest"
