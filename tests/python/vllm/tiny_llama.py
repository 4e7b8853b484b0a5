"""A tiny random-weight Llama-shaped model with a real (byte-level BPE) tokenizer, made offline.

Two layers, head_dim 32 (CPU_ATTN's smallest), GQA (4 query / 2 KV heads), float32: small enough
that vLLM loads it in seconds on a 2-core machine, shaped like the models the plugin serves.
"""

from __future__ import annotations

from pathlib import Path

#: Text the tokenizer is trained on (any English will do: it only has to tokenize something).
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Attention over a long context splits the cache by token position: recent tokens stay on the device.",
    "Older keys and values live in host memory, and the CPU computes attention over them.",
    "A log-sum-exp merge combines the two partial results exactly.",
] * 8

VOCAB = 512


def make_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_model(path: Path, *, seed: int = 0) -> Path:
    """Writes the model (config, safetensors weights, tokenizer) to ``path`` and returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        # Larger than the default 0.02: logits far apart, so greedy tokens do not hinge on rounding.
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    return path
