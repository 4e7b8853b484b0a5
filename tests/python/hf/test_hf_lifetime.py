"""A HybridCache holds a host store of the whole context: it must go (and give its memory back)
as soon as its last reference does, not when Python's cyclic collector next runs. A reference
cycle inside the cache kept every store of an evaluation alive until the process ran out of
memory."""

import gc
import weakref

import pytest
import torch
from tiny_models import tiny

from hybridgen import HybridConfig
from hybridgen.hf import HybridCache, patch, unpatch


@pytest.mark.parametrize("policy", ["all", "post_qkt", "scheduler", "h2o"])
def test_a_cache_and_its_store_go_with_their_last_reference(policy):
    model = tiny("llama")
    config = HybridConfig(policy=policy, gpu_budget=8, sinks=2, k=4, k_min=4, k_max=8)
    gc.collect()
    gc.disable()  # only reference counting may free them
    try:
        patch(model, config)
        try:
            cache = HybridCache(model, config)
            with torch.inference_mode():
                out = model(torch.randint(3, 30, (1, 40)), past_key_values=cache, use_cache=True)
                model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            assert cache.engine.store.host_len(0) > 0  # the host store was used
            refs = [weakref.ref(cache), weakref.ref(cache.engine), weakref.ref(cache.engine.store)]
            del cache, out
        finally:
            unpatch(model)
        assert [r() is None for r in refs] == [True, True, True]
    finally:
        gc.enable()
