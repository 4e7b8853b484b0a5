"""The baseline policies behind ``HybridConfig(policy=...)``: exact ones reproduce the model's own
eager attention, selective ones equal it when their budget covers every token, and the
heavy-hitter scores match attention probabilities computed independently by eager attention."""

import pytest
import torch
from tiny_models import VOCAB, greedy, prompts, tiny
from tiny_models import run_patched as run

import hybridgen
from hybridgen import HybridConfig
from hybridgen.config import POLICIES
from hybridgen.hf.compat import cache_arg
from hybridgen.policies import heavy_hitter, infinigen, table


def eager(model, ids, mask, steps):
    model.set_attn_implementation("eager")
    return greedy(model, ids, mask, steps)


@pytest.mark.parametrize("policy", ["full", "aog", "aoc"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt"])
def test_exact_baselines_match_eager(model_type, policy):
    model = tiny(model_type)
    ids, mask = prompts(2, 40, 5)
    want_seq, want_logits = eager(model, ids, mask, 24)
    got_seq, got_logits, cache = run(model, ids, mask, 24, HybridConfig(policy=policy, gpu_budget=8, sinks=2))
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    layer, host = cache.layers[0], cache.store.host_len(0)
    assert layer.total == 40 + 24 - 1 == host + layer.device_tokens()
    if policy == "full":
        assert host == 0, "full keeps every token on the device"
    else:
        assert layer.device_tokens() == 0 and host == layer.total, "all KV offloaded after each step"
        assert all(r.host_tokens > 0 for r in cache.telemetry.records)
    if policy == "aog":  # every step streams every stored key and value of the layer
        row = 2 * cache.info.kv_heads * cache.info.head_dim * 4  # batch 2, float32
        assert all(r.tx_bytes == 2 * r.host_tokens * row for r in cache.telemetry.records)


@pytest.mark.parametrize("policy", ["h2o", "keyformer", "infinigen"])
@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_selective_baselines_are_exact_when_the_budget_covers_everything(model_type, policy):
    model = tiny(model_type)
    ids, mask = prompts(2, 40, 5)
    want_seq, want_logits = eager(model, ids, mask, 16)
    config = HybridConfig(policy=policy, gpu_budget=8, sinks=2, evict_chunk=4, k=128)
    got_seq, got_logits, cache = run(model, ids, mask, 16, config)
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert cache.store.host_len(0) > 20, "most tokens were on the host and selected back"


def eager_prefill_scores(model, ids, mask, hkv):
    """Accumulated attention per KV head from eager attention's probabilities: ``[layers][b, hkv, n]``."""
    model.set_attn_implementation("eager")
    out = model(ids, attention_mask=mask, output_attentions=True)
    scores = []
    for a in out.attentions:  # [b, hq, q, n]
        a = a * mask[:, None, :, None]  # padding queries hand out no score
        b, hq, _, n = a.shape
        scores.append(a.view(b, hkv, hq // hkv, -1, n).sum(dim=(2, 3)))
    return scores


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_h2o_prefill_scores_are_accumulated_attention(model_type):
    model = tiny(model_type)
    ids, mask = prompts(2, 40, 5)
    want = eager_prefill_scores(model, ids, mask, hkv=2)
    model.set_attn_implementation("sdpa")
    hybridgen.patch(model, HybridConfig(policy="h2o", gpu_budget=8, sinks=2, k=6))
    model(ids, attention_mask=mask)
    for layer, ref in enumerate(want):
        got = model._hybridgen.last_cache.layers[layer].tier.policy_state.acc
        assert (got - ref).abs().max().item() < 1e-4
    hybridgen.unpatch(model)


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_heavy_hitters_keep_the_best_scores_and_never_revive_dropped_tokens(policy, monkeypatch):
    admitted = []
    original = heavy_hitter.HeavyHitterPolicy._admit

    def spy(self, layer, st, n_host, device):
        before, seen, acc = st.heavy.clone(), st.host_seen, st.acc.clone()
        original(self, layer, st, n_host, device)
        admitted.append((layer.layer_idx, layer.sinks_on_device, before, seen, n_host, acc, st.heavy.clone()))

    monkeypatch.setattr(heavy_hitter.HeavyHitterPolicy, "_admit", spy)
    model = tiny("llama")
    ids, mask = prompts(1, 48, 0)
    k = 6
    seq, _, cache = run(model, ids, mask, 40, HybridConfig(policy=policy, gpu_budget=8, sinks=2, evict_chunk=4, k=k))
    assert len(admitted) > 5
    for _, s, before, seen, n_host, acc, after in admitted:
        assert after.shape[-1] == min(k, n_host)
        candidates = set(before.flatten().tolist()) | set(range(seen, n_host))
        for h in range(after.shape[1]):
            kept = after[0, h].tolist()
            assert kept == sorted(set(kept)) and set(kept) <= candidates, "only current key tokens or new arrivals"
            pool = sorted(set(before[0, h].tolist()) | set(range(seen, n_host)))
            by_score = sorted(pool, key=lambda i: -acc[0, h, s + i].item())[:k]
            assert set(kept) == set(by_score), "the k highest accumulated scores stay"
    # Each query hands out one unit of probability per query head: the scores add up.
    g = 2
    steps = len(seq[0]) - 48 - 1
    for st in (layer.tier.policy_state for layer in cache.layers):
        total = st.acc.sum(dim=-1)  # [b, hkv]
        assert torch.allclose(total, torch.full_like(total, g * (48 + steps)), rtol=1e-4)


def test_keyformer_is_reproducible_and_differs_from_h2o():
    ids, mask = prompts(1, 48, 0)
    config = dict(gpu_budget=8, sinks=2, evict_chunk=4, k=6)
    runs = {}
    for name in ("keyformer", "keyformer", "h2o"):
        model = tiny("llama")
        _, logits, cache = run(model, ids, mask, 20, HybridConfig(policy=name, **config))
        runs.setdefault(name, []).append((logits, [layer.tier.policy_state.heavy for layer in cache.layers]))
    (a, sa), (b, sb) = runs["keyformer"]
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb)), "seeded noise: same run twice"
    _, sh = runs["h2o"][0]
    assert any(not torch.equal(x, y) for x, y in zip(sa, sh)), "the Gumbel noise changes which tokens stay"


def test_infinigen_fetches_k_tokens_chosen_by_speculation():
    model = tiny("llama")
    ids, mask = prompts(1, 48, 0)
    _, _, cache = run(model, ids, mask, 12, HybridConfig(policy="infinigen", gpu_budget=8, sinks=2, k=5))
    records = cache.telemetry.records
    assert all(r.k == 5 for r in records)
    assert all(r.speculative == (r.layer > 0) for r in records), "layer 0 has no previous layer to speculate from"
    assert all(r.tx_bytes == 2 * 5 * 2 * 16 * 4 for r in records), "k key and value rows per KV head cross"
    st = cache.layers[0].tier.policy_state
    assert st.channels.shape == (2, round(infinigen.PARTIAL_RATIO * 16))
    assert st.partial.shape[2] == cache.store.host_len(0), "partial keys mirror every host token"
    want = cache.store.view(0, "keys", 0, st.partial.shape[2]).gather(
        3, st.channels[None, :, None, :].expand(1, -1, st.partial.shape[2], -1)
    )
    assert torch.equal(st.partial, want)


def test_every_policy_is_described_and_in_the_readme():
    from pathlib import Path

    rows = {r["policy"]: r for r in table()}
    assert set(rows) == set(POLICIES)
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for name, row in rows.items():
        assert row["keeps"] and row["attention"] and row["bus"]
        assert f"| `{name}` |" in readme, f"README's policy table lacks {name}"


def test_bad_policy_and_placement_changes():
    with pytest.raises(ValueError, match="unknown policy 'h3o'"):
        HybridConfig(policy="h3o")
    model = tiny("llama")
    hybridgen.patch(model, HybridConfig(policy="post_qkt", gpu_budget=8, sinks=2))
    cache = hybridgen.HybridCache(model)
    model(torch.randint(3, VOCAB, (1, 20)), **cache_arg(cache))
    cache.set_config(HybridConfig(policy="h2o", gpu_budget=8, sinks=2))  # same placement: fine
    with pytest.raises(ValueError, match="use a new HybridCache"):
        cache.set_config(HybridConfig(policy="aoc", gpu_budget=8, sinks=2))
    hybridgen.unpatch(model)
