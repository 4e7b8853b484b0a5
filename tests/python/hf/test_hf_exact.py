"""Exact mode (every host token attended) reproduces the model's own eager attention: tiny random
OPT, Llama and Qwen2 models in float32, a device budget far smaller than the context so most
tokens live on the host, batch 2 with left padding, both merge modes, 64 greedy steps."""

import pytest
import torch
from tiny_models import greedy, prompts, tiny

import hybridgen
from hybridgen import HybridConfig
from hybridgen.hf.compat import cache_arg, output_cache


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("batch,pad", [(1, 0), (2, 7)])
def test_exact_mode_matches_eager(model_type, merge, batch, pad):
    model = tiny(model_type)
    ids, mask = prompts(batch, 48, pad)
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, 64)

    hybridgen.patch(model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", merge=merge))
    got_seq, got_logits = greedy(model, ids, mask, 64)
    cache = model._hybridgen.last_cache

    assert torch.equal(got_seq, want_seq), "greedy tokens differ"
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    # Most of the context really was on the host, and it did run the hybrid path.
    layer = cache.layers[0]
    assert layer.total == 48 + 64 - 1 == cache.store.host_len(0) + layer.device_tokens()
    assert 0 <= layer.device_tokens() - 2 - 8 < 4, "device tier: sinks + budget + less than one chunk"
    assert len(cache.telemetry.records) == 63 * 2
    assert all(r.host_tokens > 0 for r in cache.telemetry.records)
    hybridgen.unpatch(model)


def test_forward_calls_use_the_hybrid_cache():
    model = tiny("llama")
    ids, _ = prompts(1, 30, 0)
    ref = model(ids).logits
    hybridgen.patch(model, HybridConfig(gpu_budget=4, sinks=1, policy="all"))
    out = model(ids)
    assert isinstance(output_cache(out), hybridgen.HybridCache)
    assert output_cache(out).store.host_len(0) == 25
    assert (out.logits - ref).abs().max() < 1e-5
    # A decode step fed by hand through the returned cache.
    nxt = out.logits[:, -1:].argmax(-1)
    step = model(nxt, **cache_arg(output_cache(out)))
    full = hybridgen.unpatch(model)(torch.cat([ids, nxt], 1)).logits[:, -1]
    assert (step.logits[:, -1] - full).abs().max() < 1e-4


def test_multi_token_step_after_eviction_is_exact():
    """A chunk of several tokens after tokens went to the host sees all of them."""
    model = tiny("qwen2")
    ids, _ = prompts(1, 40, 0)
    ref = model(ids).logits
    hybridgen.patch(model, HybridConfig(gpu_budget=6, sinks=2, policy="all"))
    cache = hybridgen.HybridCache(model)
    a = model(ids[:, :20], **cache_arg(cache)).logits
    b = model(ids[:, 20:], **cache_arg(cache)).logits
    assert (torch.cat([a, b], 1) - ref).abs().max() < 1e-4
    assert cache.store.host_len(0) == 40 - 2 - 6


def test_attn_implementation_route_without_patch():
    """attn_implementation="hybridgen" plus a HybridCache given explicitly, no patch()."""
    import hybridgen.hf  # noqa: F401  (registers the attention function)

    model = tiny("llama")
    ids, mask = prompts(2, 40, 6)
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, 16)
    model.set_attn_implementation("hybridgen")
    cache = hybridgen.HybridCache(
        model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=2, policy="scheduler", k_min=4, k_max=64)
    )
    out = model.generate(
        ids,
        attention_mask=mask,
        **cache_arg(cache),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=1,
    )
    assert out.shape == want_seq.shape
    assert cache.store.host_len(0) > 0
    assert cache.step == 15, "each decode step was recorded and fed to the scheduler"
    assert cache.scheduler.steps == 15
