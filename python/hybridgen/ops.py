"""Selection and merging around the CPU partial results.

``topk`` runs in the native core; ``merge_partials`` is the device-side LSE merge (torch, so it
runs wherever its inputs live).
"""

from __future__ import annotations

import torch

from . import _native

__all__ = ["attend", "topk", "merge_partials"]


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of every row of ``logits float32 [b, h, n]``.

    Returns ``indices int64 [b, h, k]`` in ascending token order and their logits. Partial
    selection (O(n) per row), ties to the earlier token, NaN ranks lowest.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [b, h, n], got shape {tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    b, h, _ = logits.shape
    indices = torch.empty((b, h, max(k, 0)), dtype=torch.int64)
    values = torch.empty((b, h, max(k, 0)), dtype=torch.float32)
    _native.topk(logits, k, indices, values)
    return indices, values


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint token sets (HGCA).

    ``o = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})``, computed stably; an empty
    part (``lse = -inf``) leaves the other unchanged. ``out_*``: ``[..., d]``; ``lse_*``: ``[...]``.
    Returns ``(out float32, lse float32)``.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # Both empty: lse is -inf and both weights would be NaN; define them as 0.
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * out_a.float() + w_b * out_b.float(), lse


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [b, hq, d]`` over every token of CPU ``keys``/``values [b, hkv, n, d]``
    (rows contiguous, any head stride) in one native call, with its log-sum-exp.

    ``mask``: bool ``[b, n]``, True = ignore. Returns ``(out float32 [b, hq, d], lse [b, hq])``.
    """
    b, hq, d = q.shape
    out = torch.empty((b, hq, d), dtype=torch.float32)
    lse = torch.empty((b, hq), dtype=torch.float32)
    m = None if mask is None else mask.to(torch.uint8).contiguous()
    _native.attend(q.detach().float().contiguous(), keys, values, float(scale), out, lse, m)
    return out, lse
