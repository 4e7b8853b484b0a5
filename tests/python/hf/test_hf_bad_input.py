"""The transformers integration rejects what it cannot serve with clear exceptions."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hybridgen
from hybridgen import HybridConfig
from hybridgen.hf.compat import cache_arg


def llama(kv_heads=2, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        (dict(gpu_budget=0), ValueError, "gpu_budget"),
        (dict(gpu_budget=-3), ValueError, "gpu_budget"),
        (dict(sinks=-1), ValueError, "sinks"),
        (dict(k=0), ValueError, "k must"),
        (dict(k_min=0), ValueError, "k_min"),
        (dict(k_min=512, k_max=256), ValueError, "must not exceed"),
        (dict(policy="magic"), ValueError, "unknown policy"),
        (dict(merge="sum"), ValueError, "unknown merge"),
        (dict(predictor="oracle"), ValueError, "unknown predictor 'oracle'"),
        (dict(predictor=None), TypeError, "predictor must be a str"),
        (dict(speculative=True), ValueError, "pipeline"),
        (dict(gpu_budget=1.5), TypeError, "int"),
        (dict(max_context=0), ValueError, "max_context"),
        (dict(far_node=-1), ValueError, "far_node"),
    ],
)
def test_config_rejects(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        HybridConfig(**kwargs)


def test_unsupported_model_type():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert hybridgen.supports(model)
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        hybridgen.patch(model, HybridConfig())


def test_not_a_model():
    with pytest.raises(ValueError, match="not a transformers model"):
        hybridgen.patch(torch.nn.Linear(2, 2))


def test_patching_twice_and_unpatching_an_unpatched_model():
    model = llama()
    hybridgen.patch(model, HybridConfig())
    with pytest.raises(RuntimeError, match="already patched"):
        hybridgen.patch(model, HybridConfig())
    hybridgen.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        hybridgen.unpatch(model)


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match="HybridConfig"):
        hybridgen.patch(llama(), {"gpu_budget": 8})


def test_cache_for_an_unpatched_model():
    with pytest.raises(ValueError, match="not patched"):
        hybridgen.HybridCache(llama())


def test_cache_used_with_another_model():
    a, b = llama(kv_heads=2), llama(kv_heads=1)
    hybridgen.patch(a, HybridConfig(gpu_budget=4))
    hybridgen.patch(b, HybridConfig(gpu_budget=4))
    cache = hybridgen.HybridCache(a)
    ids = torch.randint(0, 64, (1, 10))
    with pytest.raises(ValueError, match="use one cache per model"):
        b(ids, **cache_arg(cache))
    # Same shapes, different model: caught by the attention function at the first step.
    c = llama(kv_heads=2)
    hybridgen.patch(c, HybridConfig(gpu_budget=4))
    cache = hybridgen.HybridCache(a)
    with pytest.raises(ValueError, match="another model"):
        c(ids, **cache_arg(cache))


def test_dtype_change_within_a_cache():
    model = llama()
    hybridgen.patch(model, HybridConfig(gpu_budget=4))
    cache = hybridgen.HybridCache(model)
    ids = torch.randint(0, 64, (1, 10))
    model(ids, **cache_arg(cache))
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="keys arrive as torch.bfloat16"):
        model(ids[:, :1], **cache_arg(cache))


def test_batch_change_within_a_cache():
    model = llama()
    hybridgen.patch(model, HybridConfig(gpu_budget=4))
    cache = hybridgen.HybridCache(model)
    model(torch.randint(0, 64, (1, 10)), **cache_arg(cache))
    with pytest.raises(ValueError, match="batch size changed"):
        model(torch.randint(0, 64, (2, 1)), **cache_arg(cache))


def test_context_beyond_the_reserved_host_room():
    model = llama()
    hybridgen.patch(model, HybridConfig(gpu_budget=4, sinks=0, max_context=16))
    with pytest.raises(hybridgen.CapacityError):
        model.generate(torch.randint(0, 64, (1, 30)), max_new_tokens=2, do_sample=False)
