"""The models the speed harness runs: SmolLM2 (real weights), seeded random Llamas shaped like
Llama-3-8B's attention or Llama-3.1-8B entirely, or a local model directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

MODELS = ("smollm2", "llama-random", "llama8b-random")
#: A Llama small enough for tests (not listed in --help).
TINY = "tiny-random"


def resolve_model(name: str):
    """``"smollm2"``, ``"llama-random"``, ``"tiny-random"`` or an existing model directory."""
    if name in MODELS or name == TINY:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name}: the directory has no config.json (not a transformers model)")
        return path
    if path.exists() or os.sep in name or name.startswith("."):
        raise FileNotFoundError(f"--model {name}: no such model directory")
    raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)} or a model directory")


def random_llama(size: str = "llama-random", seed: int = 0):
    """A seeded, randomly initialised Llama built in code (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        # Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, rope theta 5e5) on a
        # narrow residual stream with a small FFN and vocabulary: decode time is mostly attention.
        "llama-random": dict(
            hidden_size=1024,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=1024,
            rope_theta=500000.0,
            max_position_embeddings=131072,
        ),
        TINY: dict(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=128,
            max_position_embeddings=4096,
        ),
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shapes[size], tie_word_embeddings=False))


def llama8b_random(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Llama-3.1-8B's shape with random weights (N(0, 0.02), norms 1), allocated and filled on
    ``device`` directly: 8 billion parameters never pass through host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)  # free on meta: the device gets bf16 storage only
    if device.type == "meta":  # the shape only
        return model
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.model.rotary_emb = LlamaRotaryEmbedding(config, device=device)  # its buffers were left empty
    return model


def load_model(name, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(str(name))
    if resolved == "llama8b-random":
        return llama8b_random(device, dtype, seed).eval()
    if resolved in ("llama-random", TINY):
        model = random_llama(resolved, seed)
    else:
        if resolved == "smollm2":
            from ...data.assets import smollm2

            resolved = smollm2()
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def model_label(name: str) -> str:
    return name if name in MODELS or name == TINY else Path(name).expanduser().resolve().name


def choose_threads(setting: str) -> tuple[int, str]:
    """Torch's CPU thread count for the run, and why. On a machine whose other work already
    keeps the cores busy, more OpenMP threads than idle cores spin against each other and slow
    every step many times over; ``auto`` takes only the cores the load average leaves idle."""
    if setting != "auto":
        return int(setting), "--threads"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    idle = max(1, min(torch.get_num_threads(), round(cores - load)))
    return idle, f"auto: {cores} cores, 1-minute load average {load:.2f} before the run"
