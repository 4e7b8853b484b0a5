"""The plugin's runtime without an engine: ragged requests in host store slots, windows that evict
as vLLM's rows arrive, hybrid decode against full attention, slots released and reused."""

import pytest
import torch

from hybridgen.config import HybridConfig

HQ, HKV, D = 4, 2, 32
SCALE = D**-0.5


def make_runtime(policy="all", **fields):
    from hybridgen.vllm.runtime import Runtime

    config = HybridConfig(policy=policy, gpu_budget=8, sinks=2, evict_chunk=3, **fields)
    return Runtime(config, ["l0", "l1"], kv_heads=HKV, head_dim=D, dtype=torch.float32, max_requests=3, max_tokens=256)


class Engine:
    """vLLM's side of a step, as the runtime sees it: each request's rows, positions and the
    paged-cache slot of its first new token (made unique per request and position here)."""

    def __init__(self, rt):
        self.rt, self.kv, self.ids = rt, {}, {}
        self.gen = torch.Generator().manual_seed(0)

    def step(self, batch, finished=()):
        """``batch``: [(req_id, new tokens)]. Returns the plan, the query and each request's rows."""
        starts, lens, slots, owners, keys, values = [0], [], [], {}, [], []
        for req_id, n in batch:
            k_all = self.kv.setdefault(req_id, [torch.empty(0, HKV, D), torch.empty(0, HKV, D)])
            pos = k_all[0].shape[0]
            uid = self.ids.setdefault(req_id, 10_000 * (len(self.ids) + 1))
            slots += [uid + pos + j for j in range(n)]
            owners[uid + pos] = req_id
            k, v = torch.randn(n, HKV, D, generator=self.gen), torch.randn(n, HKV, D, generator=self.gen)
            k_all[0], k_all[1] = torch.cat([k_all[0], k]), torch.cat([k_all[1], v])
            keys.append(k)
            values.append(v)
            starts.append(starts[-1] + n)
            lens.append(pos + n)
        self.rt.begin_step(owners, finished)
        plan = self.rt.plan(torch.tensor(starts), torch.tensor(lens), torch.tensor(slots))
        key, value = torch.cat(keys), torch.cat(values)
        for layer in ("l0", "l1"):  # the same rows in both layers: enough for the bookkeeping
            self.rt.record(layer, plan, key, value)
        query = torch.randn(starts[-1], HQ, D, generator=self.gen)
        return plan, query


def full_attention(q, k, v):
    """``q [hq, d]`` over every row ``k``/``v [n, hkv, d]`` (GQA), float64."""
    k = k.double().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)  # [hq, n, d]
    v = v.double().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q.double(), k) * SCALE, dim=-1)
    return torch.einsum("hn,hnd->hd", p, v)


def test_hybrid_decode_equals_full_attention_over_ragged_requests():
    rt = make_runtime()
    eng = Engine(rt)
    eng.step([("a", 40), ("b", 25), ("c", 5)])  # prefill: c stays within its window
    for _ in range(6):
        plan, q = eng.step([("a", 1), ("b", 1), ("c", 1)])
        rows = rt.hybrid_rows("l0", plan)
        assert rows == [0, 1]  # c has no host tokens yet
        out = rt.decode("l0", plan, rows, q, SCALE)
        for j, (i, req) in enumerate(zip(rows, "ab")):
            want = full_attention(q[plan.starts[i]], *eng.kv[req])
            torch.testing.assert_close(out[j].double(), want, rtol=1e-5, atol=1e-5)
    a = rt.requests["a"].windows[0]
    assert a.total == 46 and a.host > 30 and 2 + 8 <= a.total - a.host < 2 + 8 + 3
    assert rt.store.slot_host_len(0, rt.requests["a"].slot) == a.host


def test_post_qkt_with_k_at_least_every_host_token_is_exact():
    rt = make_runtime("post_qkt", k=64)
    eng = Engine(rt)
    eng.step([("a", 50)])
    plan, q = eng.step([("a", 1)])
    out = rt.decode("l1", plan, rt.hybrid_rows("l1", plan), q, SCALE)
    torch.testing.assert_close(out[0].double(), full_attention(q[0], *eng.kv["a"]), rtol=1e-5, atol=1e-5)


def test_slots_follow_requests():
    rt = make_runtime()
    eng = Engine(rt)
    eng.step([("a", 20), ("b", 20), ("c", 20)])
    assert sorted(rt.active_requests) == ["a", "b", "c"] and len(rt.store.active_slots) == 3
    eng.step([("d", 20)])  # every slot in use: d is served by vLLM's own attention
    assert rt.active_requests["d"] is None
    eng.step([("c", 1)], finished={"a", "b", "d"})
    assert list(rt.active_requests) == ["c"] and len(rt.store.active_slots) == 1
    eng.step([("e", 20)])  # a freed slot is reused, empty
    e = rt.requests["e"]
    assert e.slot is not None and rt.store.slot_total_len(0, e.slot) == 20
    rt.release("c")
    rt.release("e")
    rt.release("unknown")
    assert rt.active_requests == {} and rt.store.active_slots == []


def test_requests_the_plugin_did_not_see_from_the_start_are_untracked():
    rt = make_runtime()
    eng = Engine(rt)
    eng.step([("a", 20)])
    eng.kv["b"] = [torch.randn(16, HKV, D), torch.randn(16, HKV, D)]  # a prefix-cache hit
    plan, _ = eng.step([("b", 4), ("a", 1)])
    assert rt.resolve(plan)[0] is None and rt.requests["b"].slot is None
    assert "prefix cache" in rt.requests["b"].why_untracked
    # Rows whose slot the scheduler did not name (e.g. vLLM's warm-up runs) take the stock path.
    rt.end_step()
    plan = rt.plan(torch.tensor([0, 1]), torch.tensor([22]), torch.tensor([99]))
    assert rt.resolve(plan) == [None] and rt.hybrid_rows("l0", plan) == []


@pytest.mark.parametrize("n", [1, 3, 11])
def test_window_keeps_sinks_and_recent_rows_in_order(n):
    from hybridgen.vllm.window import Window

    rt = make_runtime()
    slot = rt.store.add_slot()
    w = Window(rt.store, 0, slot, sinks=2, recent=4, chunk=3)
    rows = torch.arange(30, dtype=torch.float32).view(30, 1, 1).expand(30, HKV, D)
    for i in range(0, 30, n):
        w.append(rows[i : i + n], rows[i : i + n])
    k, _ = w.rows()
    kept = k[0, :, 0].tolist()
    assert kept[:2] == [0, 1] and kept[2:] == list(range(30 - len(kept) + 2, 30))
    assert 4 <= len(kept) - 2 < 4 + 3 and w.host == 30 - len(kept)
    hk, _ = rt.store.read_slot(0, slot, 0, w.host)
    assert hk[0, :, 0].tolist() == list(range(2, 2 + w.host))
