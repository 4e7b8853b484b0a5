"""One decode step of hybrid attention for one layer, in two stages.

The device holds the sink tokens and the most recent tokens (``dev_k``/``dev_v``, in token
order: sinks first); the host store holds every token in between.

1. :func:`cpu_stage` (CPU, native kernels, GIL released): logits of the query against the host
   keys — all of them, or only at ``positions`` (Pre-QKT) — then optionally the top-K per head
   (Post-QKT), then either the partial attention with its log-sum-exp (``merge="lse"``, HGCA) or
   the selected logits plus their value rows (``merge="concat"``, HybridGen).
2. :func:`device_combine` (the model's device): its own logits over the device tokens, combined
   with the host result — an exact LSE merge, or one softmax over the union in token order.

With every host token selected both equal full attention up to rounding. :func:`hybrid_attention`
runs both stages back to back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import _native
from .config import MERGES
from .host_store import HostKVStore
from .ops import attend, merge_partials

__all__ = [
    "HostPartial",
    "cpu_stage",
    "device_combine",
    "device_partial",
    "grouped_logits",
    "hybrid_attention",
    "pre_qkt_positions",
    "softmax_rows",
    "weighted_values",
]


@dataclass
class HostPartial:
    """What the CPU stage hands to the device (all CPU tensors, float32 unless noted)."""

    merge: str
    #: lse: partial output ``[b, hq, d]`` and its log-sum-exp ``[b, hq]``.
    out: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    #: concat: selected logits ``[b, hq, m]`` and value rows (store dtype) — ``[b, hkv, m, d]``
    #: when the whole GQA group shares the tokens (``grouped``), else ``[b, hq, m, d]``.
    logits: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    grouped: bool = False
    #: Host tokens each head attended to, and the wall time of the stage (seconds).
    tokens: int = 0
    seconds: float = 0.0
    #: int64 ``[b, hkv, k]``: per KV head the tokens a top-k selection ranked best over the GQA
    #: group (when asked for with ``kv_selection``; stays on the CPU: the next step may reuse it).
    kv_indices: Optional[torch.Tensor] = None
    #: Host key rows per KV head the stage read to choose and score its tokens (set by the policy).
    keys_read: int = 0

    def to(self, device) -> "HostPartial":
        """The same result with its tensors on ``device`` (the transfer to the device; on CUDA
        asynchronous, on a side stream that the current stream waits for)."""
        return self.ship(torch.device(device))[0]

    def ship(self, device: torch.device):
        """``(moved, seconds)``: :meth:`to` and the transfer's time (a lazy span on CUDA)."""
        tensors = [self.out, self.lse, self.logits, self.values]
        if device.type == "cuda":
            from .cuda import ship

            moved, span = ship(tensors, device)
        else:
            t0 = time.perf_counter()
            moved = [None if t is None else t.to(device) for t in tensors]
            span = time.perf_counter() - t0
        return HostPartial(self.merge, *moved, self.grouped, self.tokens, self.seconds), span

    @property
    def device(self) -> Optional[torch.device]:
        """Where the result's tensors are (``None``: no tensors)."""
        return next((t.device for t in (self.out, self.lse, self.logits, self.values) if t is not None), None)

    def nbytes(self) -> int:
        """Bytes that cross to the device."""
        return sum(
            t.numel() * t.element_size() for t in (self.out, self.lse, self.logits, self.values) if t is not None
        )


# --- attention in torch: the one implementation every device-side fallback and policy uses ------
def grouped_logits(q: torch.Tensor, keys: torch.Tensor, scale: float, ignore=None) -> torch.Tensor:
    """Logits ``[b, hkv, g, n]`` (float32) of ``q [b, hq, d]`` against ``keys [b, hkv, n, d]``;
    ``ignore``: bool, broadcastable to ``[b, hkv, n]`` (True = masked, logit -inf)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    x = torch.matmul(q.float().view(b, hkv, hq // hkv, d), keys.float().transpose(-1, -2)) * scale
    if ignore is not None:
        x = x.masked_fill(ignore.unsqueeze(2), float("-inf"))
    return x


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; rows that are entirely masked give zeros, not NaN."""
    return torch.softmax(x, dim=-1).nan_to_num(0.0)


def weighted_values(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``p [b, h, g, n]`` times ``values [b, h, n, d]`` → output ``[b, h·g, d]`` (float32)."""
    b, h, g, _ = p.shape
    return torch.matmul(p, values.float()).reshape(b, h * g, -1)


def pre_qkt_positions(n_host: int, k: int) -> torch.Tensor:
    """Pre-QKT prediction by position: ``k`` of ``n_host`` host tokens, ascending — the earliest
    eighth, the most recent half, and the rest strided evenly in between."""
    if k >= n_host:
        return torch.arange(n_host)
    head, recent = max(k // 8, 1), k // 2
    middle = k - head - recent
    lo, hi = head, n_host - recent
    strided = (
        torch.linspace(lo, hi - 1, middle).round().long()
        if middle > 0 and hi > lo
        else torch.empty(0, dtype=torch.long)
    )
    picked = torch.cat([torch.arange(head), strided, torch.arange(hi, n_host)]).unique()
    if picked.numel() < k:  # rounding collisions: top up from the unused middle
        unused = torch.ones(n_host, dtype=torch.bool)
        unused[picked] = False
        picked = torch.cat([picked, unused.nonzero().squeeze(1)[: k - picked.numel()]]).sort().values
    return picked


def page_count(k: int) -> int:
    """Pages a page-summary Pre-QKT keeps for a budget of ``k`` host tokens (rounded up)."""
    return max(1, -(-k // _native.PAGE_TOKENS))


def cpu_stage(
    store: HostKVStore,
    layer: int,
    q: torch.Tensor,
    *,
    scale: float,
    merge: str = "lse",
    top_k: Optional[int] = None,
    positions: Optional[torch.Tensor] = None,
    host_mask: Optional[torch.Tensor] = None,
    pages: Optional[int] = None,
    per_query_head: bool = False,
    page_extra: Optional[torch.Tensor] = None,
    kv_selection: bool = False,
    pinned: bool = False,
    buffers: Optional[dict] = None,
    ready=None,
) -> HostPartial:
    """The CPU half of a decode step over the host tokens of ``layer``.

    Args:
        q: ``[b, hq, d]`` query (any float dtype and device; used as float32 on the CPU).
        top_k: keep the ``top_k`` largest logits per head (Post-QKT); ``None`` keeps all.
        positions: int64 ``[m]`` host token indices to score (Pre-QKT); ``None`` scores all.
        host_mask: bool ``[b, n_host]``, True where a token must be ignored (padding).
        pages: score only the tokens of the ``pages`` best pages by their key summaries (Pre-QKT
            by page summaries, :func:`page_count`); ``per_query_head``: each query head chooses its
            own pages (Quest) instead of one choice per GQA group.
        page_extra: int64 ``[b, hkv, e]`` host tokens scored besides the pages' (per KV head).
        kv_selection: also return, for a ``top_k`` selection, per KV head the ``top_k`` tokens
            ranked best over the GQA group (``HostPartial.kv_indices``).
        pinned: gather selected value rows into page-locked memory (the model is on a CUDA
            device: the copy to it is then asynchronous).
        buffers: output buffers allocated once (``out``, ``lse_out``, ``logits_out``,
            ``values_out``, ``indices_out``; see ``HostKVStore.cpu_stage``).
        ready: an event to wait for before reading ``q``/``host_mask`` (host copies queued by
            the submitting thread with :func:`hybridgen.cuda.to_host`).
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    t0 = time.perf_counter()
    if ready is not None:
        ready.synchronize()
    qc = q.detach().to("cpu", torch.float32).contiguous()
    pos = None if positions is None else positions.to("cpu", torch.int64).contiguous()
    mask = None if host_mask is None else host_mask.to("cpu").contiguous()
    outs = dict(buffers or {})
    selected = (top_k, None if pos is None else pos.numel(), None if pages is None else pages * _native.PAGE_TOKENS)
    if pinned and merge == "concat" and any(c is not None for c in selected) and "values_out" not in outs:
        # Selected value rows go to page-locked memory: the copy to the device is then asynchronous.
        cap = min(c for c in selected if c is not None)
        b, hq, d = qc.shape
        outs["values_out"] = torch.empty(b * hq * max(cap, 0) * d, dtype=store.dtype, pin_memory=True)
    # One native call: logits, masking, selection, then partial attention or gather (GIL released).
    paged = {} if pages is None else {"pages": pages, "per_query_head": per_query_head, "page_extra": page_extra}
    if kv_selection and top_k is not None:
        outs["kv_indices_out"] = torch.empty(qc.shape[0] * store.kv_heads * top_k, dtype=torch.int64)
    r = store.cpu_stage(layer, qc, scale, merge, top_k=top_k, positions=pos, host_mask=mask, **paged, **outs)
    part = HostPartial(merge, *(_tensor(r[k]) for k in ("out", "lse", "logits", "values")), r["grouped"], r["tokens"])
    part.kv_indices = _tensor(r["kv_indices"])
    part.seconds = time.perf_counter() - t0
    return part


def _tensor(x):
    """A result of the native stage as a torch tensor (buffers come back as themselves)."""
    return x if x is None or isinstance(x, torch.Tensor) else torch.from_dlpack(x)


def _kernels(q: torch.Tensor, keys: torch.Tensor, kernels: Optional[bool]) -> bool:
    """Whether to use the CUDA kernels: ``kernels`` True/False forces, None = where they apply."""
    if kernels is False or not q.is_cuda:
        return False
    from . import cuda

    return cuda.usable(q, keys)


def device_partial(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    mask: Optional[torch.Tensor] = None,
    *,
    kernels: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the device tokens only, with its log-sum-exp (float32).

    ``q [b, hq, d]``, ``keys``/``values [b, hkv, n, d]``, ``mask`` bool ``[b, n]`` (True = ignore).
    ``kernels``: use the CUDA kernels (None: whenever the tensors are on a CUDA device).
    """
    b, hq, d = q.shape
    n = keys.shape[2]
    if n == 0:
        return q.new_zeros((b, hq, d), dtype=torch.float32), q.new_full((b, hq), float("-inf"), dtype=torch.float32)
    if _kernels(q, keys, kernels):
        from .cuda import attention_partial

        return attention_partial(q, keys, values, scale, mask)
    if keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # A device tier in host memory (no GPU): one native call instead of a chain of torch ops.
        return attend(q, keys, values, scale, mask)
    x = grouped_logits(q, keys, scale, None if mask is None else mask.view(b, 1, n))  # [b, hkv, g, n]
    return weighted_values(softmax_rows(x), values), torch.logsumexp(x, dim=-1).view(b, hq)


def device_combine(
    q: torch.Tensor,
    dev_k: torch.Tensor,
    dev_v: torch.Tensor,
    host: HostPartial,
    *,
    scale: float,
    sinks: int = 0,
    dev_mask: Optional[torch.Tensor] = None,
    dev_part: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    kernels: Optional[bool] = None,
) -> torch.Tensor:
    """The device half: attention output ``[b, hq, d]`` (float32, on ``q``'s device).

    ``dev_part``: the device tokens' :func:`device_partial`, if already computed (LSE merge).
    ``kernels``: use the CUDA kernels (None: whenever the tensors are on a CUDA device).
    """
    device = q.device
    if host.device not in (None, device):
        host = host.to(device)  # e.g. hybrid_attention(): the CPU's result has not been shipped yet
    if dev_part is None and _kernels(q, dev_k, kernels):
        from .cuda import combine

        return combine(q, dev_k, dev_v, host, scale=scale, sinks=sinks, dev_mask=dev_mask)
    if host.merge == "lse":
        o_dev, lse_dev = (
            dev_part if dev_part is not None else device_partial(q, dev_k, dev_v, scale, dev_mask, kernels=kernels)
        )
        out, _ = merge_partials(o_dev, lse_dev, host.out.to(device), host.lse.to(device))
        return out

    b, hq, d = q.shape
    hkv = dev_k.shape[1]
    g = hq // hkv
    dev_x = grouped_logits(q, dev_k, scale, None if dev_mask is None else dev_mask.view(b, 1, -1))  # [b, hkv, g, n]
    host_v = host.values.to(device).float()
    if host.grouped:  # every host token: value rows shared by the GQA group
        host_x = host.logits.to(device).view(b, hkv, g, -1)
        dev_vg = dev_v.float()
    else:  # each query head has its own rows
        host_x = host.logits.to(device).view(b, hq, 1, -1)
        dev_x = dev_x.reshape(b, hq, 1, -1)
        dev_vg = dev_v.float().repeat_interleave(g, dim=1)
    logits = torch.cat([dev_x[..., :sinks], host_x, dev_x[..., sinks:]], dim=-1)
    values = torch.cat([dev_vg[:, :, :sinks], host_v, dev_vg[:, :, sinks:]], dim=2)
    return weighted_values(softmax_rows(logits), values).reshape(b, hq, d)


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
    positions: Optional[torch.Tensor] = None,
    dev_mask: Optional[torch.Tensor] = None,
    host_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention output ``[b, hq, d]`` (float32, on ``q``'s device) of one decode query.

    ``dev_k``/``dev_v``: ``[b, hkv, n_dev, d]`` device tokens, the first ``sinks`` of them the
    attention sinks; ``dev_mask``/``host_mask``: bool ``[b, n_dev]`` / ``[b, n_host]``, True where
    a token must be ignored. See :func:`cpu_stage` for ``merge``, ``top_k`` and ``positions``.
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if store.host_len(layer) == 0:
        return device_partial(q, dev_k, dev_v, scale, dev_mask)[0]
    host = cpu_stage(store, layer, q, scale=scale, merge=merge, top_k=top_k, positions=positions, host_mask=host_mask)
    return device_combine(q, dev_k, dev_v, host, scale=scale, sinks=sinks, dev_mask=dev_mask)
