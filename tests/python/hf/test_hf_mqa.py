"""Models with a single KV head (multi-query attention): torch gives their one-head cache tensors
arbitrary strides on that size-1 dimension; every import must treat them as the contiguous
tensors they are, and exact mode must equal the model's own attention at batch 1 and 2."""

import pytest
import torch
from tiny_models import VOCAB, greedy, prompts
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hybridgen
from hybridgen import HybridConfig


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_mqa_exact_mode_equals_eager(family, batch, merge):
    cls, config = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[family]
    torch.manual_seed(0)
    model = cls(
        config(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=128,
            max_position_embeddings=512,
        )
    ).eval()
    ids, mask = prompts(batch, 40, 3)
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, 8)
    hybridgen.patch(model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", merge=merge))
    got_seq, got_logits = greedy(model, ids, mask, 8)
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-5
    assert model._hybridgen.last_cache.host_tokens(0) > 0
