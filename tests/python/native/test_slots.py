"""Request slots of the host store: sequences that join, advance and leave independently (a
ragged batch), and ``cpu_stage_slots``, the CPU stage over one query row per slot.

The reference keeps, per slot and layer, exactly the rows written for it (as stored, rounded to
the storage dtype) and computes attention over them in float64.
"""

import random

import pytest
import torch

import hybridgen
from hybridgen import CapacityError

HKV, HQ, D = 2, 4, 16
# Relative to the largest reference magnitude: the kernels accumulate in float32 over stored
# (rounded) keys and values, which the reference sees as they are, so f16/bf16 storage differs
# only by the float32 arithmetic on other magnitudes (a little looser, stated here).
TOL = {torch.float32: 1e-5, torch.float16: 3e-5, torch.bfloat16: 3e-5}


def new_store(layers, batch, dtype, sinks=0, near=1 << 22, far=1 << 24, max_host=512):
    return hybridgen.HostKVStore(
        layers,
        batch,
        HKV,
        D,
        dtype,
        near_capacity_bytes=near,
        far_capacity_bytes=far,
        sinks=sinks,
        max_host_tokens=max_host,
    )


def rows(gen, m, dtype):
    return torch.randn((HKV, m, D), generator=gen).to(dtype), torch.randn((HKV, m, D), generator=gen).to(dtype)


class Model:
    """What each slot holds: per layer, the key and value rows written to the host, in order."""

    def __init__(self, layers, dtype):
        self.layers, self.dtype = layers, dtype
        self.keys, self.values = {}, {}

    def join(self, slot):
        self.keys[slot] = [torch.empty((HKV, 0, D), dtype=self.dtype) for _ in range(self.layers)]
        self.values[slot] = [torch.empty((HKV, 0, D), dtype=self.dtype) for _ in range(self.layers)]

    def leave(self, slot):
        del self.keys[slot], self.values[slot]

    def add(self, layer, slot, k, v):
        self.keys[slot][layer] = torch.cat([self.keys[slot][layer], k], dim=1)
        self.values[slot][layer] = torch.cat([self.values[slot][layer], v], dim=1)


def check_model(store, model):
    assert store.active_slots == sorted(model.keys)
    key_slot_tokens = 0
    for slot in model.keys:
        for layer in range(model.layers):
            want_k, want_v = model.keys[slot][layer], model.values[slot][layer]
            n = want_k.shape[1]
            assert store.slot_host_len(layer, slot) == n
            k, v = store.read_slot(layer, slot, 0, n)
            assert torch.equal(k, want_k) and torch.equal(v, want_v), f"slot {slot}, layer {layer}"
            tiers = store.slot_token_map(layer, slot)
            assert len(tiers) == store.slot_total_len(layer, slot)
            far = store.slot_far_key_len(layer, slot)
            host = tiers[store.sinks : store.sinks + n].tolist() if len(tiers) > store.sinks else []
            assert host == [hybridgen.Tier.FAR] * far + [hybridgen.Tier.NEAR] * (n - far)
            key_slot_tokens += n
    stats = store.tier_stats()
    assert stats["near"]["key_slot_tokens"] + stats["far"]["key_slot_tokens"] == key_slot_tokens
    assert stats["far"]["value_slot_tokens"] == key_slot_tokens
    slot_bytes = HKV * D * torch.empty((), dtype=model.dtype).element_size()
    assert stats["near"]["used_bytes"] == stats["near"]["key_slot_tokens"] * slot_bytes
    assert stats["far"]["used_bytes"] == (stats["far"]["key_slot_tokens"] + key_slot_tokens) * slot_bytes


@pytest.mark.parametrize("seed", range(4))
def test_random_join_leave_evict_loses_and_duplicates_nothing(seed):
    rnd, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    layers, batch, dtype = 2, 4, torch.float16
    slot_bytes = HKV * D * 2
    store = new_store(
        layers,
        batch,
        dtype,
        sinks=rnd.randrange(3),
        near=rnd.randrange(1, 40) * slot_bytes,
        far=rnd.randrange(10, 40) * slot_bytes,
        max_host=64,
    )
    model = Model(layers, dtype)
    for slot in range(batch):
        model.join(slot)
    refused = 0
    for _ in range(400):
        active = store.active_slots
        op = rnd.randrange(16)
        if op == 0:
            free = [s for s in range(batch) if s not in active]
            if free:
                assert store.add_slot() == min(free), "the lowest free id is reused"
                model.join(min(free))
            else:
                with pytest.raises(CapacityError):
                    store.add_slot()
        elif op == 1 and active:
            slot = rnd.choice(active)
            store.release_slot(slot)
            model.leave(slot)
        elif op == 2 and active:
            slot = rnd.choice(active)
            store.reset_slot(slot)
            model.leave(slot)
            model.join(slot)
        elif op in (3, 4, 5, 6, 7, 8) and active:
            store.append_slot(rnd.randrange(layers), rnd.choice(active), rnd.randrange(6))
        elif active:
            layer, slot = rnd.randrange(layers), rnd.choice(active)
            m = rnd.randint(0, store.slot_evictable(layer, slot))
            k, v = rows(gen, m, dtype)
            before = store.tier_stats()
            try:
                store.evict_slot(layer, slot, k, v)
                model.add(layer, slot, k, v)
            except CapacityError:
                refused += 1
                assert store.tier_stats() == before, "a refused eviction changes nothing"
        check_model(store, model)
    assert refused > 0, "the sequence must also exercise refused evictions"


def reference(keys, values, q, scale, top_k=None, positions=None, mask=None):
    """One row in float64: ``keys``/``values [hkv, n, d]`` as stored, ``q [hq, d]``. Returns
    logits, indices and value rows of the selection (scored order) and the LSE partial."""
    hkv, n, d = keys.shape
    g = q.shape[0] // hkv
    cand = torch.arange(n) if positions is None else positions
    x = torch.einsum("hd,hnd->hn", q.double(), keys.double().repeat_interleave(g, dim=0))[:, cand] * scale
    if mask is not None:
        x = x.masked_fill(mask[cand].bool().unsqueeze(0), float("-inf"))
    m = cand.numel()
    if top_k is not None and top_k < m:
        local = torch.sort(-x, dim=-1, stable=True).indices[:, :top_k].sort(dim=-1).values
        x, idx = torch.gather(x, 1, local), cand[local]
    else:
        idx = cand.expand(q.shape[0], m)
    picked = torch.gather(values.repeat_interleave(g, dim=0), 1, idx.unsqueeze(-1).expand(-1, -1, d))
    if x.shape[-1]:
        lse = torch.logsumexp(x, dim=-1)
        out = torch.einsum("hk,hkd->hd", torch.exp(x - lse.unsqueeze(-1)).nan_to_num(0.0), picked.double())
    else:
        lse, out = (
            torch.full((q.shape[0],), float("-inf"), dtype=torch.float64),
            torch.zeros(q.shape, dtype=torch.float64),
        )
    return {"logits": x, "indices": idx, "values": picked, "lse": lse, "out": out}


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got[~finite].double(), want[~finite]), f"{what}: infinities differ"
    if finite.any():
        scale = max(want[finite].abs().max().item(), 1e-6)
        err = (got[finite].double() - want[finite]).abs().max().item()
        assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} × {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_ragged_batch_matches_reference_per_row(dtype):
    """Three sequences of different lengths over 200 steps: one leaves now and then and a new one
    joins into the freed slot; each step each active sequence decodes a token and evicts a varying
    number of tokens per layer; the stage over all active slots must equal, row by row, attention
    over exactly that slot's own host keys and values."""
    rnd, gen = random.Random(7), torch.Generator().manual_seed(7)
    layers, sinks, tol, scale = 2, 2, TOL[dtype], D**-0.5
    store = new_store(layers, 4, dtype, sinks=sinks)
    for slot in list(store.active_slots):
        store.release_slot(slot)
    model = Model(layers, dtype)
    life = {}

    def join():
        slot = store.add_slot()
        model.join(slot)
        prompt = rnd.randrange(3, 60)
        for layer in range(layers):
            store.append_slot(layer, slot, prompt)
        life[slot] = rnd.randrange(20, 90)

    for _ in range(3):
        join()
    checked = {"lse": 0, "concat": 0, "topk": 0, "positions": 0, "mask": 0}
    for step in range(200):
        for slot in list(life):
            life[slot] -= 1
            if life[slot] == 0:
                store.release_slot(slot)
                model.leave(slot)
                del life[slot]
                join()
        for slot in life:
            for layer in range(layers):
                store.append_slot(layer, slot, 1)
                m = min(rnd.randrange(0, 4), store.slot_evictable(layer, slot))
                k, v = rows(gen, m, dtype)
                store.evict_slot(layer, slot, k, v)
                model.add(layer, slot, k, v)
        active = sorted(life)
        # One query row per sequence, plus a second row for the first one (repeats are allowed).
        slots = active + active[:1]
        r = len(slots)
        q = torch.randn((r, HQ, D), generator=gen)
        for layer in range(layers):
            ks = [model.keys[s][layer] for s in slots]
            vs = [model.values[s][layer] for s in slots]
            got = store.cpu_stage_slots(layer, slots, q, scale, "lse")
            assert got["host_len"] == [k.shape[1] for k in ks]
            assert got["out"].shape == (r, HQ, D) and got["lse"].shape == (r, HQ)
            assert got["logits"] is None and got["values"] is None
            for i in range(r):
                want = reference(ks[i], vs[i], q[i], scale)
                assert_close(got["out"][i], want["out"], tol, f"step {step} layer {layer} row {i} out")
                assert_close(got["lse"][i], want["lse"], tol, f"step {step} layer {layer} row {i} lse")
            checked["lse"] += 1
            variant = step % 4
            if variant == 0:
                check_concat(store, layer, slots, q, scale, ks, vs, tol, dtype)
                checked["concat"] += 1
            elif variant == 1:
                top_k = rnd.randrange(0, 12)
                check_concat(store, layer, slots, q, scale, ks, vs, tol, dtype, top_k=top_k)
                check_lse(store, layer, slots, q, scale, ks, vs, tol, top_k=top_k)
                checked["topk"] += 1
            elif variant == 2:
                shortest = min(k.shape[1] for k in ks)
                if shortest:
                    per_row = torch.stack([torch.randint(0, k.shape[1], (5,), generator=gen) for k in ks])
                    shared = torch.randint(0, shortest, (4,), generator=gen)
                    for positions in (per_row, shared):
                        check_concat(store, layer, slots, q, scale, ks, vs, tol, dtype, positions=positions, top_k=3)
                        check_lse(store, layer, slots, q, scale, ks, vs, tol, positions=positions)
                    checked["positions"] += 1
            else:
                width = max(k.shape[1] for k in ks) + 3
                mask = torch.rand((r, width), generator=gen) < 0.3
                check_lse(store, layer, slots, q, scale, ks, vs, tol, host_mask=mask)
                check_concat(store, layer, slots, q, scale, ks, vs, tol, dtype, host_mask=mask)
                checked["mask"] += 1
        check_model(store, model)
    assert all(checked.values()), checked


def row_kw(kw, i):
    """The reference's arguments for row ``i`` from the call's."""
    out = {"top_k": kw.get("top_k")}
    p = kw.get("positions")
    if p is not None:
        out["positions"] = p[i] if p.dim() == 2 else p
    if kw.get("host_mask") is not None:
        out["mask"] = kw["host_mask"][i]
    return out


def check_lse(store, layer, slots, q, scale, ks, vs, tol, **kw):
    got = store.cpu_stage_slots(layer, slots, q, scale, "lse", **kw)
    for i in range(len(slots)):
        rk = row_kw(kw, i)
        if "mask" in rk:
            rk["mask"] = rk["mask"][: ks[i].shape[1]]
        want = reference(ks[i], vs[i], q[i], scale, **rk)
        assert_close(got["out"][i], want["out"], tol, f"row {i} out {kw.keys()}")
        assert_close(got["lse"][i], want["lse"], tol, f"row {i} lse {kw.keys()}")


def check_concat(store, layer, slots, q, scale, ks, vs, tol, dtype, **kw):
    got = store.cpu_stage_slots(layer, slots, q, scale, "concat", **kw)
    r, width = len(slots), got["width"]
    assert got["out"] is None and got["lse"] is None
    assert got["logits"].shape == (r, HQ, width) and got["indices"].shape == (r, HQ, width)
    assert got["values"].shape == (r, HQ, width, D) and got["values"].dtype == dtype
    assert width == max(got["tokens"], default=0)
    for i in range(r):
        rk = row_kw(kw, i)
        if "mask" in rk:
            rk["mask"] = rk["mask"][: ks[i].shape[1]]
        want = reference(ks[i], vs[i], q[i], scale, **rk)
        k = got["tokens"][i]
        assert k == want["logits"].shape[-1]
        assert_close(got["logits"][i, :, :k], want["logits"], tol, f"row {i} logits")
        assert torch.equal(got["indices"][i, :, :k], want["indices"]), f"row {i} indices"
        assert torch.equal(got["values"][i, :, :k], want["values"]), f"row {i} values"
        assert torch.all(got["logits"][i, :, k:] == float("-inf")), "padding logits are -inf"
        assert torch.all(got["indices"][i, :, k:] == -1) and torch.all(got["values"][i, :, k:] == 0)


def test_lockstep_batch_is_the_special_case():
    """With every slot at one length, the per-slot stage equals the layer-wide one, and the
    layer-wide calls refuse ragged slots, naming them."""
    gen = torch.Generator().manual_seed(3)
    store = new_store(1, 3, torch.float32)
    keys, values = torch.randn((3, HKV, 20, D), generator=gen), torch.randn((3, HKV, 20, D), generator=gen)
    store.append(0, 20)
    store.evict(0, keys, values)
    q = torch.randn((3, HQ, D), generator=gen)
    batch = store.cpu_stage(0, q, 0.25, "lse")
    slots = store.cpu_stage_slots(0, [0, 1, 2], q, 0.25, "lse")
    assert torch.allclose(torch.from_dlpack(batch["out"]), slots["out"], rtol=1e-6, atol=1e-6)
    assert torch.allclose(torch.from_dlpack(batch["lse"]), slots["lse"], rtol=1e-6, atol=1e-6)
    for s in range(3):
        k, v = store.read_slot(0, s, 0, 20)
        assert torch.equal(k, keys[s]) and torch.equal(v, values[s])
    store.append_slot(0, 2, 1)
    store.evict_slot(0, 2, torch.zeros(HKV, 1, D), torch.zeros(HKV, 1, D))
    with pytest.raises(
        ValueError, match=r"slots have different lengths in layer 0 \(slot 0: 20, slot 2: 21\): use the per-slot calls"
    ):
        store.total_len(0)
    with pytest.raises(ValueError, match="per-slot"):
        store.cpu_stage(0, q, 0.25, "lse")
    # The odd one leaves: the other two are a lockstep batch of two again.
    store.release_slot(2)
    assert store.active_slots == [0, 1] and store.host_len(0) == 20
    k, _ = store.read(0, 0, 20)
    assert k.shape == (2, HKV, 20, D) and torch.equal(k, keys[:2])
    assert torch.equal(torch.from_dlpack(store.cpu_stage(0, q[:2], 0.25, "lse")["out"]), slots["out"][:2])


def bad_store():
    store = new_store(2, 3, torch.float16)
    store.release_slot(1)
    store.append_slot(0, 0, 4)
    store.evict_slot(0, 0, *rows(torch.Generator().manual_seed(0), 3, torch.float16))
    return store


q2 = torch.zeros((2, HQ, D))
BAD = {
    "free slot": (lambda s: s.cpu_stage_slots(0, [0, 1], q2, 1.0, "lse"), ValueError, r"slots\[1\]: slot 1 is free"),
    "slot out of range": (lambda s: s.cpu_stage_slots(0, [0, 3], q2, 1.0, "lse"), ValueError, "out of range"),
    "negative slot": (lambda s: s.cpu_stage_slots(0, [0, -1], q2, 1.0, "lse"), ValueError, "out of range"),
    "slots int32": (
        lambda s: s._native.cpu_stage_slots(0, torch.zeros(2, dtype=torch.int32), q2, 1.0, "lse"),
        TypeError,
        "int64",
    ),
    "slots not ints": (lambda s: s.cpu_stage_slots(0, [0, 1.5], q2, 1.0, "lse"), TypeError, "integer"),
    "q rows differ": (lambda s: s.cpu_stage_slots(0, [0], q2, 1.0, "lse"), ValueError, "dimension 0"),
    "q float64 native": (
        lambda s: s._native.cpu_stage_slots(0, torch.tensor([0]), q2[:1].double(), 1.0, "lse"),
        TypeError,
        "float32",
    ),
    "q heads": (lambda s: s.cpu_stage_slots(0, [0, 2], torch.zeros(2, 3, D), 1.0, "lse"), ValueError, "multiple"),
    "bad merge": (lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "sum"), ValueError, "merge"),
    "position past a row": (
        lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "lse", positions=torch.tensor([0])),
        ValueError,
        "row 1: token index 0 out of range",
    ),
    "positions rows": (
        lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "lse", positions=torch.zeros(3, 1, dtype=torch.int64)),
        ValueError,
        "positions must be",
    ),
    "mask too narrow": (
        lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "lse", host_mask=torch.zeros(2, 2, dtype=torch.bool)),
        ValueError,
        "host_mask has 2 columns",
    ),
    "pages zero": (lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "lse", pages=[1, 0]), ValueError, r"pages\[1\]"),
    "pages with positions": (
        lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "lse", pages=1, positions=torch.tensor([0])),
        ValueError,
        "exclude each other",
    ),
    "pages per row": (
        lambda s: s._native.cpu_stage_slots(
            0, torch.tensor([0, 2]), q2, 1.0, "lse", pages=torch.ones(3, dtype=torch.int64)
        ),
        ValueError,
        "pages",
    ),
    "negative top_k": (lambda s: s.cpu_stage_slots(0, [0, 2], q2, 1.0, "lse", top_k=-1), ValueError, ">= 0"),
    "evict_slot with a batch axis": (
        lambda s: s.evict_slot(0, 0, torch.zeros(1, HKV, 1, D).half(), torch.zeros(1, HKV, 1, D).half()),
        ValueError,
        "dimensions",
    ),
    "evict_slot too many": (
        lambda s: s.evict_slot(0, 0, *rows(torch.Generator(), 2, torch.float16)),
        ValueError,
        "non-sink device tokens",
    ),
    "append to a free slot": (lambda s: s.append_slot(0, 1, 1), ValueError, "free"),
    "release twice": (lambda s: s.release_slot(1), ValueError, "free"),
    "reset out of range": (lambda s: s.reset_slot(7), ValueError, "out of range"),
    "read past the host": (lambda s: s.read_slot(0, 0, 0, 4), ValueError, "out of bounds"),
    "layer-wide over ragged slots": (lambda s: s.host_len(0), ValueError, "use the per-slot calls"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_input_raises_clearly_and_changes_nothing(case):
    call, exc, fragment = BAD[case]
    store = bad_store()
    before = (store.tier_stats(), store.active_slots, [store.slot_total_len(0, s) for s in (0, 2)])
    with pytest.raises(exc, match=fragment):
        call(store)
    assert (store.tier_stats(), store.active_slots, [store.slot_total_len(0, s) for s in (0, 2)]) == before


def test_full_pool_refuses_a_new_slot():
    store = new_store(1, 2, torch.float16)
    with pytest.raises(CapacityError, match="no free slot"):
        store.add_slot()
    store.release_slot(0)
    assert store.add_slot() == 0


def test_empty_slot_list_and_empty_rows():
    store = new_store(1, 2, torch.float32)
    r = store.cpu_stage_slots(0, [], torch.zeros(0, HQ, D), 1.0, "lse")
    assert r["out"].shape == (0, HQ, D) and r["tokens"] == []
    r = store.cpu_stage_slots(0, [1], torch.ones(1, HQ, D), 1.0, "lse")
    assert torch.all(r["out"] == 0) and torch.all(r["lse"] == float("-inf")), "no host tokens: zeros and -inf"
    r = store.cpu_stage_slots(0, [0, 1], torch.ones(2, HQ, D), 1.0, "concat")
    assert r["width"] == 0 and r["logits"].shape == (2, HQ, 0)
