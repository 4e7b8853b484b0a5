"""What hybridgen needs to know about a transformers model, and whether it can serve it."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "opt")


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    max_positions: int


def supports(model) -> list[str]:
    """Reasons ``model`` cannot use hybrid attention (an empty list: it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return [f"{type(model).__name__} has no .config: not a transformers model"]
    reasons = []
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        reasons.append(f"unsupported model type {model_type!r}: hybridgen supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models are not supported")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        reasons.append("sliding-window attention is not supported")
    return reasons


def describe(model) -> ModelInfo:
    """The attention shape of a supported model; ValueError listing the reasons otherwise."""
    reasons = supports(model)
    if reasons:
        raise ValueError("; ".join(reasons))
    c = model.config
    q_heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or q_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // q_heads
    return ModelInfo(
        model_type=c.model_type,
        layers=c.num_hidden_layers,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_positions=getattr(c, "max_position_embeddings", None) or 2048,
    )
