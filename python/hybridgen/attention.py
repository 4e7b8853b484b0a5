"""One decode step of hybrid attention for one layer.

The device holds the sink tokens and the most recent tokens (``dev_k``/``dev_v``, in token
order: sinks first); the host store holds every token in between. Two ways to combine them:

* ``merge="concat"`` (HybridGen): the CPU computes host logits, keeps all of them or the top-K per
  head, and ships those logits plus the matching value rows; the device concatenates them with its
  own logits in token order and runs one softmax and one value aggregation.
* ``merge="lse"`` (HGCA): the CPU finishes attention over its (selected) tokens and ships only the
  partial output and its log-sum-exp; the device merges it with its own partial exactly.

With every host token selected (``top_k=None``) both equal full attention up to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch

from .host_store import HostKVStore
from .ops import merge_partials, topk

__all__ = ["hybrid_attention", "device_partial"]

MERGES = ("concat", "lse")


def device_partial(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the device tokens only, with its log-sum-exp (float32).

    ``q [b, hq, d]``, ``keys``/``values [b, hkv, n, d]``, ``mask`` bool ``[b, n]`` (True = ignore).
    """
    b, hq, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    if n == 0:
        return q.new_zeros((b, hq, d), dtype=torch.float32), q.new_full((b, hq), float("-inf"), dtype=torch.float32)
    qg = q.float().view(b, hkv, hq // hkv, d)
    x = torch.matmul(qg, keys.float().transpose(-1, -2)) * scale  # [b, hkv, g, n]
    if mask is not None:
        x = x.masked_fill(mask.view(b, 1, 1, n), float("-inf"))
    lse = torch.logsumexp(x, dim=-1)
    p = torch.exp(x - lse.unsqueeze(-1)).nan_to_num(0.0)  # all-masked rows: zeros
    out = torch.matmul(p, values.float())
    return out.view(b, hq, d), lse.view(b, hq)


def _host_logits(store, layer, q, scale, host_mask):
    x = store.logits(layer, q.detach().float().cpu(), scale)
    if host_mask is not None:
        x.masked_fill_(host_mask.cpu().unsqueeze(1), float("-inf"))
    return x


def hybrid_attention(
    q: torch.Tensor,
    dev_k: torch.Tensor,
    dev_v: torch.Tensor,
    store: HostKVStore,
    layer: int,
    *,
    scale: float,
    sinks: int = 0,
    merge: str = "lse",
    top_k: Optional[int] = None,
    dev_mask: Optional[torch.Tensor] = None,
    host_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention output ``[b, hq, d]`` (float32, on ``q``'s device) of one decode query.

    Args:
        q: ``[b, hq, d]`` query of the new token (any float dtype, any device).
        dev_k, dev_v: ``[b, hkv, n_dev, d]`` device tokens; the first ``sinks`` are the
            attention sinks, the rest the most recent tokens.
        store, layer: the host tier and the layer in it.
        merge: ``"concat"`` or ``"lse"`` (see the module docstring).
        top_k: host tokens kept per head (Post-QKT); ``None`` keeps all (exact).
        dev_mask, host_mask: bool ``[b, n_dev]`` / ``[b, n_host]``, True where a token must be
            ignored (left padding).
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    n_host = store.host_len(layer)
    if top_k is not None and top_k >= n_host:
        top_k = None  # keeping every host token is the exact path
    if n_host == 0:
        return device_partial(q, dev_k, dev_v, scale, dev_mask)[0]

    x = _host_logits(store, layer, q, scale, host_mask)
    idx = None
    if top_k is not None:
        idx, x = topk(x, top_k)

    if merge == "lse":
        o_cpu, lse_cpu = store.partial_attention(layer, x, idx)
        o_dev, lse_dev = device_partial(q, dev_k, dev_v, scale, dev_mask)
        out, _ = merge_partials(o_dev, lse_dev, o_cpu.to(q.device), lse_cpu.to(q.device))
        return out

    # concat: ship host logits + value rows, one softmax over the union in token order.
    b, hq, d = q.shape
    hkv = dev_k.shape[1]
    g = hq // hkv
    qg = q.float().view(b, hkv, g, d)
    dev_x = torch.matmul(qg, dev_k.float().transpose(-1, -2)) * scale  # [b, hkv, g, n_dev]
    if dev_mask is not None:
        dev_x = dev_x.masked_fill(dev_mask.view(b, 1, 1, -1), float("-inf"))
    if idx is None:
        # Every host token: value rows are shared by the GQA group, keep them per KV head.
        host_x = x.to(q.device).view(b, hkv, g, -1)
        host_v = store.view(layer, "values", 0, n_host).to(q.device).float()  # [b, hkv, n, d]
        dev_vg = dev_v.float()
    else:
        # Top-K per query head: each head has its own rows; work per query head.
        host_x = x.to(q.device).view(b, hq, 1, -1)
        host_v = store.gather_values(layer, idx).to(q.device).float()  # [b, hq, k, d]
        dev_x = dev_x.reshape(b, hq, 1, -1)
        dev_vg = dev_v.float().repeat_interleave(g, dim=1)
    logits = torch.cat([dev_x[..., :sinks], host_x, dev_x[..., sinks:]], dim=-1)
    values = torch.cat([dev_vg[:, :, :sinks], host_v, dev_vg[:, :, sinks:]], dim=2)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.matmul(p, values).reshape(b, hq, d)
