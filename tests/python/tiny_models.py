"""Tiny random transformers models and prompts shared by the tests (OPT, Llama, Qwen2)."""

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
