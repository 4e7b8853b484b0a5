"""Pre-QKT by page summaries as the hybrid policies use it: exact when its candidates cover every
host token, seeded from the prompt's last queries, reusing each step's selection, and reading a
quarter of the host keys. The kernels themselves are tested in native/test_page_summaries.py."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import greedy, prompts, tiny
from tiny_models import run_patched as run

from hybridgen import HybridConfig
from hybridgen.policies.hybrid import SEED_WINDOW, HybridPolicy


@pytest.mark.parametrize("policy", ["pre_qkt", "quest"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_page_selection_is_exact_when_it_covers_every_host_token(model_type, policy):
    model = tiny(model_type)
    ids, mask = prompts(2, 60, 5)
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, 12)
    got_seq, got_logits, cache = run(model, ids, mask, 12, HybridConfig(policy=policy, gpu_budget=8, sinks=2, k=512))
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert all(r.host_tokens > 0 and r.strategy == policy for r in cache.telemetry.records)


def test_a_small_budget_reads_a_quarter_of_the_keys_and_reuses_its_selection():
    model = tiny("llama")
    ids, mask = prompts(1, 600, 0)
    config = HybridConfig(policy="pre_qkt", gpu_budget=16, sinks=2, k=16, max_context=700)
    _, _, cache = run(model, ids, mask, 6, config)
    records = [r for r in cache.telemetry.records if r.host_tokens > 0]
    assert records and all(r.k == 16 for r in records)
    for r in records:  # summaries (2 rows a page of 16) + max(2k, n/8) candidates, the seed included
        assert r.keys_read <= 2 * -(-r.host_tokens // 16) + max(32, r.host_tokens // 8) + 16, r
        assert r.keys_read < r.host_tokens / 2
    policy = cache.engine.policy
    prev = policy.previous[0]
    assert prev.shape == (1, cache.info.kv_heads, 16) and int(prev.max()) < cache.store.host_len(0)


def test_the_prompt_seeds_the_tokens_its_last_queries_attend_to_most():
    gen = torch.Generator().manual_seed(0)
    b, hkv, g, n, d, k, sinks = 2, 2, 3, 90, 16, 7, 3
    config = HybridConfig(policy="pre_qkt", gpu_budget=8, sinks=sinks, k=k)
    policy = HybridPolicy(config, SimpleNamespace(q_heads=hkv * g, kv_heads=hkv))
    tier = SimpleNamespace(layer_idx=4, placement=SimpleNamespace(sinks=sinks))
    query = torch.randn((b, hkv * g, 30, d), generator=gen)
    keys = torch.randn((b, hkv, n, d), generator=gen)
    keep = torch.ones((b, n), dtype=torch.bool)
    keep[1, :20] = False  # left padding
    policy.prefill(tier, query, keys, keys, keep, 0.25)
    # Reference in float64: the window's probabilities over the keys every window query sees.
    end = n - SEED_WINDOW
    q = query[:, :, -SEED_WINDOW:].double().view(b, hkv, g, SEED_WINDOW, d)
    x = torch.einsum("bhgwd,bhnd->bhgwn", q, keys[:, :, sinks:end].double()) * 0.25
    x = x.masked_fill(~keep[:, None, None, None, sinks:end], float("-inf"))
    score = torch.softmax(x, dim=-1).sum(dim=(2, 3))
    want = score.topk(k, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(policy.previous[4], want)
    assert (policy.previous[4][1] >= 20 - sinks).all(), "padding is never seeded"
    positional = HybridPolicy(HybridConfig(policy="pre_qkt", predictor="positional"), policy.info)
    positional.prefill(tier, query, keys, keys, keep, 0.25)
    assert not positional.previous and not positional.uses_prompt_queries
