"""The hybrid path cannot be skipped without anyone noticing, on whichever transformers release is
installed: the cache keyword of the release, decode steps counted by the cache, a bypass raises,
a cache chosen by the user warns once, the version range is checked up front."""

import gc
import re
import warnings
import weakref
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaModel

import hybridgen
from hybridgen import HybridConfig
from hybridgen.guard import HybridPathError, require_hybrid_run
from hybridgen.hf import compat
from hybridgen.hf.compat import cache_arg, cache_kwarg

VOCAB = 96
ROOT = Path(__file__).resolve().parents[3]


def tiny_llama(kv_heads: int = 2):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def ids(n: int, batch: int = 1):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


CONFIG = dict(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", max_context=256)


def test_cache_keyword_is_the_installed_releases():
    import inspect

    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert cache_kwarg() in params
    forward = inspect.signature(LlamaForCausalLM.forward).parameters
    assert cache_kwarg() in forward, f"LlamaForCausalLM.forward takes no {cache_kwarg()!r}"


def test_generate_runs_every_decode_step_hybrid_without_future_warnings():
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    steps = 12
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(ids(40), max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=1)
    cache = model._hybridgen.last_cache
    assert cache.decode_steps == steps - 1
    assert cache.policy_calls() == [steps - 1] * 2
    assert cache.store.host_len(0) > 0 and cache.store.host_len(1) > 0
    records = cache.telemetry.records
    assert len(records) == (steps - 1) * 2, "one record per decode step and layer"
    assert sorted({r.step for r in records}) == list(range(steps - 1))
    require_hybrid_run(cache, what="test", decode_steps=steps - 1, context_tokens=40, policy="all")


@pytest.mark.parametrize("name", compat.CACHE_NAMES)
def test_forward_takes_the_cache_under_either_name(name):
    """A user's call with the old or the new keyword reaches the HybridCache all the same."""
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    cache = hybridgen.HybridCache(model)
    x = ids(30)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(x, **{name: cache})
        model(x[:, :1], **{name: cache})
    assert cache.decode_steps == 1 and cache.store.host_len(0) > 0


def test_a_forward_that_drops_the_cache_raises():
    """The model's inner forward replaces the cache with its own: the decode step would run the
    model's SDPA silently, so it raises instead."""
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    inner_forward = model.model.forward

    def forward(*args, **kwargs):
        kwargs[cache_kwarg()] = DynamicCache()
        return inner_forward(*args, **kwargs)

    model.model.forward = forward
    cache = hybridgen.HybridCache(model)
    model(ids(30), **cache_arg(cache))  # the prompt: the model's own attention either way
    with pytest.raises(HybridPathError, match="did not go through its HybridCache"):
        model(ids(1), **cache_arg(cache))


def test_attention_that_cannot_find_its_layer_raises(monkeypatch):
    """The attention function recognises its layer by the keys the cache returned: keys from
    elsewhere at a decode step are an error, not a fallback."""
    from hybridgen.hf.cache import HybridLayer

    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    cache = hybridgen.HybridCache(model)
    model(ids(30), **cache_arg(cache))
    update = HybridLayer.update
    monkeypatch.setattr(
        HybridLayer, "update", lambda self, k, v, *a, **kw: tuple(t.clone() for t in update(self, k, v, *a, **kw))
    )
    with pytest.raises(HybridPathError, match="layer 0"):
        model(ids(1), **cache_arg(cache))


def test_a_cache_of_the_users_choice_warns_once_and_runs_the_models_attention():
    model = tiny_llama()
    x = ids(30)
    with torch.no_grad():
        want = model(torch.cat([x, x[:, :1]], 1)).logits[:, -1]
    hybridgen.patch(model, HybridConfig(**CONFIG))
    cache = DynamicCache()
    with pytest.warns(UserWarning, match="DynamicCache, not a HybridCache"):
        model(x, **cache_arg(cache))
        got = model(x[:, :1], **cache_arg(cache)).logits[:, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x[:, :1], **cache_arg(cache))  # said once
    assert torch.allclose(got, want, atol=1e-5)


def test_use_cache_false_is_not_a_bypass():
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    model(ids(1), use_cache=False)  # one token, no cache: nothing to serve from a cache


def test_guard_reports_what_did_not_run():
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    cache = hybridgen.HybridCache(model)
    with pytest.raises(HybridPathError, match="no HybridCache"):
        require_hybrid_run(None, what="run")
    with pytest.raises(HybridPathError, match="ran 0 decode steps"):
        require_hybrid_run(cache, what="run")
    model(ids(30), **cache_arg(cache))
    model(ids(1), **cache_arg(cache))
    with pytest.raises(HybridPathError, match="ran 1 decode steps, expected 2"):
        require_hybrid_run(cache, what="run", decode_steps=2)
    with pytest.raises(HybridPathError, match="not 'post_qkt'"):
        require_hybrid_run(cache, what="run", policy="post_qkt")
    cache.layers[1].policy_calls = 0
    with pytest.raises(HybridPathError, match="per layer differ"):
        require_hybrid_run(cache, what="run")


def test_guard_needs_a_host_tier_when_the_context_exceeds_the_device_tier():
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    cache = hybridgen.HybridCache(model)
    model(ids(10), **cache_arg(cache))  # fits on the device: nothing on the host
    model(ids(1), **cache_arg(cache))
    require_hybrid_run(cache, what="run", context_tokens=10)
    with pytest.raises(HybridPathError, match="host tier is empty"):
        require_hybrid_run(cache, what="run", context_tokens=100)


def test_transformers_outside_the_range_is_named_and_refused(monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.22.2")
    reasons = hybridgen.supports(model)
    assert any("transformers 5.22.2" in r and compat.TRANSFORMERS_RANGE in r for r in reasons), reasons
    impl = model.config._attn_implementation
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"transformers 5.22.2 is outside the range hybridgen supports (transformers{compat.TRANSFORMERS_RANGE})"
        ),
    ):
        hybridgen.patch(model, HybridConfig(**CONFIG))
    assert not hybridgen.hf.is_patched(model) and model.config._attn_implementation == impl


def test_installed_transformers_is_in_range():
    assert compat.version_problem() is None, compat.version_problem()
    assert transformers.__version__ == compat.transformers_version()


def test_pyproject_range_is_the_checked_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hf = project["optional-dependencies"]["hf"]
    spec = next(d for d in hf if d.startswith("transformers"))
    assert spec == "transformers" + compat.TRANSFORMERS_RANGE


def test_supports_names_a_model_patch_would_refuse():
    base = LlamaModel(tiny_llama().config)
    reasons = hybridgen.supports(base)
    assert any("ForCausalLM" in r for r in reasons), reasons
    with pytest.raises(ValueError, match="ForCausalLM"):
        hybridgen.patch(base, HybridConfig(**CONFIG))


def test_no_module_level_reference_keeps_a_cache_alive():
    model = hybridgen.patch(tiny_llama(), HybridConfig(**CONFIG))
    cache = hybridgen.HybridCache(model)
    model(ids(30), **cache_arg(cache))
    model(ids(1), **cache_arg(cache))
    made = model._hybridgen.last_cache
    ref, made_ref = weakref.ref(cache), weakref.ref(made) if made is not None else None
    del cache, made
    hybridgen.unpatch(model)
    gc.collect()
    assert ref() is None
    assert made_ref is None or made_ref() is None
