"""Tiny random transformers models and prompts shared by the tests (OPT, Llama, Qwen2, and one of
every other supported decoder family: :data:`FAMILY_MODELS`)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96


def tiny(model_type: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
    )
    if model_type == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2))
    elif model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2))
    else:
        model = OPTForCausalLM(OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1))
    return model.eval()


#: A tiny random model of every decoder family ``patch()`` serves, by name: GQA 4/2 everywhere;
#: ``head_dim`` apart from hidden/heads where the family allows it; sliding windows of 24 tokens
#: where the family has them (``*_window``: every layer; Gemma: interleaved with full layers).
FAMILY_MODELS = {
    "llama": lambda c: tiny("llama"),
    "llama3_rope": lambda c: _t().LlamaForCausalLM(
        _t().LlamaConfig(
            **c,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        )
    ),
    "qwen2": lambda c: tiny("qwen2"),
    "qwen2_window": lambda c: _t().Qwen2ForCausalLM(
        _t().Qwen2Config(**c, use_sliding_window=True, sliding_window=24, max_window_layers=1)
    ),
    "qwen3": lambda c: _t().Qwen3ForCausalLM(_t().Qwen3Config(**c, head_dim=32)),
    "qwen3_moe": lambda c: _t().Qwen3MoeForCausalLM(
        _t().Qwen3MoeConfig(**c, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    ),
    "mistral": lambda c: _t().MistralForCausalLM(_t().MistralConfig(**c, sliding_window=None)),
    "mistral_window": lambda c: _t().MistralForCausalLM(_t().MistralConfig(**c, sliding_window=24)),
    "gemma": lambda c: _t().GemmaForCausalLM(_t().GemmaConfig(**c, head_dim=16)),
    "gemma2": lambda c: _t().Gemma2ForCausalLM(
        _t().Gemma2Config(**c, head_dim=16, sliding_window=24, attn_logit_softcapping=None)
    ),
    "gemma3_text": lambda c: _t().Gemma3ForCausalLM(
        _t().Gemma3TextConfig(**c, head_dim=16, sliding_window=24, layer_types=["sliding_attention", "full_attention"])
    ),
    "phi3": lambda c: _t().Phi3ForCausalLM(_t().Phi3Config(**c, pad_token_id=1, eos_token_id=2, bos_token_id=0)),
    "olmo2": lambda c: _t().Olmo2ForCausalLM(_t().Olmo2Config(**c, pad_token_id=1, eos_token_id=2)),
    "granite": lambda c: _t().GraniteForCausalLM(_t().GraniteConfig(**c, attention_multiplier=0.2)),
    "opt": lambda c: tiny("opt"),
}


def _t():
    import transformers

    return transformers


def family_model(name: str):
    """The tiny random model ``name`` of :data:`FAMILY_MODELS` (float32, eval mode, seeded)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        intermediate_size=128,
    )
    return FAMILY_MODELS[name](common).eval()


def prompts(batch: int, length: int, pad: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if batch > 1 and pad:
        ids[1, :pad] = 1
        mask[1, :pad] = 0  # left padding
    return ids, mask


def greedy(model, ids, mask, steps):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=1,
    )
    return out.sequences, torch.stack(out.logits, 1)


def tiny_model_dir(path):
    """A tiny random Llama and a word-level tokenizer saved under ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny("llama")
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return path


def run_patched(model, ids, mask, steps, config):
    """``greedy`` with ``model`` patched with ``config``: ``(sequences, logits, the HybridCache)``."""
    import hybridgen

    hybridgen.patch(model, config)
    try:
        seq, logits = greedy(model, ids, mask, steps)
        return seq, logits, model._hybridgen.last_cache
    finally:
        hybridgen.unpatch(model)
