"""What hybridgen needs to know about a transformers model, and whether it can serve it.

Every decoder family below runs its attention through transformers' ``AttentionInterface`` with
the queries and keys already projected, normalised (Qwen3's and OLMo 2's q/k norms) and rotated
(any ``rope_scaling``), and its scale passed as ``scaling`` (Gemma's ``query_pre_attn_scalar``,
Granite's ``attention_multiplier``): hybrid attention only needs the shape from the config. What
differs is where a layer's sliding window comes from, and what cannot be served at all.
"""

from __future__ import annotations

from typing import Optional

from ..engine.model_info import ModelInfo

__all__ = ["FAMILIES", "ModelInfo", "SUPPORTED_MODEL_TYPES", "decoder_layers", "describe", "layer_windows", "supports"]

#: Supported ``model_type`` → where the attention's sliding window comes from: ``None`` (the
#: family has none), ``"layer"`` (each attention module's ``sliding_window``: ``None`` on its
#: full-attention layers) or ``"config"`` (``config.sliding_window`` on every layer).
FAMILIES: dict[str, Optional[str]] = {
    "opt": None,
    "llama": None,  # rope_scaling (Llama 3.1's "llama3" and the others) is applied before attention
    "qwen2": "layer",  # use_sliding_window / max_window_layers
    "qwen3": "layer",  # + per-head q/k RMSNorm
    "qwen3_moe": "layer",
    "mistral": "config",
    "gemma": None,
    "gemma2": "layer",  # sliding layers interleaved with global ones; soft-capping refused below
    "gemma3_text": "layer",
    "phi3": "config",  # fused qkv_proj
    "olmo2": None,  # q/k RMSNorm over the whole projection
    "granite": None,  # attention_multiplier as the scale
}

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

#: ``layer_types`` entries that are softmax attention over a KV cache (full or sliding window).
_ATTENTION_LAYERS = ("full_attention", "sliding_attention")


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
    if model_type not in FAMILIES:
        reasons.append(f"unsupported model type {model_type!r}: hybridgen supports {', '.join(FAMILIES)}")
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models are not supported: hybrid attention serves decoder-only models")
    if getattr(config, "add_cross_attention", False) or getattr(config, "cross_attention_layers", None):
        reasons.append("cross-attention layers are not supported: they attend to another sequence's keys")
    if getattr(config, "kv_lora_rank", None):
        reasons.append(
            "multi-head latent attention (kv_lora_rank) is not supported: its cache holds compressed latents, "
            "not per-head keys and values"
        )
    others = sorted({t for t in getattr(config, "layer_types", None) or () if t not in _ATTENTION_LAYERS})
    if others:
        reasons.append(
            f"layers of type {', '.join(map(repr, others))} are not supported: hybrid attention serves softmax "
            "attention over a KV cache, full or sliding-window (linear attention and state-space layers keep a "
            "recurrent state instead)"
        )
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap is not None:
        reasons.append(
            f"attention logit soft-capping (attn_logit_softcapping={cap}) is not supported: neither the CPU "
            "stage nor the device partial caps logits, so no merge would be exact; load the model with "
            "attn_logit_softcapping=None to serve it uncapped"
        )
    return reasons


def decoder_layers(model) -> list:
    """``(layer_idx, decoder_layer, attention_module)`` for every decoder layer, in order."""
    found = []
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if attn is not None and getattr(attn, "layer_idx", None) is not None:
            found.append((attn.layer_idx, module, attn))
    return sorted(found, key=lambda x: x[0])


def layer_windows(model) -> tuple[Optional[int], ...]:
    """Per decoder layer, the sliding window its attention applies (``None``: full attention)."""
    config = model.config
    source = FAMILIES.get(config.model_type)
    layers = config.num_hidden_layers
    if source == "config":
        return (getattr(config, "sliding_window", None),) * layers
    if source == "layer":
        windows = {idx: getattr(attn, "sliding_window", None) for idx, _, attn in decoder_layers(model)}
        return tuple(windows.get(i) for i in range(layers))
    return (None,) * layers


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
        windows=layer_windows(model),
    )
