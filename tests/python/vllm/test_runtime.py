"""The plugin's runtime without an engine: ragged requests in host store slots, windows that evict
as vLLM's rows arrive, hybrid decode against full attention, slots released and reused."""

import pytest
import torch

from hybridgen.config import HybridConfig
from hybridgen.vllm.settings import slot_pages

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

    def step(self, batch, finished=(), blocks_freed=()):
        """``batch``: [(req_id, new tokens)]; ``blocks_freed``: requests whose blocks vLLM freed.
        Returns the plan and the query."""
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
        self.rt.begin_step(owners, finished, blocks_freed)
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


def test_the_pipelined_cpu_stage_gives_the_same_result():
    # pipeline=True: the CPU stage runs on a worker thread while the device part runs.
    results = []
    for pipeline in (False, True):
        rt = make_runtime("post_qkt", k=7, pipeline=pipeline)
        eng = Engine(rt)
        eng.step([("a", 40), ("b", 25)])
        plan, q = eng.step([("a", 1), ("b", 1)])
        results.append(rt.decode("l0", plan, rt.hybrid_rows("l0", plan), q, SCALE))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


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


def selected_attention(q, k, v, dev, host_sets):
    """``q [hq, d]`` over the device rows ``dev`` (indices into ``k``/``v [n, hkv, d]``) plus, per
    query head, the host rows ``host_sets[h]``; float64."""
    out = []
    for h in range(HQ):
        rows = sorted(set(dev) | set(host_sets[h]))
        kh, vh = k[rows, h // (HQ // HKV)].double(), v[rows, h // (HQ // HKV)].double()
        p = torch.softmax(kh @ q[h].double() * SCALE, dim=0)
        out.append(p @ vh)
    return torch.stack(out)


def host_split(rt, req_id, n_total):
    """``(device row positions, host row positions)`` of a request in layer 0 (logical positions)."""
    w = rt.requests[req_id].windows[0]
    sinks = min(2, n_total)
    host = list(range(sinks, sinks + w.host))
    dev = [p for p in range(n_total) if p not in host]
    return dev, host


def test_pre_qkt_attends_to_the_positions_the_policy_predicts():
    from hybridgen.attention import pre_qkt_positions

    rt = make_runtime("pre_qkt", k=6, predictor="positional")
    eng = Engine(rt)
    eng.step([("a", 60), ("b", 12), ("c", 30)])  # b has 2 host tokens (<= k): attended in full
    plan, q = eng.step([("a", 1), ("b", 1), ("c", 1)])
    rows = rt.hybrid_rows("l0", plan)
    assert rows == [0, 1, 2]
    out = rt.decode("l0", plan, rows, q, SCALE)
    for j, req in enumerate("abc"):
        k, v = eng.kv[req]
        dev, host = host_split(rt, req, k.shape[0])
        chosen = [host[i] for i in pre_qkt_positions(len(host), 6).tolist()]
        want = selected_attention(q[plan.starts[j]], k, v, dev, [chosen] * HQ)
        torch.testing.assert_close(out[j].double(), want, rtol=1e-5, atol=1e-5)
    b_host = rt.requests["b"].windows[0].host
    c = rt.counters
    assert c["rows_by_strategy"] == {"all": 0, "post_qkt": 0, "pre_qkt": 3}
    assert c["host_keys_scored"] == 6 + b_host + 6 and c["host_tokens_read"] == 6 + b_host + 6


def page_choice(q, k, host, top, pages):
    """Per query head, the host rows page-summary Pre-QKT keeps: per KV head the ``pages`` pages
    (16 host tokens) whose upper bound ``<q+, max> + <q-, min>`` is highest over the GQA group,
    then the ``top`` best of their tokens by exact logit (float64)."""
    g, keys = HQ // HKV, k[host].double()  # [n, hkv, d]
    chosen = []
    for h in range(HQ):
        kv = h // g
        bounds = []
        for start in range(0, len(host), 16):
            page = keys[start : start + 16, kv]
            hi, lo = page.max(0).values, page.min(0).values
            qs = q[kv * g : (kv + 1) * g].double()
            bounds.append(max(float(torch.maximum(qh * hi, qh * lo).sum()) for qh in qs))
        best = torch.tensor(bounds).topk(min(pages, len(bounds))).indices.tolist()
        cand = [i for b in best for i in range(16 * b, min(16 * b + 16, len(host)))]
        logits = keys[cand, kv] @ q[h].double()
        chosen.append([host[cand[i]] for i in logits.topk(min(top, len(cand))).indices.tolist()])
    return chosen


@pytest.mark.skipif(not slot_pages(), reason="this build's HostKVStore.cpu_stage_slots takes no page selection")
def test_page_summary_pre_qkt_scores_the_best_pages_then_keeps_the_top_k():
    from hybridgen.attention import page_count
    from hybridgen.policies.hybrid import page_candidates

    rt = make_runtime("pre_qkt", k=12, predictor="pages")
    eng = Engine(rt)
    eng.step([("a", 120), ("b", 70), ("c", 14)])  # c: 4 host tokens, every one attended
    plan, q = eng.step([("a", 1), ("b", 1), ("c", 1)])
    rows = rt.hybrid_rows("l0", plan)
    out = rt.decode("l0", plan, rows, q, SCALE)
    for j, req in enumerate("abc"):
        k, v = eng.kv[req]
        dev, host = host_split(rt, req, k.shape[0])
        qj = q[plan.starts[j]]
        pages = page_count(max(page_candidates(12, len(host)), 12))
        want = selected_attention(qj, k, v, dev, page_choice(qj, k, host, 12, pages))
        torch.testing.assert_close(out[j].double(), want, rtol=1e-5, atol=1e-5)
    assert rt.counters["rows_by_strategy"]["pre_qkt"] == 3
    assert rt.counters["host_keys_scored"] < sum(r.windows[0].host for r in rt.requests.values())


def test_pre_qkt_with_k_at_least_every_host_token_is_exact():
    rt = make_runtime("pre_qkt", k=64, predictor="positional")
    eng = Engine(rt)
    eng.step([("a", 50), ("b", 30)])
    plan, q = eng.step([("a", 1), ("b", 1)])
    out = rt.decode("l1", plan, rt.hybrid_rows("l1", plan), q, SCALE)
    for j, req in enumerate("ab"):
        torch.testing.assert_close(
            out[j].double(), full_attention(q[plan.starts[j]], *eng.kv[req]), rtol=1e-5, atol=1e-5
        )


def test_post_qkt_keeps_the_top_k_host_tokens_per_head():
    rt = make_runtime("post_qkt", k=5)
    eng = Engine(rt)
    eng.step([("a", 40)])
    plan, q = eng.step([("a", 1)])
    out = rt.decode("l0", plan, rt.hybrid_rows("l0", plan), q, SCALE)
    k, v = eng.kv["a"]
    dev, host = host_split(rt, "a", k.shape[0])
    qa = q[0]
    top = []
    for h in range(HQ):
        logits = k[host, h // (HQ // HKV)].double() @ qa[h].double()
        top.append([host[i] for i in logits.topk(5).indices.tolist()])
    torch.testing.assert_close(out[0].double(), selected_attention(qa, k, v, dev, top), rtol=1e-5, atol=1e-5)
    assert rt.counters["host_keys_scored"] == len(host) and rt.counters["host_tokens_read"] == 5


def test_the_scheduler_runs_on_the_backends_step_times(monkeypatch):
    # CPU-bound steps (forced): K stays at k_min under Post-QKT, then the scheduler switches to
    # Pre-QKT. K covers every host token, so every step is exact whatever the strategy.
    monkeypatch.setenv("HYBRIDGEN_FORCE_CPU_BOUND", "1")
    rt = make_runtime("scheduler", k_min=128, k_max=256, predictor="positional")
    eng = Engine(rt)
    eng.step([("a", 40), ("b", 70)])
    strategies = []
    for _ in range(6):
        plan, q = eng.step([("a", 1), ("b", 1)])
        strategies.append(rt.selection())
        for layer in ("l0", "l1"):
            out = rt.decode(layer, plan, rt.hybrid_rows(layer, plan), q, SCALE)
            for j, req in enumerate("ab"):
                want = full_attention(q[plan.starts[j]], *eng.kv[req])
                torch.testing.assert_close(out[j].double(), want, rtol=1e-5, atol=1e-5)
    rt.end_step()
    assert strategies[:3] == [("post_qkt", 128)] * 3 and strategies[-1] == ("pre_qkt", 128)
    assert rt.counters["observed_steps"] == 6
    by = rt.counters["rows_by_strategy"]
    assert by["post_qkt"] == 3 * 2 * 2 and by["pre_qkt"] == 3 * 2 * 2 and by["all"] == 0
    assert rt.stats()["strategy"] == "pre_qkt"


def test_the_scheduler_grows_k_while_the_cpu_keeps_up():
    rt = make_runtime("scheduler", k_min=4, k_max=64, predictor="positional")
    for _ in range(5):  # the device part (t_gpu) dominates: K grows from k_min
        rt._times = [1.0, 0.001, 0.0]
        rt.end_step()
    strategy, k = rt.selection()
    assert strategy == "post_qkt" and k > 4


def test_stats_are_written_where_the_environment_asks(monkeypatch, tmp_path):
    import json
    import os

    monkeypatch.setenv("HYBRIDGEN_VLLM_STATS", str(tmp_path))
    rt = make_runtime()
    eng = Engine(rt)
    eng.step([("a", 40)])
    plan, q = eng.step([("a", 1)])
    rt.decode("l0", plan, rt.hybrid_rows("l0", plan), q, SCALE)
    rt.release("a")  # the last request: written at once
    written = json.loads((tmp_path / f"hybridgen-stats-{os.getpid()}.json").read_text())
    assert written["hybrid_rows"] == 1 and written["active_requests"] == {}
    (done,) = written["finished_requests"]
    assert done["req_id"] == "a" and done["tokens"] == 41 and done["host_tokens"] > 20 and done["hybrid_rows"] == 1


def test_vllm_attention_never_serves_a_request_with_freed_blocks():
    # "b" has freed blocks: its one-token row is a hybrid decode row, its multi-token row is a
    # streamed chunk (hybrid prefill); "c" has freed blocks but no host tokens yet, so no hybrid
    # row could serve it: leaving it to vLLM's attention is refused loudly.
    rt = make_runtime()
    eng = Engine(rt)
    eng.step([("a", 40), ("b", 30), ("c", 5)])
    plan, _ = eng.step([("a", 1), ("b", 5), ("c", 1)], blocks_freed={"b", "c"})
    rows = rt.hybrid_rows("l0", plan)
    assert rows == [0, 1]  # a: decode; b: a chunk of a request with freed blocks; c: no host tokens
    assert plan.freed == frozenset({1, 2})
    with pytest.raises(RuntimeError, match=r"freed KV blocks of \['c'\]"):
        rt.check_stock_rows(plan, rows)
    plan, _ = eng.step([("a", 1), ("b", 1)])
    rt.check_stock_rows(plan, [])  # nothing freed this step: vLLM's attention may serve anything


def test_a_streamed_chunk_equals_causal_full_attention():
    # A request whose later prompt chunks are served by Runtime.prefill: every token of the
    # chunk attends to the sinks, the host tokens and the window rows at its position or before.
    rt = make_runtime()
    eng = Engine(rt)
    eng.step([("r", 50)])
    plan, query = eng.step([("r", 20)], blocks_freed={"r"})
    assert rt.hybrid_rows("l0", plan) == [0]
    out = rt.prefill("l0", plan, 0, query, SCALE)
    k_all, v_all = eng.kv["r"]
    for j in range(20):
        p = 50 + j
        ref = full_attention(query[j], k_all[: p + 1], v_all[: p + 1])
        assert torch.allclose(out[j].double(), ref, atol=1e-5), j
    assert rt.counters["prefill_rows"] == 20
