"""The replacement of FlexGen's decode attention for a layer whose cache is a
:class:`~hybridgen.flexgen.layer_cache.FlexGenLayerCache`.

:func:`hybrid_mha_gen` keeps ``TorchDevice.mha_gen``'s contract — the same projections (q
pre-scaled by ``head_dim ** -0.5``, so attention runs with ``scale=1.0``), the same output
projection and residual, the same returned ``(hidden, k_new, v_new)`` — and replaces the middle:
instead of reading the whole cache, the session's policy attends over the layer's tiers (for
hybridgen's own policies: the CPU over the host tokens, the device over its own, merged), through
the same engine as transformers' :class:`~hybridgen.HybridCache`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..timing import OpenSpan
from .install import require_flexgen
from .layer_cache import FlexGenLayerCache

_flex_opt, _backend = require_flexgen()
TorchTensor, DeviceType = _backend.TorchTensor, _backend.DeviceType

__all__ = ["attend", "hybrid_mha_gen"]


def attend(
    cache: FlexGenLayerCache,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    keep: torch.Tensor,
    span: Optional[OpenSpan] = None,
):
    """Hybrid attention of one decode query over ``cache``'s tokens and the new token, through
    the session's policy (the same engine as transformers' HybridCache).

    Args:
        q: ``[b, n_head, d]`` query, pre-scaled (FlexGen's convention).
        k_new, v_new: ``[b, n_head, d]`` the new token's key and value (committed here).
        keep: bool ``(b, total + 1)`` FlexGen's attention mask (True = attend).

    Returns ``(out float32 [b, n_head, d], StepRecord)``; the record's ``t_gpu`` is the device
    part of attention only (:func:`hybrid_mha_gen` widens it to the whole call).
    """
    cache.append(k_new.unsqueeze(2), v_new.unsqueeze(2))
    out = cache.engine.step(cache.index, q, cache.keep(keep), 1.0, span=span)
    return out, cache.engine.clock.last_record


def hybrid_mha_gen(
    device,
    inputs,
    attention_mask,
    w_q,
    b_q,
    w_k,
    b_k,
    w_v,
    b_v,
    w_out,
    b_out,
    w_ln,
    b_ln,
    n_head,
    state: FlexGenLayerCache,
    donate,
):
    """``TorchDevice.mha_gen`` (decode phase, ``tgt_s == 1``) with ``state`` as the cache.

    ``inputs`` ``(b, 1, h)`` float16 and ``attention_mask`` ``(b, src_s)`` bool are FlexGen
    TorchTensors on ``device`` (the compute ``TorchDevice``). Returns the layer output ``(b, 1, h)``
    and the new token's key and value ``(1, b*n_head, head_dim)`` as TorchTensors, like the original.
    """
    if w_q.device.device_type == DeviceType.COMPRESSED:  # FlexGen's --compress-weight
        w_q, w_k, w_v, w_out = (w.device.decompress(w) for w in (w_q, w_k, w_v, w_out))
    x = inputs.data
    b, tgt_s, h = inputs.shape
    if tgt_s != 1:
        raise ValueError(f"hybrid decode attention takes one token per sequence, got {tgt_s}")
    head_dim = h // n_head
    span = OpenSpan(x.device)  # the whole call: the clock widens the record's t_gpu to it

    hidden = F.layer_norm(x, (h,), weight=w_ln.data, bias=b_ln.data)
    q = F.linear(hidden, w_q.data, bias=b_q.data) * head_dim**-0.5
    k = F.linear(hidden, w_k.data, bias=b_k.data)
    v = F.linear(hidden, w_v.data, bias=b_v.data)
    q, k, v = (t.view(b, n_head, head_dim) for t in (q, k, v))

    out, _ = attend(state, q, k, v, attention_mask.data, span)

    # (b, n_head, d) -> (b, 1, h): the head-major layout of FlexGen's value.transpose(1, 2).view(b, 1, h)
    value = F.linear(out.to(x.dtype).reshape(b, 1, h), w_out.data, bias=b_out.data)
    value.add_(x)
    if donate[0]:
        inputs.delete()
    if donate[1]:
        attention_mask.delete()

    span.close(value.device)
    k_new = k.reshape(1, b * n_head, head_dim)
    v_new = v.reshape(1, b * n_head, head_dim)
    return (
        TorchTensor.create_from_torch(value, device),
        TorchTensor.create_from_torch(k_new, device),
        TorchTensor.create_from_torch(v_new, device),
    )
