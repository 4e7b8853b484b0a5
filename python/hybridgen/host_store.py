"""The host tier of a decode KV cache: a thin torch-facing wrapper around the native store.

Every method allocates its outputs with torch (or writes into ``out=`` tensors you pass) and
calls into the Rust core, which releases the GIL while it works. Shapes use ``b`` = batch,
``hq`` = query heads, ``hkv`` = KV heads, ``d`` = head_dim, ``n`` = host tokens of a layer.

Slots: the store is a pool of ``batch`` sequence slots, each with its own length per layer (a
ragged batch, as a serving engine has). A new store has every slot in use; the layer-wide calls
(:meth:`HostKVStore.append`, :meth:`~HostKVStore.evict`, :meth:`~HostKVStore.host_len`,
:meth:`~HostKVStore.cpu_stage`...) treat the slots in use as one lockstep batch (``b`` = the
number of slots in use, in slot order) and raise ``ValueError`` if their lengths differ. The
per-slot calls (:meth:`~HostKVStore.add_slot`, :meth:`~HostKVStore.evict_slot`,
:meth:`~HostKVStore.cpu_stage_slots`...) let sequences join, advance and leave independently.

Positions: host token ``i`` of a sequence in a layer is its logical position ``sinks + i`` (the
first ``sinks`` tokens never leave the device).
"""

from __future__ import annotations

import operator
from typing import Optional

import numpy as np
import torch

from . import _native

__all__ = ["HostKVStore", "Tier"]

_DTYPES = {getattr(torch, name): name for name in _native.DTYPES}


class Tier:
    """Values of :meth:`HostKVStore.token_map`: where each position's key lives."""

    DEVICE = _native.TIERS.index("device")
    NEAR = _native.TIERS.index("near")
    FAR = _native.TIERS.index("far")


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES:
            raise TypeError(f"unsupported dtype {dtype}: expected float16, bfloat16 or float32")
        return _DTYPES[dtype]
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    return dtype


def _float_query(q: torch.Tensor) -> torch.Tensor:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}, but the host store computes on the CPU: pass q.cpu()")
    return q.detach().to(torch.float32).contiguous()


def _expect_rank(name: str, t, rank: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    return t


class HostKVStore:
    """Keys and values of the tokens that left the device tier, in NUMA-placed host memory.

    Keys live in the *near* tier (the CPU reads them every step); values live in the *far* tier
    (only the device reads them). When the near tier is full, the least recently generated keys
    move to the far tier. Capacities are in bytes; nothing is ever dropped: a request that does
    not fit raises :class:`hybridgen.CapacityError` and changes nothing.

    Args:
        layers, batch, kv_heads, head_dim: the cache's shape.
        dtype: storage dtype (``torch.float16``, ``torch.bfloat16``, ``torch.float32`` or name).
        near_capacity_bytes, far_capacity_bytes: tier budgets.
        sinks: leading tokens per sequence that stay on the device.
        near_node, far_node: NUMA nodes (``None``: local). A node that is not online falls back
            to the local node; :attr:`placement` says what was obtained and why.
        max_host_tokens: most host tokens per layer (bounds the reserved address space).
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype=torch.float16,
        *,
        near_capacity_bytes: int,
        far_capacity_bytes: int,
        sinks: int = 0,
        near_node: Optional[int] = None,
        far_node: Optional[int] = None,
        max_host_tokens: Optional[int] = None,
    ):
        #: The CUDA device the store is page-locked for (:meth:`pin`), else ``None``.
        self.pin_device: Optional[int] = None
        self._native = _native.HostKVStore(
            layers,
            batch,
            kv_heads,
            head_dim,
            _dtype_name(dtype),
            near_capacity_bytes=near_capacity_bytes,
            far_capacity_bytes=far_capacity_bytes,
            sinks=sinks,
            near_node=near_node,
            far_node=far_node,
            max_host_tokens=max_host_tokens,
        )
        self.dtype = getattr(torch, self._native.dtype)
        for tier in ("near", "far"):
            reason = self.placement[tier]["fallback_reason"]
            if reason:
                import warnings

                warnings.warn(f"{tier} tier: {reason}", RuntimeWarning, stacklevel=2)

        # The shape never changes: read once, so the hot path does not cross into Rust for it.
        n = self._native
        self.layers, self.batch, self.kv_heads, self.head_dim = n.layers, n.batch, n.kv_heads, n.head_dim
        self.sinks, self.max_host_tokens = n.sinks, n.max_host_tokens
        #: Bytes of K (or V) per token per layer.
        self.token_bytes = n.token_bytes

    # --- state ---------------------------------------------------------------------------------

    def total_len(self, layer: int) -> int:
        """Logical length of ``layer``: device plus host tokens."""
        return self._native.total_len(layer)

    def host_len(self, layer: int) -> int:
        return self._native.host_len(layer)

    def far_key_len(self, layer: int) -> int:
        """Host tokens of ``layer`` whose keys were spilled to the far tier (the oldest)."""
        return self._native.far_key_len(layer)

    def evictable(self, layer: int) -> int:
        """Non-sink device tokens of ``layer`` that :meth:`evict` may move now."""
        return self._native.evictable(layer)

    def tier_stats(self) -> dict:
        """``{"near": {...}, "far": {...}}``: node, capacity, used bytes, key/value tokens.

        ``key_tokens``/``value_tokens`` count tokens of the whole batch (``token_bytes`` each;
        exact for a lockstep batch); ``key_slot_tokens``/``value_slot_tokens`` count one per
        (layer, slot, position)."""
        return self._native.tier_stats()

    @property
    def placement(self) -> dict:
        """Per tier: the NUMA node requested, the node obtained, and why they differ."""
        stats = self.tier_stats()
        keys = ("requested_node", "node", "fallback_reason")
        return {tier: {k: stats[tier][k] for k in keys} for tier in ("near", "far")}

    def node_of(self, layer: int, kind: str, index: int) -> Optional[int]:
        """NUMA node the kernel reports for host token ``index`` of ``kind`` ('keys'/'values')."""
        return self._native.node_of(layer, kind, index)

    def token_map(self, layer: int) -> np.ndarray:
        """``uint8 [b, total_len]``: :class:`Tier` of every logical position's key."""
        return self._native.token_map(layer)

    # --- moving tokens ---------------------------------------------------------------------
    def append(self, layer: int, n: int) -> None:
        """Records ``n`` new tokens on the device tier of ``layer`` (data stays on the device)."""
        self._native.append(layer, n)

    def evict(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Moves the oldest ``m`` non-sink device tokens to the host.

        ``keys``/``values``: ``[b, hkv, m, d]`` CPU tensors in the store's dtype, contiguous.
        """
        self._native.evict(layer, keys, values)

    def spill_keys(self, layer: int, m: int) -> None:
        """Moves the ``m`` oldest near-tier keys of ``layer`` to the far tier."""
        self._native.spill_keys(layer, m)

    def reset(self) -> None:
        """Forgets every token of every slot (a new batch) and returns the memory to the OS.
        The slots in use stay in use."""
        self._native.reset()

    # --- request slots -----------------------------------------------------------------------
    # A slot is one sequence: ``batch`` of them, each with its own length per layer. Rows of one
    # slot are ``[hkv, m, d]`` (no batch axis).

    @property
    def active_slots(self) -> list[int]:
        """The slots in use, ascending (all ``batch`` of them in a new store)."""
        return self._native.active_slots

    def add_slot(self) -> int:
        """Takes a free slot (the lowest id) for a new sequence, empty in every layer.
        Raises :class:`hybridgen.CapacityError` when every slot is in use."""
        return self._native.add_slot()

    def release_slot(self, slot: int) -> None:
        """Forgets the tokens of ``slot`` (every layer), returns its memory to the OS and gives
        the slot back to the pool (a finished request)."""
        self._native.release_slot(slot)

    def reset_slot(self, slot: int) -> None:
        """Forgets the tokens of ``slot`` (every layer) and returns its memory; it stays in use."""
        self._native.reset_slot(slot)

    def slot_total_len(self, layer: int, slot: int) -> int:
        """Logical length of ``slot`` in ``layer``: device plus host tokens."""
        return self._native.slot_total_len(layer, slot)

    def slot_host_len(self, layer: int, slot: int) -> int:
        """Host tokens of ``slot`` in ``layer``."""
        return self._native.slot_host_len(layer, slot)

    def slot_far_key_len(self, layer: int, slot: int) -> int:
        """Host tokens of ``slot`` in ``layer`` whose keys were spilled to the far tier."""
        return self._native.slot_far_key_len(layer, slot)

    def slot_evictable(self, layer: int, slot: int) -> int:
        """Non-sink device tokens of ``slot`` in ``layer`` that :meth:`evict_slot` may move now."""
        return self._native.slot_evictable(layer, slot)

    def append_slot(self, layer: int, slot: int, n: int) -> None:
        """Records ``n`` new device tokens of ``slot`` in ``layer``."""
        self._native.append_slot(layer, slot, n)

    def evict_slot(self, layer: int, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Moves the oldest ``m`` non-sink device tokens of ``slot`` to the host.

        ``keys``/``values``: ``[hkv, m, d]`` CPU tensors in the store's dtype, contiguous.
        Raises :class:`hybridgen.CapacityError` (changing nothing) when the tiers are full.
        """
        self._native.evict_slot(layer, slot, keys, values)

    def spill_slot_keys(self, layer: int, slot: int, m: int) -> None:
        """Moves the ``m`` oldest near-tier keys of ``slot`` in ``layer`` to the far tier."""
        self._native.spill_slot_keys(layer, slot, m)

    def read_slot(self, layer: int, slot: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of host tokens ``[start, stop)`` of ``slot``: keys and values ``[hkv, stop-start, d]``."""
        if stop < start:
            raise ValueError(f"stop ({stop}) < start ({start})")
        shape = (self.kv_heads, stop - start, self.head_dim)
        k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        self._native.read_slot(layer, slot, start, k, v)
        return k, v

    def slot_token_map(self, layer: int, slot: int) -> np.ndarray:
        """``uint8 [slot_total_len]``: :class:`Tier` of every logical position's key of ``slot``."""
        return self._native.slot_token_map(layer, slot)

    def cpu_stage_slots(self, layer: int, slots, q: torch.Tensor, scale: float, merge: str, **kwargs) -> dict:
        """The CPU stage over a ragged batch in one native call: row ``i`` is query ``q[i]``
        over the host tokens of slot ``slots[i]`` only (rows run in parallel, GIL released).

        Args:
            slots: ``int64 [r]`` tensor or a list of ints; slots in use. A slot may appear in
                several rows (e.g. several query rows of one request).
            q: ``float32 [r, hq, d]`` (other float dtypes are converted).
            scale: logit scale. merge: ``"lse"`` or ``"concat"``.
            top_k: keep that many tokens per query head and row (``None``: all scored tokens).
            positions: ``int64 [m]`` host token indices scored in every row, or ``[r, m]`` one
                list per row (Pre-QKT); each index must exist in its row's slot.
            pages: Pre-QKT by page summaries: row ``i`` keeps ``pages[i]`` pages (of
                ``_native.PAGE_TOKENS`` tokens) per KV head, those whose key summaries bound the
                logit highest over the GQA group, scores their tokens, then keeps ``top_k`` per
                query head (or all of them); an int (every row) or a list / ``int64 [r]``. Not
                with ``positions``. A row with no more pages than it has scores every host token.
            host_mask: ``bool [r, w]``, ``w`` at least every row's host length; row ``i`` uses
                its first ``host_len[i]`` columns; True = ignore the token.
            isa_name: force an instruction set ("scalar", "avx2", "avx512", "neon").

        Returns a dict: ``merge``; ``tokens`` (list, per row: tokens selected per head);
        ``host_len`` (list, per row); ``width`` ``K`` (the largest ``tokens``); for ``"lse"``
        ``out`` ``float32 [r, hq, d]`` and ``lse`` ``float32 [r, hq]`` (a row with no tokens:
        zeros and ``-inf``); for ``"concat"`` ``logits`` ``float32 [r, hq, K]``, ``indices``
        ``int64 [r, hq, K]`` (host token indices of the row's slot, in scored order) and
        ``values`` ``[r, hq, K, d]`` in the store's dtype, row ``i`` filling its first
        ``tokens[i]`` entries per head and padded with ``-inf`` logits, index ``-1`` and zero
        values. Entries a merge does not produce are ``None``.

        Cost: unlike :meth:`cpu_stage`, a concat over every host token copies each row's value
        rows once per query head (rows of different slots cannot share one zero-copy view of the
        store): use ``top_k``/``positions`` or the LSE merge on the hot path.
        """
        if isinstance(slots, (list, tuple)):
            slots = torch.tensor([operator.index(s) for s in slots], dtype=torch.int64)
        pages = kwargs.get("pages")
        if pages is not None and not isinstance(pages, torch.Tensor):
            if isinstance(pages, (list, tuple)):
                kwargs["pages"] = torch.tensor([operator.index(p) for p in pages], dtype=torch.int64)
            else:
                kwargs["pages"] = torch.full((len(slots),), operator.index(pages), dtype=torch.int64)
        result = self._native.cpu_stage_slots(layer, slots, _float_query(q), float(scale), merge, **kwargs)
        for key in ("out", "lse", "logits", "indices", "values"):
            if result[key] is not None:
                result[key] = torch.from_dlpack(result[key])
        return result

    # --- reading ---------------------------------------------------------------------------
    def read(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of host tokens ``[start, stop)``: keys and values ``[b, hkv, stop-start, d]``."""
        if stop < start:
            raise ValueError(f"stop ({stop}) < start ({start})")
        shape = (len(self.active_slots), self.kv_heads, stop - start, self.head_dim)
        k, v = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        self._native.read(layer, start, k, v)
        return k, v

    def summaries(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the page summaries of ``layer``'s host keys: per page of
        ``_native.PAGE_TOKENS`` tokens the element-wise maxima and minima ``[b, hkv, pages, d]``."""
        pages = -(-self.host_len(layer) // _native.PAGE_TOKENS)
        shape = (len(self.active_slots), self.kv_heads, pages, self.head_dim)
        hi, lo = torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)
        self._native.read_summaries(layer, hi, lo)
        return hi, lo

    def view(self, layer: int, kind: str, start: int, stop: int) -> torch.Tensor:
        """Zero-copy ``[b, hkv, stop-start, d]`` view of host tokens (strided; shares memory).

        The view stays valid (it keeps the memory alive) but shows later writes to those rows.
        It is read-only: never write to it (the kernels read the store while it is shared).
        """
        return torch.from_dlpack(self._native.view(layer, kind, start, stop))

    def cpu_stage(self, layer: int, q: torch.Tensor, scale: float, merge: str, **kwargs) -> dict:
        """The whole CPU stage of a decode step in one native call (see ``_native.HostKVStore.cpu_stage``
        and :func:`hybridgen.attention.cpu_stage`)."""
        return self._native.cpu_stage(layer, q, float(scale), merge, **kwargs)

    # --- CPU attention -----------------------------------------------------------------------
    def logits(
        self,
        layer: int,
        q: torch.Tensor,
        scale: float,
        indices: Optional[torch.Tensor] = None,
        *,
        out: Optional[torch.Tensor] = None,
        isa: Optional[str] = None,
    ) -> torch.Tensor:
        """``scale · q·Kᵀ`` over host keys: ``float32 [b, hq, n]`` (or ``[b, hq, m]``).

        ``q``: ``[b, hq, d]`` (any float dtype; GQA when ``hq`` is a multiple of ``hkv``).
        ``indices``: optional ``int64 [b, hkv, m]`` host token indices (Pre-QKT); each key row
        is read once for its whole GQA group. ``isa`` forces "scalar"/"avx2"/"avx512".
        """
        q = _float_query(q)
        _expect_rank("q", q, 3)
        if out is None:
            n = _expect_rank("indices", indices, 3).shape[-1] if indices is not None else self.host_len(layer)
            out = torch.empty((q.shape[0], q.shape[1], n), dtype=torch.float32)
        self._native.logits(layer, q, float(scale), out, indices, isa)
        return out

    def gather_values(self, layer: int, indices: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Value rows ``indices [b, hq, k]`` staged as ``[b, hq, k, d]`` (store dtype)."""
        if out is None:
            out = torch.empty((*_expect_rank("indices", indices, 3).shape, self.head_dim), dtype=self.dtype)
        self._native.gather_values(layer, indices, out)
        return out

    def partial_attention(
        self,
        layer: int,
        logits: torch.Tensor,
        indices: Optional[torch.Tensor] = None,
        *,
        isa: Optional[str] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over host tokens only, with its log-sum-exp (for an exact LSE merge).

        ``logits``: scaled, ``float32 [b, hq, m]`` over all host tokens (``indices=None``) or
        over ``indices int64 [b, hq, m]``. Returns ``out float32 [b, hq, d]`` and
        ``lse float32 [b, hq]``; masked (``-inf``) logits contribute nothing.
        """
        b, hq, _ = _expect_rank("logits", logits, 3).shape
        out = torch.empty((b, hq, self.head_dim), dtype=torch.float32)
        lse = torch.empty((b, hq), dtype=torch.float32)
        self._native.partial_attention(layer, logits, out, lse, indices, isa)
        return out, lse

    # --- page-locked registration (CUDA) --------------------------------------------------------
    def pin(self, device: int = 0, cache_dir: Optional[str] = None) -> None:
        """Page-locks the store for CUDA device ``device`` (``cuMemHostRegister`` on the
        NUMA-placed pages), so copies from views of the store to the device are asynchronous.
        Only what the store holds is locked, then more as tokens arrive (``evict``), in chunks
        that double per strip, so a store reserved for a long context does not lock its whole
        reservation. If the system runs out of page-locked memory, locking stops (with a
        ``ResourceWarning``; see :attr:`pin_error`) and copies of the rest are synchronous.
        Needs the CUDA driver, not NVRTC. Raises :class:`hybridgen.cuda.CudaUnavailableError`
        without CUDA. Idempotent."""
        self._native.pin(int(device), cache_dir)
        self.pin_device = int(device)

    def unpin(self) -> None:
        """Undoes :meth:`pin`, after the device has finished every copy queued so far."""
        self._native.unpin()
        self.pin_device = None

    @property
    def pinned(self) -> bool:
        """Whether the store is registered with the CUDA driver."""
        return self._native.pinned

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the store page-locked now."""
        return self._native.pinned_bytes

    def layer_pinned_bytes(self, layer: int) -> int:
        """Bytes of ``layer`` (keys and values) page-locked now."""
        return self._native.layer_pinned_bytes(layer)

    @property
    def pin_error(self) -> Optional[str]:
        """Why page-locking stopped growing (out of page-locked memory), else ``None``."""
        return self._native.pin_error

    def __repr__(self) -> str:
        return (
            f"HostKVStore(layers={self.layers}, batch={self.batch}, kv_heads={self.kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, sinks={self.sinks})"
        )
