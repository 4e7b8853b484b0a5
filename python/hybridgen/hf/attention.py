"""The attention function registered with transformers as ``"hybridgen"``.

Multi-token steps (the prompt) run the model's usual SDPA attention over every token the cache
returns. One-token steps (decode) with a :class:`HybridCache` run hybrid attention: the CPU stage
over the host tokens, the device stage over the sinks and recent tokens, combined exactly (or
over the selected host tokens), then the layer's overflow moves to the host.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import cpu_stage, device_combine, device_partial, pre_qkt_positions
from ..telemetry import StepRecord
from .cache import ACTIVE_CACHE, HybridLayer
from .speculation import speculative_query

NAME = "hybridgen"


def register() -> None:
    """Registers the attention function and its mask builder (idempotent)."""
    AttentionInterface.register(NAME, hybridgen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def hybridgen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = ACTIVE_CACHE.get()
    layer = None
    if cache is not None and query.shape[2] == 1:
        candidate = cache.layers[module.layer_idx]
        if candidate.keys is key:  # the cache that was just updated for this very call
            layer = candidate
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    state = getattr(module, "_hybridgen_state", None)
    if cache.owner is not None and state is not None and cache.owner is not state:
        raise ValueError("this HybridCache was created for another model: make one per model")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = decode_step(layer, query[:, :, 0], key, value, attention_mask, scale)
    if state is None:
        # Used through attn_implementation="hybridgen" without patch(): no layer hooks time the
        # whole layer, so the record (device time = the attention's) is complete now.
        layer.cache.record(module.layer_idx, layer.pending)
        layer.pending = None
    layer.evict_overflow()
    return out.unsqueeze(1).to(query.dtype), None


def _keep(attention_mask) -> torch.Tensor:
    """Bool ``[b, total]`` (True = attend) of the last query row of the model's mask."""
    keep = attention_mask[:, 0, -1, :]
    if keep.dtype != torch.bool:  # additive float mask: 0 attends, a large negative masks
        keep = keep > torch.finfo(keep.dtype).min / 2
    return keep


def _masks(layer: HybridLayer, attention_mask, n_host: int):
    """Device and host masks (True = ignore) from the model's ``[b, 1, q, total]`` mask."""
    if attention_mask is None:
        return None, None
    keep = _keep(attention_mask)
    s, total = layer.sinks_on_device, layer.total
    dev_cols = torch.cat([torch.arange(s), torch.arange(s + n_host, total)]).to(keep.device)
    return ~keep[:, dev_cols], ~keep[:, s : s + n_host]


def decode_step(layer: HybridLayer, q, dev_k, dev_v, attention_mask, scale):
    """Hybrid attention of one decode query ``q [b, hq, d]``; records telemetry on the layer."""
    cache = layer.cache
    store, idx = cache.store, layer.layer_idx
    n_host = store.host_len(idx)
    dev_mask, host_mask = _masks(layer, attention_mask, n_host)
    strategy, k = cache.selection()
    s = layer.sinks_on_device
    if n_host == 0 or strategy == "streaming":
        out, t_dev = cache.timed(lambda: device_partial(q, dev_k, dev_v, scale, dev_mask)[0], q.device)
        layer.pending = StepRecord(cache.step, idx, 0, strategy, n_host, dev_k.shape[-2], 0.0, t_dev, 0.0)
        return out
    speculated = cache.speculative.pop(idx, None)
    dev_part, t_dev_part = None, 0.0
    if speculated is not None:
        # Started from the previous layer's input while that layer ran (approximate query).
        host, hidden = _wait(speculated)
    elif cache.config.pipeline and cache.config.merge == "lse":
        # The CPU stage runs on the worker thread (native code, GIL released) while the device
        # computes its own partial; only the remainder of the CPU stage is waited for.
        future = _worker().submit(_stage(cache, idx, q, scale, strategy, k, n_host, host_mask))
        dev_part, t_dev_part = cache.timed(lambda: device_partial(q, dev_k, dev_v, scale, dev_mask), q.device)
        host, hidden = _wait(future)
    else:
        host, hidden = _stage(cache, idx, q, scale, strategy, k, n_host, host_mask)(), 0.0
    moved, t_tx = cache.timed(lambda: host.to(q.device), q.device)
    out, t_dev = cache.timed(
        lambda: device_combine(q, dev_k, dev_v, moved, scale=scale, sinks=s, dev_mask=dev_mask, dev_part=dev_part),
        q.device,
    )
    t_dev += t_dev_part
    layer.pending = StepRecord(
        step=cache.step, layer=idx, k=host.tokens, strategy=strategy, host_tokens=n_host,
        device_tokens=dev_k.shape[-2], t_cpu=host.seconds, t_gpu=t_dev, t_tx=t_tx, t_hidden=hidden,
        tx_bytes=host.nbytes(), speculative=speculated is not None,
    )
    return out


def _wait(future) -> tuple:
    """The CPU stage's result and how much of it ran before it was waited for (hidden)."""
    t0 = time.perf_counter()
    host = future.result()
    return host, max(0.0, host.seconds - (time.perf_counter() - t0))


def _stage(cache, idx, q, scale, strategy, k, n_host, host_mask):
    """The CPU stage of layer ``idx`` for query ``q`` as a callable (for the worker thread)."""
    return partial(
        cpu_stage, cache.store, idx, q, scale=scale, merge=cache.config.merge,
        top_k=k if strategy == "post_qkt" else None,
        positions=pre_qkt_positions(n_host, k) if strategy == "pre_qkt" else None,
        host_mask=host_mask,
    )


def speculate(cache, idx: int, decoder_layer, hidden, position_embeddings, attention_mask) -> None:
    """Submits layer ``idx``'s CPU stage, with a query estimated from the previous layer's input
    ``hidden``, to the worker thread (its result is used by layer ``idx``'s attention)."""
    layer = cache.layers[idx]
    n_host = cache.store.host_len(idx) if cache.store is not None else 0
    strategy, k = cache.selection()
    if n_host == 0 or strategy == "streaming":
        return
    scale = getattr(decoder_layer.self_attn, "scaling", None)
    scale = 1.0 if cache.info.model_type == "opt" else (scale or cache.info.head_dim**-0.5)
    host_mask = None
    if attention_mask is not None:
        s = min(cache.config.sinks, layer.total + 1)  # the layer has not taken this step's token yet
        host_mask = ~_keep(attention_mask)[:, s : s + n_host]
    with torch.no_grad():
        q = speculative_query(decoder_layer, hidden, position_embeddings)
    cache.speculative[idx] = _worker().submit(_stage(cache, idx, q, scale, strategy, k, n_host, host_mask))


_WORKER: Optional[ThreadPoolExecutor] = None


def _worker() -> ThreadPoolExecutor:
    """The thread that runs pipelined CPU stages (one: stages of consecutive layers queue)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridgen-cpu")
    return _WORKER
