"""DeviceTier against a plain list of tokens: placement, chunked eviction, growth, masks, and
no token lost or duplicated across the tiers over random sequences of appends."""

import random

import pytest
import torch

from hybridgen import HostKVStore
from hybridgen.engine import DeviceTier
from hybridgen.policies import Placement

B, H, D = 2, 3, 8


def make(placement: Placement, layers: int = 1, max_tokens: int = 4096):
    store = HostKVStore(
        layers,
        B,
        H,
        D,
        torch.float32,
        sinks=placement.sinks,
        max_host_tokens=max_tokens,
        near_capacity_bytes=1 << 24,
        far_capacity_bytes=1 << 24,
    )
    return DeviceTier(store, 0, placement)


def tokens(start: int, n: int) -> torch.Tensor:
    """Keys whose every element is the token's logical position (values: its negative)."""
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(B, H, n, D).contiguous()


def logical(tier: DeviceTier) -> list[int]:
    keys, values = tier.logical_kv()
    assert torch.equal(values, -keys)
    return keys[0, 0, :, 0].long().tolist()


def append(tier: DeviceTier, start: int, n: int) -> None:
    k = tokens(start, n)
    tier.append(k, -k)


def test_prompt_placement_keeps_sinks_and_recent_tokens():
    tier = make(Placement(sinks=3, recent=5, evict_chunk=4))
    append(tier, 0, 20)
    tier.evict_overflow(force=True)
    assert tier.device_tokens() == 8 and tier.host_tokens == 12 and tier.total == 20
    assert tier.keys[0, 0, :, 0].long().tolist() == [0, 1, 2, 15, 16, 17, 18, 19]
    assert logical(tier) == list(range(20))


def test_decode_evicts_in_chunks():
    tier = make(Placement(sinks=2, recent=4, evict_chunk=3))
    append(tier, 0, 6)
    tier.evict_overflow(force=True)
    hosts = []
    for t in range(6, 30):
        append(tier, t, 1)
        tier.evict_overflow()
        hosts.append(tier.host_tokens)
        assert 4 <= tier.device_tokens() - 2 < 4 + 3, "recent tokens stay within budget + chunk"
    assert sorted(set(hosts)) == list(range(0, 25, 3)), "the host tier grows a chunk at a time"
    assert logical(tier) == list(range(30))


def test_unbounded_tier_grows_by_doubling_and_never_evicts():
    tier = make(Placement(sinks=0, recent=None, evict_chunk=8))
    capacities = set()
    for t in range(100):
        append(tier, t, 1)
        tier.evict_overflow()
        capacities.add(tier._buf_k.shape[2])
    assert tier.host_tokens == 0 and logical(tier) == list(range(100))
    assert len(capacities) < 12, f"amortised growth, not one reallocation per token: {sorted(capacities)}"


def test_masks_split_keep_by_tier():
    tier = make(Placement(sinks=2, recent=3, evict_chunk=1))
    append(tier, 0, 9)
    tier.evict_overflow(force=True)
    keep = torch.ones(B, 9, dtype=torch.bool)
    keep[1, :4] = False  # left padding of sequence 1
    dev_mask, host_mask = tier.masks(keep)
    assert dev_mask.tolist() == [[False] * 5, [True, True, False, False, False]]
    assert host_mask.tolist() == [[False] * 4, [True, True, False, False]]
    assert tier.positions().tolist() == [0, 1, 6, 7, 8]
    with pytest.raises(RuntimeError, match="covers 8 tokens"):
        tier.masks(keep[:, :8])


def test_evict_refuses_more_than_the_recent_tokens():
    tier = make(Placement(sinks=2, recent=3, evict_chunk=1))
    append(tier, 0, 4)
    with pytest.raises(ValueError, match="cannot evict 3 tokens"):
        tier.evict(3)


@pytest.mark.parametrize("seed", range(8))
def test_random_sequences_lose_and_duplicate_nothing(seed):
    rnd = random.Random(seed)
    placement = Placement(sinks=rnd.randint(0, 4), recent=rnd.randint(0, 12), evict_chunk=rnd.randint(1, 6))
    tier = make(placement)
    total = 0
    n = rnd.randint(1, 40)
    append(tier, 0, n)
    tier.evict_overflow(force=True)
    total += n
    for _ in range(rnd.randint(5, 60)):
        n = rnd.choice([1, 1, 1, rnd.randint(2, 9)])
        append(tier, total, n)
        total += n
        tier.evict_overflow(force=rnd.random() < 0.1)
        assert tier.total == total == tier.device_tokens() + tier.host_tokens + tier.in_flight
        tier.sync_store()
        assert tier.store.total_len(0) == total
    assert logical(tier) == list(range(total))
    tier.reset()
    assert tier.total == 0 and tier.keys is None and tier.policy_state is None
