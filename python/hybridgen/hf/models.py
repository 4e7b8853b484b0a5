"""What hybridgen needs to know about a transformers model, and whether it can serve it."""

from __future__ import annotations

from ..engine.model_info import ModelInfo

__all__ = ["ModelInfo", "SUPPORTED_MODEL_TYPES", "describe", "supports"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "opt")


def supports(model) -> list[str]:
    """Reasons ``model`` cannot use hybrid attention through :func:`hybridgen.patch` (an empty
    list: it can). Names every reason ``patch()`` would refuse the model for."""
    reasons = _attention_reasons(model)
    if not callable(getattr(model, "generate", None)) or not callable(getattr(model, "set_attn_implementation", None)):
        reasons.append(
            f"{type(model).__name__} has no generate()/set_attn_implementation(): pass the *ForCausalLM model"
        )
    return reasons


def _attention_reasons(model) -> list[str]:
    """Reasons the installed transformers or ``model``'s attention cannot be served."""
    config = getattr(model, "config", None)
    if config is None:
        return [f"{type(model).__name__} has no .config: not a transformers model"]
    from .compat import version_problem

    reasons = []
    problem = version_problem()
    if problem is not None:
        reasons.append(problem)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        reasons.append(f"unsupported model type {model_type!r}: hybridgen supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models are not supported")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        reasons.append("sliding-window attention is not supported")
    return reasons


def describe(model, for_patch: bool = False) -> ModelInfo:
    """The attention shape of a supported model; ValueError listing the reasons otherwise
    (``for_patch``: every reason :func:`supports` gives)."""
    reasons = supports(model) if for_patch else _attention_reasons(model)
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
