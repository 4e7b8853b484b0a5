"""The interface every decode-time KV policy implements, and the helpers they share.

A policy decides two things for a :class:`~hybridgen.hf.cache.HybridCache`:

- *placement*: how many leading (sink) and recent tokens each layer keeps on the model's device;
  every other token lives in the host store (nothing is ever lost: policies that "drop" tokens
  simply never read them again);
- *decode*: how one decode query attends — over which tokens, and on which side of the bus.

Prefill always runs the model's own attention over every token; a policy may look at it
(:meth:`Policy.prefill`, e.g. to seed accumulated attention scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from ..attention import device_partial
from ..config import HybridConfig
from ..telemetry import StepRecord

if TYPE_CHECKING:  # pragma: no cover
    from ..hf.cache import HybridLayer
    from ..hf.models import ModelInfo


@dataclass(frozen=True)
class Placement:
    """Where a layer's tokens live: ``sinks`` leading tokens and up to ``recent`` (+ ``evict_chunk``)
    most recent tokens on the device, the rest on the host. ``recent=None``: all on the device."""

    sinks: int
    recent: Optional[int]
    evict_chunk: int


class Policy:
    """One decode-time attention policy. Subclasses set the class attributes (they make the
    README's comparison table) and implement :meth:`decode`."""

    #: The ``HybridConfig.policy`` names this class serves.
    names: ClassVar[tuple[str, ...]] = ()
    #: What the policy keeps, where its attention runs, what crosses the CPU-device bus per step.
    keeps: ClassVar[str] = ""
    runs: ClassVar[str] = ""
    bus: ClassVar[str] = ""
    #: Whether its output equals full attention (up to rounding).
    exact: ClassVar[bool] = False

    def __init__(self, config: HybridConfig, info: "ModelInfo"):
        self.config = config
        self.info = info

    @property
    def name(self) -> str:
        return self.config.policy

    def placement(self) -> Placement:
        c = self.config
        return Placement(c.sinks, c.gpu_budget, c.evict_chunk)

    def selection(self) -> tuple[str, Optional[int]]:
        """``(strategy, K)`` of the coming step, as telemetry records it."""
        return self.name, self.config.k

    def observe(self, t_gpu: float, t_cpu: float, t_tx: float) -> None:
        """The summed per-layer times of a finished step (feedback for adaptive policies)."""

    def prefill(self, layer: "HybridLayer", query, key, value, attention_mask, scale: float) -> None:
        """Sees a multi-token step's query and every key/value in logical order (default: nothing)."""

    def speculate(self, layer: "HybridLayer", decoder_layer, hidden, position_embeddings, attention_mask) -> None:
        """Called from layer ``layer.layer_idx - 1``'s pre-forward hook with its input (default: nothing)."""

    def decode(self, layer: "HybridLayer", q: torch.Tensor, dev_k, dev_v, attention_mask, scale: float) -> torch.Tensor:
        """Attention output ``[b, hq, d]`` (float32) of the decode query ``q [b, hq, d]``;
        ``dev_k``/``dev_v [b, hkv, n_dev, d]`` are the layer's device tokens (sinks first). Sets
        ``layer.pending`` to the step's :class:`~hybridgen.telemetry.StepRecord`."""
        raise NotImplementedError


# --- masks --------------------------------------------------------------------------------------
def keep_mask(attention_mask) -> torch.Tensor:
    """Bool ``[b, total]`` (True = attend) of the last query row of the model's mask."""
    keep = attention_mask[:, 0, -1, :]
    if keep.dtype != torch.bool:  # additive float mask: 0 attends, a large negative masks
        keep = keep > torch.finfo(keep.dtype).min / 2
    return keep


def tier_masks(layer: "HybridLayer", attention_mask, n_host: int):
    """Device and host masks (True = ignore) from the model's ``[b, 1, q, total]`` mask."""
    if attention_mask is None:
        return None, None
    keep = keep_mask(attention_mask)
    s = layer.sinks_on_device
    return ~keep[:, device_positions(layer, n_host, keep.device)], ~keep[:, s : s + n_host]


def device_positions(layer: "HybridLayer", n_host: int, device) -> torch.Tensor:
    """Logical positions ``[n_dev]`` of the layer's device tokens (sinks, then recent)."""
    s, total = layer.sinks_on_device, layer.total
    return torch.cat([torch.arange(s), torch.arange(s + n_host, total)]).to(device)


# --- attention over explicit per-KV-head token sets (policies that pick tokens per head) -------
def grouped_logits(q, keys, scale: float, ignore=None) -> torch.Tensor:
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
    """``p [b, hkv, g, n]`` times ``values [b, hkv, n, d]`` → output ``[b, hq, d]``."""
    b, hkv, g, _ = p.shape
    return torch.matmul(p, values.float()).reshape(b, hkv * g, -1)


def device_only(layer: "HybridLayer", q, dev_k, dev_v, attention_mask, scale: float, strategy: str) -> torch.Tensor:
    """Attention over the layer's device tokens alone (host tokens, if any, are not read)."""
    cache = layer.cache
    n_host = cache.store.host_len(layer.layer_idx)
    dev_mask, _ = tier_masks(layer, attention_mask, n_host)
    out, t_dev = cache.timed(lambda: device_partial(q, dev_k, dev_v, scale, dev_mask)[0], q.device)
    layer.pending = StepRecord(cache.step, layer.layer_idx, 0, strategy, n_host, dev_k.shape[-2], 0.0, t_dev, 0.0)
    return out


def with_chosen(layer: "HybridLayer", dev_k, dev_v, chosen, host_k, host_v, n_host: int, attention_mask):
    """The device tokens plus per-KV-head chosen host tokens, in logical order.

    ``chosen [b, hkv, m]`` host indices (ascending) whose rows are ``host_k``/``host_v
    [b, hkv, m, d]``. Returns keys, values ``[b, hkv, n, d]``, their logical positions
    ``[b, hkv, n]`` (on the keys' device) and the ignore mask (bool ``[b, hkv, n]`` or ``None``).
    """
    s = layer.sinks_on_device
    b, hkv = dev_k.shape[:2]
    dev_pos = device_positions(layer, n_host, dev_k.device)
    pos = torch.cat([dev_pos[:s].expand(b, hkv, -1), chosen.to(dev_k.device) + s, dev_pos[s:].expand(b, hkv, -1)], -1)
    keys = torch.cat([dev_k[:, :, :s], host_k.to(dev_k.dtype), dev_k[:, :, s:]], dim=2)
    values = torch.cat([dev_v[:, :, :s], host_v.to(dev_v.dtype), dev_v[:, :, s:]], dim=2)
    ignore = None
    if attention_mask is not None:
        keep = keep_mask(attention_mask)
        ignore = ~keep.gather(1, pos.to(keep.device).reshape(b, -1)).view(b, hkv, -1)
    return keys, values, pos, ignore


def fetch_rows(store, layer_idx: int, chosen: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value rows ``[b, hkv, m, d]`` of host tokens ``chosen [b, hkv, m]`` (CPU int64),
    copied to ``device``."""
    n = int(chosen.max()) + 1 if chosen.numel() else 0
    rows = chosen.unsqueeze(-1).expand(-1, -1, -1, store.head_dim)
    return (store.view(layer_idx, "keys", 0, n).gather(2, rows).to(device),
            store.view(layer_idx, "values", 0, n).gather(2, rows).to(device))
