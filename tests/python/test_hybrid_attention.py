"""One hybrid decode step (device tier in torch + host tier in the store) against full softmax
attention over all tokens, in both merge modes, with GQA, sinks and left-padding masks."""

import pytest
import reference as ref
import torch

import hybridgen
from hybridgen.attention import hybrid_attention


def setup(b, hkv, g, d, n, sinks, budget, dtype, gen):
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    store = hybridgen.HostKVStore(
        1, b, hkv, d, dtype, sinks=sinks, near_capacity_bytes=1 << 24, far_capacity_bytes=1 << 25
    )
    store.append(0, n)
    store.evict(0, keys[:, :, sinks : n - budget].contiguous(), values[:, :, sinks : n - budget].contiguous())
    dev = torch.cat([torch.arange(sinks), torch.arange(n - budget, n)])
    q = torch.randn((b, hkv * g, d), generator=gen)
    return store, keys, values, keys[:, :, dev], values[:, :, dev], q


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "b,hkv,g,d,n,sinks,budget", [(1, 2, 4, 64, 300, 4, 32), (3, 1, 7, 80, 99, 0, 10), (2, 2, 1, 128, 65, 2, 1)]
)
def test_exact_mode_equals_full_attention(merge, dtype, b, hkv, g, d, n, sinks, budget, rng):
    store, keys, values, dk, dv, q = setup(b, hkv, g, d, n, sinks, budget, dtype, rng)
    scale = d**-0.5
    want, _ = ref.attention(ref.logits(q, keys.float(), scale), ref.expand_kv(values.float(), g))
    got = hybrid_attention(q, dk, dv, store, 0, scale=scale, sinks=sinks, merge=merge)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_left_padding_masks(merge, rng):
    b, hkv, g, d, n, sinks, budget = 2, 2, 2, 64, 120, 0, 16
    store, keys, values, dk, dv, q = setup(b, hkv, g, d, n, sinks, budget, torch.float32, rng)
    pad = torch.tensor([0, 37])  # sequence 1 starts at position 37
    mask = torch.arange(n).unsqueeze(0) < pad.unsqueeze(1)  # [b, n], True = padding
    scale = d**-0.5
    x = ref.logits(q, keys, scale).masked_fill(mask.view(b, 1, n), float("-inf"))
    want, _ = ref.attention(x, ref.expand_kv(values, g))
    got = hybrid_attention(
        q,
        dk,
        dv,
        store,
        0,
        scale=scale,
        sinks=sinks,
        merge=merge,
        host_mask=mask[:, sinks : n - budget],
        dev_mask=mask[:, n - budget :],
    )
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_top_k_equals_attention_over_the_selected_tokens(merge, rng):
    b, hkv, g, d, n, sinks, budget, k = 1, 2, 2, 64, 200, 2, 20, 25
    store, keys, values, dk, dv, q = setup(b, hkv, g, d, n, sinks, budget, torch.float32, rng)
    scale = d**-0.5
    full = ref.logits(q, keys, scale)  # [b, hq, n]
    host = full[..., sinks : n - budget]
    keep = torch.zeros_like(full, dtype=torch.bool)
    keep[..., :sinks] = True
    keep[..., n - budget :] = True
    top = torch.topk(host, k, dim=-1).indices + sinks
    keep.scatter_(2, top, True)
    want, _ = ref.attention(full.masked_fill(~keep, float("-inf")), ref.expand_kv(values, g))
    got = hybrid_attention(q, dk, dv, store, 0, scale=scale, sinks=sinks, merge=merge, top_k=k)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_empty_host_tier_is_plain_attention(rng):
    store = hybridgen.HostKVStore(1, 1, 2, 64, torch.float32, near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 20)
    k, v = torch.randn((1, 2, 9, 64), generator=rng), torch.randn((1, 2, 9, 64), generator=rng)
    q = torch.randn((1, 4, 64), generator=rng)
    want, _ = ref.attention(ref.logits(q, k, 0.125), ref.expand_kv(v, 2))
    got = hybrid_attention(q, k, v, store, 0, scale=0.125)
    assert (got.double() - want).abs().max() < 1e-5


def test_unknown_merge_mode(rng):
    store = hybridgen.HostKVStore(1, 1, 1, 8, torch.float32, near_capacity_bytes=1 << 12, far_capacity_bytes=1 << 12)
    with pytest.raises(ValueError, match="merge"):
        hybrid_attention(
            torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), store, 0, scale=1.0, merge="sum"
        )


@pytest.mark.gpu
@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_exact_mode_with_the_device_tier_on_cuda(merge, rng):
    store, keys, values, dk, dv, q = setup(1, 2, 4, 64, 300, 4, 32, torch.float16, rng)
    want, _ = ref.attention(ref.logits(q, keys.float(), 0.125), ref.expand_kv(values.float(), 4))
    got = hybrid_attention(q.cuda(), dk.cuda(), dv.cuda(), store, 0, scale=0.125, sinks=4, merge=merge)
    assert got.is_cuda and (got.cpu().double() - want).abs().max() <= 1e-4 * want.abs().max()
