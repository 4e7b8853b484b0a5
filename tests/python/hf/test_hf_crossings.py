"""One crossing into the native store per layer per decode step: the whole CPU stage (logits,
selection, gather or partial attention) is one call, and the tiers keep their own bookkeeping."""

from collections import Counter

import pytest
import torch
from tiny_models import tiny

import hybridgen
from hybridgen import HybridConfig
from hybridgen.hf.compat import cache_arg


class CountingNative:
    """Stands in for the native store object and counts every method called on it."""

    def __init__(self, inner):
        self._inner, self.calls = inner, Counter()

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if callable(value):

            def counted(*args, **kwargs):
                self.calls[name] += 1
                return value(*args, **kwargs)

            return counted
        self.calls[name] += 1
        return value


@pytest.mark.parametrize(
    "policy,merge",
    [
        ("all", "lse"),
        ("all", "concat"),
        ("post_qkt", "lse"),
        ("post_qkt", "concat"),
        ("pre_qkt", "lse"),
        ("scheduler", "lse"),
    ],
)
def test_one_native_store_call_per_layer_per_decode_step(policy, merge):
    model = tiny("llama")
    layers = model.config.num_hidden_layers
    hybridgen.patch(model, HybridConfig(policy=policy, merge=merge, gpu_budget=8, sinks=2, k=8, evict_chunk=64))
    cache = hybridgen.HybridCache(model)
    ids = torch.randint(3, 96, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model(ids, **cache_arg(cache))
        store = cache.store
        counter = store._native = CountingNative(store._native)
        token = out.logits[:, -1:].argmax(-1)
        steps = 6  # fewer than evict_chunk: no eviction falls in the measured steps
        for _ in range(steps):
            token = model(token, **cache_arg(cache)).logits[:, -1:].argmax(-1)
    assert cache.decode_steps == steps and cache.host_tokens(0) == 48 - 2 - 8
    assert counter.calls == Counter({"cpu_stage": steps * layers}), counter.calls
