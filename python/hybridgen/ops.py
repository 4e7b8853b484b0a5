"""Selection and merging around the CPU partial results.

``topk`` runs in the native core; ``merge_partials`` is the LSE merge: the core's for CPU tensors,
the same formula in torch on another device (the CUDA kernels merge on their own).
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
    part (``lse = -inf``) contributes nothing, whatever its output holds (even NaN). NaN in an
    attended part propagates, as in torch. ``out_*``: float ``[..., d]`` of one shape;
    ``lse_*``: float ``[...]`` matching it. Returns ``(out float32, lse float32)``.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if out_a.shape != out_b.shape or out_a.dim() < 1:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have one shape [..., d]")
    if lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(
            f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must be the outputs' shape "
            f"without the last dimension, {tuple(out_a.shape[:-1])}"
        )
    if all(t.device.type == "cpu" for t in (out_a, lse_a, out_b, lse_b)):
        # On the CPU: the core's merge (the one CPU implementation; same semantics).
        d = out_a.shape[-1]
        out = out_a.detach().to(torch.float32, copy=True).contiguous()
        lse = lse_a.detach().to(torch.float32, copy=True).contiguous()
        _native.merge_into(
            out.view(-1, d),
            lse.view(-1),
            out_b.detach().float().contiguous().view(-1, d),
            lse_b.detach().float().contiguous().view(-1),
        )
        return out, lse
    # Elsewhere (a CUDA device where the kernels do not apply): the same formula in torch.
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    # Both empty: lse is -inf and both weights would be NaN; define them as 0.
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    # An empty part's weight is 0, but 0 * NaN is NaN: take its output out of the sum instead.
    o_a = torch.where(w_a == 0, 0.0, w_a * out_a.float())
    o_b = torch.where(w_b == 0, 0.0, w_b * out_b.float())
    return o_a + o_b, lse


def attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, mask=None
) -> tuple[torch.Tensor, torch.Tensor]:
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
