"""The replacement of FlexGen's decode attention for a layer whose cache is a
:class:`~hybridgen.flexgen.state.LayerState`.

:func:`hybrid_mha_gen` keeps ``TorchDevice.mha_gen``'s contract — the same projections (q
pre-scaled by ``head_dim ** -0.5``, so attention runs with ``scale=1.0``), the same output
projection and residual, the same returned ``(hidden, k_new, v_new)`` — and replaces the middle:
instead of reading the whole cache, the CPU attends over the host tokens
(:func:`hybridgen.attention.cpu_stage`: logits, selection, partial attention or selected logits +
values) and the device combines that with its own tokens (:func:`hybridgen.attention.device_combine`).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ..attention import cpu_stage, device_combine, device_partial, pre_qkt_positions
from ..telemetry import StepRecord
from ..timing import between, mark, timed
from .install import require_flexgen
from .state import LayerState

_flex_opt, _backend = require_flexgen()
TorchTensor, DeviceType = _backend.TorchTensor, _backend.DeviceType

__all__ = ["attend", "hybrid_mha_gen"]


def attend(state: LayerState, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keep: torch.Tensor):
    """Hybrid attention of one decode query over ``state``'s tokens and the new token.

    Args:
        q: ``[b, n_head, d]`` query, pre-scaled (FlexGen's convention).
        k_new, v_new: ``[b, n_head, d]`` the new token's key and value (attended, not committed).
        keep: bool ``(b, total + 1)`` FlexGen's attention mask (True = attend).

    Returns ``(out float32 [b, n_head, d], StepRecord)``; the record's ``t_gpu`` is the device
    part of attention only (:func:`hybrid_mha_gen` widens it to the whole call).
    """
    session = state.session
    session.begin(keep.shape[1])
    dev_mask, host_mask = state.masks(keep)
    dev_k, dev_v = state.with_new(k_new, v_new)
    strategy, k = session.selection()
    n_host = state.host_len
    device = q.device
    if n_host == 0:
        out, t_dev = timed(lambda: device_partial(q, dev_k, dev_v, 1.0, dev_mask)[0], device)
        return out, StepRecord(session.step, state.layer_id, 0, strategy, 0, dev_k.shape[2], 0.0, t_dev, 0.0)
    host = cpu_stage(
        state.store, 0, q, scale=1.0, merge=session.config.merge,
        top_k=k if strategy == "post_qkt" else None,
        positions=pre_qkt_positions(n_host, k) if strategy == "pre_qkt" else None,
        host_mask=host_mask,
    )
    moved, t_tx = host.ship(device)
    out, t_dev = timed(
        lambda: device_combine(q, dev_k, dev_v, moved, scale=1.0, sinks=state.sinks_on_device, dev_mask=dev_mask),
        device,
    )
    record = StepRecord(
        step=session.step, layer=state.layer_id, k=host.tokens, strategy=strategy, host_tokens=n_host,
        device_tokens=dev_k.shape[2], t_cpu=host.seconds, t_gpu=t_dev, t_tx=t_tx, tx_bytes=host.nbytes(),
    )
    return out, record


def hybrid_mha_gen(device, inputs, attention_mask, w_q, b_q, w_k, b_k, w_v, b_v, w_out, b_out, w_ln, b_ln,
                   n_head, state: LayerState, donate):
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
    start = mark(x.device)

    hidden = F.layer_norm(x, (h,), weight=w_ln.data, bias=b_ln.data)
    q = F.linear(hidden, w_q.data, bias=b_q.data) * head_dim**-0.5
    k = F.linear(hidden, w_k.data, bias=b_k.data)
    v = F.linear(hidden, w_v.data, bias=b_v.data)
    q, k, v = (t.view(b, n_head, head_dim) for t in (q, k, v))

    out, record = attend(state, q, k, v, attention_mask.data)

    # (b, n_head, d) -> (b, 1, h): the head-major layout of FlexGen's value.transpose(1, 2).view(b, 1, h)
    value = F.linear(out.to(x.dtype).reshape(b, 1, h), w_out.data, bias=b_out.data)
    value.add_(x)
    if donate[0]:
        inputs.delete()
    if donate[1]:
        attention_mask.delete()

    state.session.record(record, call_span=between(start, mark(value.device)))
    k_new = k.reshape(1, b * n_head, head_dim)
    v_new = v.reshape(1, b * n_head, head_dim)
    return (TorchTensor.create_from_torch(value, device), TorchTensor.create_from_torch(k_new, device),
            TorchTensor.create_from_torch(v_new, device))
