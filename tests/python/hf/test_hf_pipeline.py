"""Pipelining: the CPU stage on a worker thread. With the true query it stays exact; with the
speculative query (from the previous layer's input) it is approximate but close, and the
telemetry reports the CPU time that ran while the device worked."""

import pytest
import torch
from tiny_models import greedy, prompts, tiny

import hybridgen
from hybridgen import HybridConfig


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_pipelined_exact_mode_matches_eager(model_type):
    model = tiny(model_type)
    ids, mask = prompts(2, 40, 5)
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, 24)
    hybridgen.patch(model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", pipeline=True))
    got_seq, got_logits = greedy(model, ids, mask, 24)
    hybridgen.unpatch(model)
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt"])
def test_speculative_pipeline_is_close_and_hides_cpu_time(model_type):
    model = tiny(model_type)
    ids, mask = prompts(1, 64, 0)
    model.set_attn_implementation("eager")
    _, want_logits = greedy(model, ids, mask, 24)
    config = HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", pipeline=True, speculative=True)
    hybridgen.patch(model, config)
    _, got_logits = greedy(model, ids, mask, 24)
    cache = model._hybridgen.last_cache
    hybridgen.unpatch(model)
    # Approximate (layer 1 uses layer 0's input as its query) yet clearly related to the truth.
    agree = (got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.5, f"next-token agreement {agree:.0%}"
    records = cache.telemetry.records
    assert all(r.speculative == (r.layer > 0) for r in records), "layer 0 has no predecessor to speculate from"
    assert sum(r.t_hidden for r in records if r.layer > 0) > 0, "speculated stages ran while the device worked"
    assert cache.telemetry.summary()["cpu_hidden_share"] > 0
