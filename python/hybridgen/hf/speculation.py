"""Query estimates for speculation, made from transformers' modules (the engine takes tensors).

Consecutive layers see similar inputs, so layer i's input projected with layer i+1's input norm,
query projection and rotary embedding is a good stand-in for layer i+1's query:
``q̃ = RoPE(W_q^{i+1} · norm^{i+1}(h_i))`` (OPT: no rotary, the query is pre-scaled). The patch's
pre-forward hook of layer i hands it to :meth:`hybridgen.engine.Engine.speculate` for layer i+1
(a pipelining policy starts that layer's CPU stage from it: approximate, so never exact).
"""

from __future__ import annotations

import sys

import torch


def speculative_query(decoder_layer, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The stand-in query ``[b, hq, d]`` of ``decoder_layer`` for a one-token step from an
    earlier layer's input ``hidden_states [b, 1, hidden]``."""
    attn = decoder_layer.self_attn
    b = hidden_states.shape[0]
    d = attn.head_dim
    if hasattr(decoder_layer, "self_attn_layer_norm"):  # OPT: learned positions already in h; q pre-scaled
        x = decoder_layer.self_attn_layer_norm(hidden_states) if decoder_layer.do_layer_norm_before else hidden_states
        return (attn.q_proj(x) * attn.scaling).view(b, 1, -1, d).transpose(1, 2)[:, :, 0]
    # Rotary: Llama, Qwen2/3, Mistral, Gemma, Phi-3, Granite normalise the layer's input; OLMo 2
    # normalises its outputs instead.
    norm_in = getattr(decoder_layer, "input_layernorm", None)
    x = hidden_states if norm_in is None else norm_in(hidden_states)
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x)
    else:  # Phi-3: one fused projection, queries first
        q = attn.qkv_proj(x)[..., : attn.config.num_attention_heads * d]
    norm = getattr(attn, "q_norm", None)
    per_head = norm is not None and norm.weight.shape[-1] == d  # Qwen3, Gemma 3: per head; OLMo 2: whole
    if norm is not None and not per_head:
        q = norm(q)
    q = q.view(b, 1, -1, d)
    if per_head:
        q = norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, _ = rotate(q, q, cos, sin)
    return q[:, :, 0]


def attention_scale(decoder_layer, model_type: str, head_dim: int) -> float:
    """The scale the layer's attention applies to ``q·k`` (OPT pre-scales q: 1)."""
    if model_type == "opt":
        return 1.0
    return getattr(decoder_layer.self_attn, "scaling", None) or head_dim**-0.5
