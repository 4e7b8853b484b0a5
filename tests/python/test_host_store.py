"""The host KV store from Python: a hypothesis state machine over append / evict / spill / reset
checks that every token is in exactly one tier, byte accounting is exact and read-back equals
what was written; plus zero-copy views, placement reporting and NUMA fallback."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import hybridgen
from hybridgen import Tier

B, KVH, D = 2, 2, 4


def token_rows(layer: int, kind: int, start: int, m: int) -> torch.Tensor:
    """Distinct, exactly representable rows for logical positions ``start..start+m``."""
    pos = torch.arange(start, start + m, dtype=torch.float32).view(1, 1, m, 1)
    seq = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1)
    head = torch.arange(KVH, dtype=torch.float32).view(1, KVH, 1, 1)
    dim = torch.arange(D, dtype=torch.float32).view(1, 1, 1, D)
    return (((layer * 2 + kind) * 4096 + pos) * 64 + seq * 16 + head * 4 + dim).contiguous()


def half_rows(layer: int, kind: int, start: int, m: int) -> torch.Tensor:
    """:func:`token_rows` made exactly representable in float16 (integers below 2048: distinct
    within one layer and kind for the first 32 positions)."""
    assert start + m <= 32
    return (token_rows(layer, kind, start, m) % 2048).half()


class StoreMachine(RuleBasedStateMachine):
    @initialize(
        layers=st.integers(1, 3),
        sinks=st.integers(0, 3),
        near_tokens=st.integers(1, 30),
        far_tokens=st.integers(8, 120),
    )
    def setup(self, layers, sinks, near_tokens, far_tokens):
        self.tb = B * KVH * D * 4
        self.layers, self.sinks = layers, sinks
        self.store = hybridgen.HostKVStore(
            layers,
            B,
            KVH,
            D,
            torch.float32,
            near_capacity_bytes=near_tokens * self.tb,
            far_capacity_bytes=far_tokens * self.tb,
            sinks=sinks,
        )
        self.total = [0] * layers
        self.host = [0] * layers

    @rule(layer=st.integers(0, 2), n=st.integers(0, 6))
    def append(self, layer, n):
        layer %= self.layers
        self.store.append(layer, n)
        self.total[layer] += n

    @rule(layer=st.integers(0, 2), frac=st.floats(0, 1))
    def evict(self, layer, frac):
        layer %= self.layers
        m = int(self.store.evictable(layer) * frac)
        start = self.sinks + self.host[layer]
        before = [self.store.token_map(l).copy() for l in range(self.layers)]
        try:
            self.store.evict(layer, token_rows(layer, 0, start, m), token_rows(layer, 1, start, m))
        except hybridgen.CapacityError:
            after = [self.store.token_map(l) for l in range(self.layers)]
            assert all(np.array_equal(a, b) for a, b in zip(before, after)), "refusal changed state"
            return
        self.host[layer] += m

    @rule(layer=st.integers(0, 2), frac=st.floats(0, 1))
    def spill(self, layer, frac):
        layer %= self.layers
        near_keys = self.store.host_len(layer) - self.store.far_key_len(layer)
        try:
            self.store.spill_keys(layer, int(near_keys * frac))
        except hybridgen.CapacityError:
            pass

    @precondition(lambda self: sum(self.total) > 40)
    @rule()
    def reset(self):
        self.store.reset()
        self.total = [0] * self.layers
        self.host = [0] * self.layers

    @invariant()
    def every_token_once_and_accounting_exact(self):
        near_keys = far_keys = 0
        for layer in range(self.layers):
            tmap = self.store.token_map(layer)
            assert tmap.shape == (B, self.total[layer])
            assert (tmap == tmap[0]).all(), "sequences move in lockstep"
            row = tmap[0]
            n, f = int((row == Tier.NEAR).sum()), int((row == Tier.FAR).sum())
            assert n + f == self.host[layer] == self.store.host_len(layer)
            assert int((row == Tier.DEVICE).sum()) == self.total[layer] - self.host[layer]
            near_keys, far_keys = near_keys + n, far_keys + f
            if self.host[layer]:
                k, v = self.store.read(layer, 0, self.host[layer])
                assert torch.equal(k, token_rows(layer, 0, self.sinks, self.host[layer]))
                assert torch.equal(v, token_rows(layer, 1, self.sinks, self.host[layer]))
        stats = self.store.tier_stats()
        assert stats["near"]["used_bytes"] == near_keys * self.tb
        assert stats["far"]["used_bytes"] == (far_keys + sum(self.host)) * self.tb
        assert stats["near"]["used_bytes"] <= stats["near"]["capacity_bytes"]
        assert stats["far"]["used_bytes"] <= stats["far"]["capacity_bytes"]


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
TestStoreMachine = StoreMachine.TestCase


def small_store(**kw):
    args = dict(near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 21)
    args.update(kw)
    return hybridgen.HostKVStore(2, B, KVH, D, torch.float16, **args)


def test_views_are_zero_copy_and_match_reads():
    store = small_store(sinks=1)
    store.append(1, 9)
    k, v = half_rows(1, 0, 1, 8), half_rows(1, 1, 1, 8)
    store.evict(1, k, v)
    view = store.view(1, "keys", 2, 7)
    assert view.shape == (B, KVH, 5, D) and torch.equal(view, k[:, :, 2:7])
    assert torch.equal(store.view(1, "values", 0, 8), v)
    again = store.view(1, "keys", 2, 7)
    assert view.data_ptr() == again.data_ptr(), "views share the store's memory"
    assert torch.equal(store.view(1, "keys", 3, 3), k[:, :, 3:3])


def test_view_outlives_the_store():
    store = small_store()
    store.append(0, 4)
    store.evict(0, half_rows(0, 0, 0, 4), half_rows(0, 1, 0, 4))
    view = store.view(0, "values", 0, 4)
    del store
    assert torch.equal(view, half_rows(0, 1, 0, 4)), "the view keeps the memory alive"


def test_token_map_layout_with_sinks():
    store = small_store(sinks=2)
    store.append(0, 10)
    store.evict(0, half_rows(0, 0, 2, 5), half_rows(0, 1, 2, 5))
    store.spill_keys(0, 2)
    assert store.token_map(0)[0].tolist() == [0, 0, 2, 2, 1, 1, 1, 0, 0, 0]
    assert store.evictable(0) == 3


def test_near_overflow_spills_oldest_keys_to_far():
    tb = B * KVH * D * 2
    store = small_store(near_capacity_bytes=4 * tb, far_capacity_bytes=100 * tb)
    store.append(0, 10)
    store.evict(0, half_rows(0, 0, 0, 7), half_rows(0, 1, 0, 7))
    assert store.far_key_len(0) == 3
    stats = store.tier_stats()
    assert (stats["near"]["key_tokens"], stats["far"]["key_tokens"], stats["far"]["value_tokens"]) == (4, 3, 7)
    k, _ = store.read(0, 0, 7)
    assert torch.equal(k, half_rows(0, 0, 0, 7)), "spilling moves, never drops"


def test_placement_is_queryable():
    store = small_store()
    store.append(0, 3)
    store.evict(0, half_rows(0, 0, 0, 3), half_rows(0, 1, 0, 3))
    placement = store.placement
    for tier in ("near", "far"):
        assert placement[tier]["fallback_reason"] is None
        assert placement[tier]["requested_node"] is None
    node = store.node_of(0, "keys", 2)
    if node is not None:  # the kernel may not report placement inside every sandbox
        assert node == placement["near"]["node"]
        assert store.node_of(0, "values", 0) == placement["far"]["node"]


def test_missing_numa_node_falls_back_with_a_warning():
    with pytest.warns(RuntimeWarning, match="not online"):
        store = small_store(near_node=4000, far_node=4001)
    placement = store.placement
    assert placement["near"]["requested_node"] == 4000
    assert "not online" in placement["near"]["fallback_reason"]
    assert placement["near"]["node"] == placement["far"]["node"]
    store.append(0, 2)
    store.evict(0, half_rows(0, 0, 0, 2), half_rows(0, 1, 0, 2))
    assert torch.equal(store.read(0, 0, 2)[0], half_rows(0, 0, 0, 2))


def test_existing_node_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_store(near_node=0, far_node=0)


def test_reset_returns_to_empty():
    store = small_store()
    store.append(0, 5)
    store.evict(0, half_rows(0, 0, 0, 5), half_rows(0, 1, 0, 5))
    store.reset()
    assert store.total_len(0) == store.host_len(0) == 0
    assert store.tier_stats()["far"]["used_bytes"] == 0
    store.append(0, 2)
    store.evict(0, half_rows(0, 0, 0, 2), half_rows(0, 1, 0, 2))
    assert torch.equal(store.read(0, 0, 2)[1], half_rows(0, 1, 0, 2))
